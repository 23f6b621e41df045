"""The native causal attention (_attention.c) against a float64 transcription of the formula, and the mode
that routes torch's attention calls to it only where it takes them and only where the host measured it
faster."""

import contextlib
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

from sparsegpt import attention, host, pipeline
from sparsegpt.attention import NativeCausalAttention, causal_attention, native_available, takes
from sparsegpt.host import MatmulRates

from tiny import tiny_config

NATIVE = native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="the native attention kernel needs AVX-512")


@pytest.fixture(autouse=True)
def measured_host():
    """The host probe run (or read from its cache) before a test counts the kernel's calls: the probe's
    own calls of the kernel are not the test's."""
    host.matmul_rates()


def test_the_kernel_is_built_here():
    # `make setup` compiles it; without a C compiler the package still installs and attends by torch
    assert importlib.util.find_spec("sparsegpt._attention") is not None, "sparsegpt._attention was not built"


def attend_slowly(q, k, v, scale=None):
    """softmax(scale · q kᵀ, keys after each query masked) v in float64, one head at a time; the queries
    are the last positions of the keys'."""
    batch, heads, queries, dim = q.shape
    group, keys = heads // k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = torch.empty(batch, heads, queries, dim, dtype=torch.float64)
    later = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group].double(), v[b, h // group].double()
            scores = (q[b, h].double() @ keys.T * scale).masked_fill(later, float("-inf"))
            out[b, h] = scores.softmax(-1) @ values
    return out


def qkv(batch, heads, kv_heads, length, dim, dtype=torch.float32, layout="transposed", seed=0, keys=None):
    """q, k, v as attention layers make them: (batch, heads, length, dim) views of (batch, length, heads,
    dim) projections ("transposed"), or contiguous; ``keys`` (default ``length``) keys and values."""
    generator = torch.Generator().manual_seed(seed)

    def one(count, length):
        if layout == "transposed":
            return torch.randn(batch, length, count, dim, generator=generator).to(dtype).transpose(1, 2)
        return torch.randn(batch, count, length, dim, generator=generator).to(dtype)

    keys = length if keys is None else keys
    return one(heads, length), one(kv_heads, keys), one(kv_heads, keys)


@needs_native
@pytest.mark.parametrize(
    "shape",
    [
        (2, 9, 3, 130, 64),  # grouped 3:1, rows past whole blocks of 6, 48 and 64
        (1, 4, 4, 1, 16),  # one position
        (3, 2, 1, 7, 80),  # dimensions past whole blocks of 64
        (1, 14, 2, 64, 128),
        (2, 3, 3, 200, 32),
        (1, 14, 2, 1, 64, 77),  # a generation step: one query (per head) after a cache
        (2, 9, 3, 1, 64, 130),
        (1, 4, 1, 5, 16, 70),  # a few new tokens after a cache
    ],
)
@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_native_attention_is_the_formula(shape, layout):
    q, k, v = qkv(*shape[:5], layout=layout, keys=shape[5] if len(shape) > 5 else None)
    expected = attend_slowly(q, k, v)
    out = causal_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        causal_attention(q, k, v, scale=0.3).double(), attend_slowly(q, k, v, 0.3), rtol=1e-5, atol=1e-5
    )


@needs_native
def test_native_attention_keeps_large_scores_finite():
    q, k, v = qkv(1, 2, 1, 50, 16)
    out = causal_attention(q * 30, k * 30, v)  # scores in the thousands: exp of their differences underflows
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), attend_slowly(q * 30, k * 30, v), rtol=1e-5, atol=1e-5)


@needs_native
def test_native_attention_of_16_bit_inputs_is_float32_arithmetic():
    q, k, v = qkv(2, 4, 2, 40, 32, dtype=torch.bfloat16)
    out = causal_attention(q, k, v)
    assert out.dtype == torch.bfloat16  # the inputs' precision, rounded once at the end
    torch.testing.assert_close(out.double(), attend_slowly(q, k, v).bfloat16().double(), rtol=0, atol=1e-2)
    step = causal_attention(q[:, :, -1:], k, v)  # a bf16 model's generation step: bf16 read as it is
    torch.testing.assert_close(step.double(), attend_slowly(q[:, :, -1:], k, v).bfloat16().double(), rtol=0, atol=1e-2)
    half = causal_attention(q.half(), k.half(), v.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), attend_slowly(q.half(), k.half(), v.half()), rtol=0, atol=2e-3)
    q32 = q.float()
    mixed = causal_attention(q32, k.float(), v)  # as under autocast: q, k float32 after rotary, v bf16
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), attend_slowly(q32, k, v), rtol=1e-5, atol=1e-5)


