"""The fused elementwise kernels (_elementwise.c) against torch's ops and transformers' own modules, and the
routing that swaps them into a block's forward only where a probe agrees."""

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsegpt import fused, pipeline
from sparsegpt.fused import fused_block_steps, native_available, rms_norm, rotary, silu_mul

from tiny import ARCHITECTURES, tiny_model

needs_native = pytest.mark.skipif(not native_available(), reason="the fused kernels need AVX-512 (F, BW, VL)")


def test_the_kernels_are_built_here():
    # `make setup` compiles them; without a C compiler the package still installs and runs torch's ops
    assert importlib.util.find_spec("sparsegpt._elementwise") is not None, "sparsegpt._elementwise was not built"


def ulps(a, b):
    """Each entry's difference in units of the last place of float32 (of the larger magnitude)."""
    a, b = a.double(), b.double()
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(torch.float32).tiny)
    return (a - b).abs() / (scale * torch.finfo(torch.float32).eps)


@needs_native
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 4096 * 3 + 5])
def test_silu_mul_is_torchs(size):
    generator = torch.Generator().manual_seed(size)
    gate = torch.randn(size, generator=generator) * 8  # both tails of the exponential
    gate[: min(size, 4)] = torch.tensor([0.0, -100.0, 100.0, -0.0])[: min(size, 4)]  # -0 and large as torch
    up = torch.randn(size, generator=generator)
    # float32: within the exponential's error (a few ulps); bf16: the same bits, its rounding absorbs that
    assert (ulps(silu_mul(gate, up), F.silu(gate) * up) <= 4).all()
    gate16, up16 = gate.bfloat16(), up.bfloat16()
    assert torch.equal(silu_mul(gate16, up16), F.silu(gate16) * up16)


def test_silu_mul_falls_back_to_torch_for_what_the_kernel_does_not_take():
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(silu_mul(gate.half(), up.half()), F.silu(gate.half()) * up.half())
    assert torch.equal(silu_mul(gate, up.bfloat16()), F.silu(gate) * up.bfloat16())
    wanted = gate.clone().requires_grad_()
    assert silu_mul(wanted, up).grad_fn is not None  # autograd goes through torch


@needs_native
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("width", [32, 100, 576])
def test_rms_norm_is_transformers(arch, width):
    norm_class = {
        "llama": "transformers.models.llama.modeling_llama.LlamaRMSNorm",
        "qwen2": "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
    }[arch]
    module_name, class_name = norm_class.rsplit(".", 1)
    generator = torch.Generator().manual_seed(width)
    for dtype in (torch.float32, torch.bfloat16):
        norm = getattr(importlib.import_module(module_name), class_name)(width, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(width, generator=generator))
            x = (torch.randn(3, 7, width, generator=generator) * 3).to(dtype)
            expected, got = norm(x), rms_norm(x, norm.weight, 1e-5)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if dtype == torch.float32:  # the mean's sum in another order: a few ulps
            assert ulps(got, expected).max() <= 4
        else:  # that rarely tips a bf16 rounding, by one bf16 ulp
            assert (got != expected).float().mean() < 0.01
            assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=0)


def llama_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


@needs_native
@pytest.mark.parametrize("dim", [8, 40, 64, 128])
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
@pytest.mark.parametrize("table_batch", [1, 2])
def test_rotary_is_transformers_bit_for_bit(dim, dtypes, table_batch):
    x_dtype, table_dtype = dtypes
    generator = torch.Generator().manual_seed(dim)
    batch, heads, kv_heads, positions = 2, 6, 2, 9
    # as attention layers pass them: (batch, positions, heads · dim) projections viewed per head and transposed
    q = torch.randn(batch, positions, heads * dim, generator=generator, dtype=x_dtype)
    q = q.view(batch, positions, heads, dim).transpose(1, 2)
    k = torch.randn(batch, positions, kv_heads * dim, generator=generator, dtype=x_dtype)
    k = k.view(batch, positions, kv_heads, dim).transpose(1, 2)
    cos, sin = (torch.randn(table_batch, positions, dim, generator=generator, dtype=table_dtype) for _ in range(2))
    expected = llama_rotary()(q, k, cos, sin)
    got = fused._fused_rotary(llama_rotary())(q, k, cos, sin)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(rotary(q, cos, sin), expected[0])