def test_only_the_shapes_the_kernel_covers_are_taken():
    q, k, v = qkv(1, 4, 2, 10, 16)
    assert takes(q, k, v, grouped=True) and not takes(q, k, v, grouped=False)  # 4 heads over 2: grouped only
    assert takes(q, k[:, :1].expand(1, 4, 10, 16), v[:, :1].expand(1, 4, 10, 16), grouped=False)
    assert takes(q[:, :, -1:], k, v, grouped=True)  # fewer queries than keys (after a cache)
    assert not takes(q, k[:, :, :5], v[:, :, :5], grouped=True)  # fewer keys than queries
    assert not takes(*qkv(1, 4, 2, 10, 8), grouped=True)  # dim not a multiple of 16
    assert not takes(q.double(), k.double(), v.double(), grouped=True)
    assert not takes(q[0], k[0], v[0], grouped=True)


def test_the_mode_routes_only_the_calls_the_kernel_takes(monkeypatch):
    taken = []

    def spy(q, k, v, scale=None):
        taken.append(scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    monkeypatch.setattr(attention, "causal_attention", spy)
    q, k, v = qkv(1, 4, 2, 10, 16)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    with NativeCausalAttention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.5, enable_gqa=True)  # by position
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # a mask: torch's
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # not causal
        F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1, enable_gqa=True)
        trained = q.clone().requires_grad_()
        F.scaled_dot_product_attention(trained, k, v, is_causal=True, enable_gqa=True)  # gradients: torch's
        with torch.no_grad():
            F.scaled_dot_product_attention(trained, k, v, is_causal=True, enable_gqa=True)
        step = q[:, :, -1:]  # one new token over a cache of 10: it attends to every key
        F.scaled_dot_product_attention(step, k, v, scale=0.25, enable_gqa=True)
        F.scaled_dot_product_attention(step, k, v, is_causal=True, enable_gqa=True)  # top-left: key 0 only
        F.scaled_dot_product_attention(q[:, :, -3:], k, v, enable_gqa=True)  # 3 queries, no mask: not causal
    with NativeCausalAttention(windows=False):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1, enable_gqa=True)
        F.scaled_dot_product_attention(step, k, v, scale=0.2, enable_gqa=True)
    with NativeCausalAttention(steps=False):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
        F.scaled_dot_product_attention(step, k, v, scale=0.4, enable_gqa=True)
    assert taken == [None, 0.5, None, 0.25, 0.2, 0.3]


def attention_model(dtype=torch.float32):
    """A tiny Llama whose heads are 16 wide (the kernel's multiple), 4 query heads over 2 key/value heads."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.head_dim = 64, 16
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@needs_native
def test_a_model_forward_through_the_native_kernel_gives_the_same_logits(monkeypatch):
    model = attention_model()
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1))
    calls = []
    original = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with NativeCausalAttention():
            out = model(input_ids=ids).logits
    assert len(calls) == model.config.num_hidden_layers  # every block's attention went through the kernel
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_native_kernel_runs_where_it_measured_faster(monkeypatch):
    cpu = torch.device("cpu")
    for native, torch32, torch16 in ((150.0, 60.0, 60.0), (60.0, 150.0, 60.0), (60.0, 60.0, 150.0)):
        rates = MatmulRates(
            1.0, 1.0, 1.0, attention_float32=torch32, attention_bfloat16=torch16, attention_native=native
        )
        monkeypatch.setattr(host, "matmul_rates", lambda cache=None, rates=rates: rates)
        for dtype, rate in ((None, torch32), ("bfloat16", torch16)):
            chosen = isinstance(host.native_attention(cpu, dtype), NativeCausalAttention)
            assert chosen == (NATIVE and native >= 1.1 * rate)
        assert not isinstance(host.native_attention(cpu, "float16"), NativeCausalAttention)  # not measured
        assert not isinstance(host.native_attention(torch.device("meta"), None), NativeCausalAttention)


def test_generation_steps_go_native_where_the_probe_measured_them_faster(monkeypatch):
    cpu = torch.device("cpu")
    for native, torch32, torch16 in ((30.0, 10.0, 10.0), (10.0, 30.0, 10.0), (10.0, 10.0, 30.0)):
        rates = MatmulRates(1.0, 1.0, 1.0, attention_float32=50.0, attention_bfloat16=50.0, attention_native=10.0)
        rates = dataclasses.replace(
            rates, step_float32=torch32, step_bfloat16=torch16, step_native=native, step_native_bfloat16=native
        )
        monkeypatch.setattr(host, "matmul_rates", lambda cache=None, rates=rates: rates)
        for dtype, rate in ((None, torch32), ("bfloat16", torch16)):
            assert host.native_attention_faster(cpu, dtype, step=True) == (NATIVE and native >= 1.1 * rate)
        assert not host.native_attention_faster(cpu, None)  # windows: not measured faster here


def test_host_rates_measure_attention():
    rates = host.best_rates(host.attention_calls(), repeats=1)
    assert rates["float32"] > 0 and rates["bfloat16"] > 0 and ("native" in rates) == NATIVE


def test_a_generation_steps_calls_agree():
    calls = host.attention_calls((4, 2, 70, 16), batch=2, step=True)
    outputs = {name: call().float() for name, (call, _) in calls.items()}
    assert outputs["float32"].shape == (2, 4, 1, 16)
    for name, out in outputs.items():  # bf16 inputs: their rounding only
        torch.testing.assert_close(out, outputs["float32"], rtol=0, atol=1e-5 if "bfloat16" not in name else 3e-2)
    assert ("native" in calls) == NATIVE and ("native_bfloat16" in calls) == NATIVE


@needs_native
def test_block_forwards_attend_natively_where_it_measured_faster(monkeypatch):
    calls = []
    original = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or original(*a))
    for faster in (True, False):
        chosen = NativeCausalAttention() if faster else contextlib.nullcontext()
        monkeypatch.setattr(pipeline, "native_attention", lambda device, dtype, chosen=chosen: chosen)
        model, ids = attention_model(), torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
        for dtype in (None, "bfloat16"):
            calls.clear()
            with torch.no_grad(), pipeline.forward_precision(dtype, torch.device("cpu")):
                model(input_ids=ids)
            assert len(calls) == (model.config.num_hidden_layers if faster else 0)


@needs_native
def test_scoring_attends_natively_in_every_precision(monkeypatch):
    from sparsegpt import perplexity

    calls = []
    original = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or original(*a))
    chosen = lambda device, dtype: NativeCausalAttention()  # noqa: E731 (as if measured faster)
    monkeypatch.setattr(pipeline, "native_attention", chosen)
    monkeypatch.setattr(perplexity, "native_attention", chosen)
    model, ids = attention_model(), torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    for precision in (None, "bfloat16", "split-bfloat16"):
        calls.clear()
        perplexity.perplexity(model, ids, batch_size=2, precision=precision)
        assert len(calls) == model.config.num_hidden_layers, precision


@needs_native
def test_generation_attends_natively_over_its_cache(monkeypatch):
    from sparsegpt import generation

    calls = []
    original = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda q, *a: calls.append(q.shape[2]) or original(q, *a))
    model, prompt = attention_model(), torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    assert model.config._attn_implementation == "sdpa"
    new = {}
    for native in (False, True):
        calls.clear()
        new[native], _, _ = generation.generate_ids(model, prompt, 12, stop_at_end=False, native_attention=native)
        assert model.config._attn_implementation == "sdpa"  # the model is handed back as it came
        # the prompt's forward, then each new token's over the cache (the last token is not fed back)
        layers = model.config.num_hidden_layers
        assert calls == ([30] * layers + [1] * (11 * layers) if native else [])
    assert torch.equal(new[True], new[False])  # greedy in float32: the same tokens
    layers = model.config.num_hidden_layers
    for windows, steps in ((False, False), (True, False), (False, True), (True, True)):
        # by default the prompt and the steps each as the host probe measured for them
        chosen = lambda device, dtype, step=False, w=windows, s=steps: s if step else w  # noqa: E731
        monkeypatch.setattr(generation, "native_attention_faster", chosen)
        calls.clear()
        generation.generate_ids(model, prompt, 3, stop_at_end=False)
        assert calls == [30] * layers * windows + [1] * (2 * layers) * steps


def test_models_that_do_not_attend_by_sdpa_are_left_alone():
    model = attention_model()
    model.set_attn_implementation("eager")
    with attention.native_attention_layers(model):
        assert model.config._attn_implementation == "eager"