def test_rotary_leaves_other_calls_to_the_original():
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return q, k

    apply = fused._fused_rotary(original)
    q = torch.randn(1, 2, 3, 8)
    apply(q, q, torch.randn(1, 3, 8), torch.randn(1, 3, 8), unsqueeze_dim=2)  # another layout
    apply(q, q, torch.randn(1, 3, 4), torch.randn(1, 3, 4))  # partial rotary: cos narrower than the heads
    apply(q.half(), q.half(), torch.randn(1, 3, 8).half(), torch.randn(1, 3, 8).half())  # float16
    assert calls == [2, 1, 1]


class GemmaLikeNorm(nn.Module):
    """Named like an RMSNorm, scales by 1 + weight: the probe must keep its own forward."""

    def __init__(self, width):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(width)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


GemmaLikeNorm.__name__ = "GemmaLikeRMSNorm"


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.GELU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SwappedMLP(GeluMLP):
    """SiLU on the up projection instead: same names, another function."""

    def __init__(self):
        super().__init__()
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


class SiluMLP(SwappedMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@needs_native
def test_steps_are_replaced_only_where_the_probe_agrees():
    block = nn.ModuleDict({"norm": GemmaLikeNorm(8), "gelu": GeluMLP(), "swapped": SwappedMLP(), "silu": SiluMLP()})
    x = torch.randn(3, 8)
    with torch.no_grad(), fused_block_steps(block) as replaced:
        assert replaced == 1
        assert "forward" in block["silu"].__dict__
        assert all("forward" not in block[name].__dict__ for name in ("norm", "gelu", "swapped"))
        fused_out = block["silu"](x)
    assert "forward" not in block["silu"].__dict__  # put back
    assert torch.allclose(fused_out, block["silu"](x), rtol=1e-5, atol=1e-6)


@needs_native
def test_a_rotary_function_of_another_formula_is_kept(monkeypatch):
    home = sys.modules[__name__]

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # interleaved pairs: another rotation
        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + turn(q) * sin, k * cos + turn(k) * sin

    monkeypatch.setattr(home, "apply_rotary_pos_emb", apply_rotary_pos_emb, raising=False)
    with fused_block_steps(SiluMLP()):
        assert home.apply_rotary_pos_emb is apply_rotary_pos_emb


@needs_native
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_forwards_as_with_torchs_ops(arch):
    model = tiny_model(arch)
    tokens = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens).logits
        with fused_block_steps(model) as replaced:
            got = model(tokens).logits
            if arch in ("llama", "mistral", "qwen2"):  # per layer two norms and the MLP, the final norm, rotary
                assert replaced == 2 * 3 + 1 + 1
        again = model(tokens).logits
    assert torch.equal(again, expected)  # everything put back
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@needs_native
def test_the_modeling_module_gets_its_rotary_function_back():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    with fused_block_steps(tiny_model("llama")):
        assert modeling_llama.apply_rotary_pos_emb is not original
    assert modeling_llama.apply_rotary_pos_emb is original


def test_without_the_kernels_nothing_is_replaced(monkeypatch):
    monkeypatch.setattr(fused, "_native", lambda: None)
    model = tiny_model("llama")
    with fused_block_steps(model) as replaced:
        assert replaced == 0
        assert all("forward" not in module.__dict__ for module in model.modules())
    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(silu_mul(gate, up), F.silu(gate) * up)


@needs_native
@pytest.mark.parametrize("forward_dtype", [None, "bfloat16"])
def test_block_forwards_of_the_pipeline_use_them(forward_dtype, monkeypatch):
    model = tiny_model("llama")
    tokens = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    entered = []
    original = fused.fused_block_steps

    def counting(module):
        entered.append(module)
        return original(module)

    monkeypatch.setattr(fused, "fused_block_steps", counting)  # as fused_steps_on calls it
    with torch.no_grad(), pipeline.forward_precision(forward_dtype, torch.device("cpu"), model):
        got = model(tokens).logits
    with torch.no_grad(), pipeline.forward_precision(forward_dtype, torch.device("cpu")):
        expected = model(tokens).logits
    assert entered == [model]
    tolerance = 1e-4 if forward_dtype is None else 5e-2
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("precision", [None, "bfloat16", "split-bfloat16"])
def test_scoring_fuses_the_blocks_steps_and_leaves_the_final_norm(precision):
    from sparsegpt.perplexity import scoring_precision

    model = tiny_model("llama")
    with scoring_precision(model, precision):
        layer = model.model.layers[0]
        assert "forward" in layer.mlp.__dict__ and "forward" in layer.input_layernorm.__dict__
        # outside the blocks, as a streamed evaluation computes it: by torch's ops
        assert "forward" not in model.model.norm.__dict__
    assert "forward" not in model.model.layers[0].mlp.__dict__
