"""The sparse runtime: kernels against the decoded weight (every encoding, dtype, shape and instruction
set), sparse modules against dense layers, and whole models run from their compact form."""

import json

import pytest
import torch
import torch.nn.functional as F

import sparsegpt
from sparsegpt.api import quant_specs
from sparsegpt.cli import main
from sparsegpt.config import PruneConfig
from sparsegpt.formats.compact import (
    QuantSpec,
    decode_tensor,
    encode_tensor,
    matrix_view,
    pack_folder,
    read_manifest,
    read_stored,
    write_quant_sidecar,
)
from sparsegpt.perplexity import perplexity
from sparsegpt.pipeline import prune_model
from sparsegpt.runtime import kernels
from sparsegpt.runtime.linear import DECODE_TOKENS, PackedWeight, SparseLinear
from sparsegpt.runtime.model import sparse_modules, weight_bytes
from sparsegpt.solver import NMPattern
from sparsegpt.solver.quant import QuantGrid, dequantize_groups

from tiny import VOCAB, tiny_model, tiny_tokenizer

ISAS = kernels.available_isas()


def pruned(shape, dtype, pattern=None, sparsity=0.5, seed=0):
    """A random tensor with about ``sparsity`` of its entries zero, or N:M along its last dimension."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(shape, generator=generator).to(dtype)
    if pattern is None:
        tensor[torch.rand(shape, generator=generator) < sparsity] = 0
    else:
        n, m = pattern
        groups = tensor.view(-1, m)
        smallest = groups.float().abs().argsort(dim=1)[:, :n]
        groups.scatter_(1, smallest, 0)
    return tensor


def quantized(rows, cols, dtype, bits, group_size, sparsity=0.5, pattern=None, seed=0):
    """A (rows, cols) weight on a random quantization grid, pruned; and its QuantSpec."""
    generator = torch.Generator().manual_seed(seed)
    grid = QuantGrid(bits, group_size, False)
    group, groups = grid.group(cols), grid.groups(cols)
    scales = (torch.rand(rows, groups, generator=generator) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=generator).to(torch.uint8)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=generator).to(torch.uint8)
    if pattern is None:
        drop = torch.rand(rows, cols, generator=generator) < sparsity
    else:
        n, m = pattern
        drop = torch.zeros(rows, cols // m, m, dtype=torch.bool)
        drop.scatter_(2, torch.rand(rows, cols // m, m, generator=generator).argsort(dim=2)[:, :, :n], True)
        drop = drop.view(rows, cols)
    codes[drop] = zeros.repeat_interleave(group, dim=1)[:, :cols][drop]
    weight = dequantize_groups(codes, scales, zeros, group).to(dtype)
    return weight, QuantSpec(grid, scales, zeros)


CASES = {
    "bitmask-bf16": lambda: (pruned((64, 96), torch.bfloat16), None),
    "bitmask-fp32-cols%8": lambda: (pruned((50, 40), torch.float32), None),
    "bitmask-fp16-odd": lambda: (pruned((17, 100), torch.float16), None),
    "bitmask-bf16-70%": lambda: (pruned((32, 256), torch.bfloat16, sparsity=0.7), None),
    "2:4-bf16": lambda: (pruned((48, 128), torch.bfloat16, pattern=(2, 4)), None),
    "4:8-fp32": lambda: (pruned((24, 64), torch.float32, pattern=(4, 8)), None),
    "2:4-fp16-cols%8": lambda: (pruned((8, 40), torch.float16, pattern=(2, 4)), None),
    "q4-g32-bf16": lambda: quantized(64, 128, torch.bfloat16, 4, 32),
    "q4-g128-ragged-bf16": lambda: quantized(32, 320, torch.bfloat16, 4, 128),
    "q4-g64-ragged-cols%32": lambda: quantized(20, 200, torch.bfloat16, 4, 64),
    "q8-g32-fp16": lambda: quantized(16, 96, torch.float16, 8, 32),
    "q3-row-bf16": lambda: quantized(32, 192, torch.bfloat16, 3, None),
    "q4-g64-2:4-fp32": lambda: quantized(40, 128, torch.float32, 4, 64, pattern=(2, 4)),
    "q4-g64-2:4-bf16": lambda: quantized(40, 192, torch.bfloat16, 4, 64, pattern=(2, 4)),
    "q4-g128-90%-bf16": lambda: quantized(24, 384, torch.bfloat16, 4, 128, sparsity=0.9),
    "q4-dense-bf16": lambda: quantized(64, 256, torch.bfloat16, 4, 128, sparsity=0.0),
    "q4-70%-fp16": lambda: quantized(33, 160, torch.float16, 4, 32, sparsity=0.7),
}


def packed_case(name):
    """(PackedWeight, the dense-decoded (rows, cols) matrix) of one case."""
    weight, quant = CASES[name]()
    entry, parts = encode_tensor("w", weight, quant)
    assert entry["encoding"] != "plain"
    packed = PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__))
    decoded = decode_tensor("w", entry, parts.__getitem__)
    return packed, matrix_view(decoded, bool(entry["transposed"]))


def rounding_bound(inputs, matrix):
    """What float32 summation may differ by, per output: a few units of rounding times the sum of |terms|."""
    return 4 * 2.0**-24 * matrix.shape[1] * (inputs.double().abs() @ matrix.double().abs().T) + 1e-30


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_products_equal_the_decoded_weight_to_float32_rounding(name, isa):
    packed, matrix = packed_case(name)
    for count in (1, 3, 5, 9):
        inputs = torch.randn(count, packed.cols, generator=torch.Generator().manual_seed(count))
        if isa == kernels.AVX512_BF16:
            inputs = inputs.bfloat16()
        expected = inputs.double() @ matrix.double().T
        out = packed.matvec(inputs, isa=isa)
        assert out.dtype == torch.float32 and out.shape == (count, packed.rows)
        assert ((out.double() - expected).abs() <= rounding_bound(inputs, matrix)).all(), name


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("isa", ISAS)
def test_dense_tiles_are_the_decoded_rows_bit_for_bit(name, isa):
    packed, matrix = packed_case(name)
    first, last = 3, packed.rows - 1
    for dtype in (matrix.dtype, torch.float32):
        tile = packed.densify(first, last, dtype, isa=isa)
        assert torch.equal(tile, matrix[first:last].to(dtype)), (name, dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_the_torch_reference_decodes_bit_for_bit(name):
    assert ISAS, "the native kernels were not built (make setup builds them; see pyproject.toml)"
    packed, matrix = packed_case(name)
    assert torch.equal(packed.dense(), matrix)


@pytest.mark.parametrize("name", ["bitmask-bf16", "2:4-bf16", "4:8-fp32", "q4-g128-ragged-bf16", "q4-dense-bf16"])
def test_without_the_native_kernels_the_torch_path_computes_the_same(name, monkeypatch):
    weight, quant = CASES[name]()
    entry, parts = encode_tensor("w", weight, quant)
    native = PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__))
    monkeypatch.setattr(kernels, "library", lambda: None)
    fallback = PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__))
    assert torch.equal(fallback.offsets, native.offsets)
    assert native.mask is None or torch.equal(fallback.mask, native.mask)
    inputs = torch.randn(3, native.cols)
    matrix = native.dense()
    assert (
        (fallback.matvec(inputs).double() - inputs.double() @ matrix.double().T).abs() <= rounding_bound(inputs, matrix)
    ).all()
    assert torch.equal(fallback.densify(1, native.rows, torch.float32), matrix[1:].float())


def test_transposed_conv1d_and_expert_bank_weights():
    # GPT-2's Conv1D stores (in, out) and is quantized along `in`: the matrix is the transpose
    matrix, spec = quantized(48, 64, torch.float32, 4, 32)
    spec.transposed = True
    entry, parts = encode_tensor("w", matrix.T.contiguous(), spec)
    assert entry["transposed"]
    packed = PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__))
    assert (packed.rows, packed.cols) == (48, 64)
    assert torch.equal(packed.densify(0, 48, torch.float32), matrix)
    # a bank of experts (E, out, in) is E·out rows; expert e is a band of them
    bank = pruned((4, 16, 64), torch.bfloat16)
    entry, parts = encode_tensor("bank", bank)
    packed = PackedWeight.from_stored(read_stored("bank", entry, parts.__getitem__))
    inputs = torch.randn(2, 64)
    for expert in range(4):
        band = packed.densify(16 * expert, 16 * (expert + 1), torch.bfloat16)
        assert torch.equal(band, bank[expert])
    out = packed.matvec(inputs)
    assert torch.allclose(out, inputs @ bank.reshape(64, 64).float().T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, DECODE_TOKENS, DECODE_TOKENS + 1, 40])
def test_sparse_linear_is_a_dense_linear(dtype, tokens):
    packed, matrix = packed_case("q4-g32-bf16" if dtype == torch.bfloat16 else "bitmask-fp32-cols%8")
    bias = torch.randn(packed.rows).to(dtype)
    layer = SparseLinear(packed, bias)
    inputs = torch.randn(2, tokens, packed.cols).to(dtype)
    with torch.no_grad():
        out = layer(inputs)
    expected = F.linear(inputs.double(), matrix.double(), bias.double())
    assert out.dtype == dtype and out.shape == (2, tokens, packed.rows)
    tolerance = 2.0**-7 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_invalid_nm_positions_are_refused():
    weight = pruned((8, 32), torch.float32, pattern=(2, 4))
    entry, parts = encode_tensor("w", weight)
    parts["w::positions"] = torch.full_like(parts["w::positions"], 0xFF)  # every position 3: not increasing
    with pytest.raises(sparsegpt.SparseGPTError, match="not strictly increasing"):
        PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__))


def test_sparse_modules_refuse_gradients():
    packed, _ = packed_case("bitmask-bf16")
    with pytest.raises(sparsegpt.SparseGPTError, match="torch.no_grad"):
        SparseLinear(packed)(torch.randn(1, packed.cols, requires_grad=True))


# --- whole models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Compact and plain folders of tiny pruned models: 50% bf16, 2:4 fp32, 50% + 4 bit fp16, dense 3-bit
    GPTQ fp32, and a GPT-2 (Conv1D) at 2:4 + 4 bit."""
    root = tmp_path_factory.mktemp("runtime")
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    made = {}
    for name, arch, config, dtype in [
        ("half-bf16", "llama", PruneConfig(blocksize=16), torch.bfloat16),
        ("2:4-fp32", "llama", PruneConfig(pattern=NMPattern(2, 4), blocksize=16), torch.float32),
        ("quant-fp16", "qwen2", PruneConfig(blocksize=16, bits=4, group_size=16), torch.float16),
        ("gptq-fp32", "llama", PruneConfig(sparsity=0.0, blocksize=16, bits=3, symmetric=True), torch.float32),
        ("gpt2", "gpt2", PruneConfig(pattern=NMPattern(2, 4), blocksize=16, bits=4), torch.float32),
    ]:
        model = tiny_model(arch, dtype=dtype)
        records = prune_model(model, config, calibration)
        plain = root / f"{name.replace(':', '-')}-plain"
        model.save_pretrained(plain)
        tiny_tokenizer().save_pretrained(plain)
        if config.bits:
            write_quant_sidecar(plain, quant_specs(model, records, config))
        pack_folder(plain, root / name.replace(":", "-"))
        made[name] = (plain, root / name.replace(":", "-"))
    return made


MODELS = ["half-bf16", "2:4-fp32", "quant-fp16", "gptq-fp32", "gpt2"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["compact", "plain"])
def test_a_sparse_model_computes_what_its_decoded_model_does(folders, name, which):
    plain, packed = folders[name]
    folder = packed if which == "compact" else plain
    dense = sparsegpt.load_pretrained(packed)
    sparse = sparsegpt.load_pretrained(folder, runtime="sparse")
    modules = sparse_modules(sparse)
    assert modules, "no sparse module"
    for _, module in modules:  # nothing the size of the dense weight is held
        assert all(
            tensor.numel() < module.in_features * module.out_features
            for tensor in (module.weight_packed.values, module.weight_packed.codes)
            if tensor is not None
        )
    stored_sparse = {
        key.removesuffix(".weight")
        for key, entry in read_manifest(packed)["tensors"].items()
        if key.endswith(".weight") and len(entry["shape"]) == 2 and entry["encoding"] != "plain"
    }
    assert {path for path, _ in modules} == stored_sparse  # every pruned linear, and nothing else
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    dtype = next(dense.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for length in (24, 4):  # many tokens (a decoded copy), few (the sparse product)
        expected, got = logits(dense, ids[:, :length]), logits(sparse, ids[:, :length])
        assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()), length


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_models_run_with_their_banks_dense(tmp_path, arch):
    # the experts, stored one tensor each, are fused into banks as transformers does (decoded: the runtime
    # has no sparse module for a bank); the attention's and the shared expert's pruned linears run sparse
    model = tiny_model(arch)
    prune_model(model, PruneConfig(blocksize=16), torch.randint(0, VOCAB, (4, 16)))
    model.save_pretrained(tmp_path / "plain")
    pack_folder(tmp_path / "plain", tmp_path / "compact")
    ids = torch.randint(0, VOCAB, (1, 12))
    for folder in (tmp_path / "compact", tmp_path / "plain"):
        sparse = sparsegpt.load_pretrained(folder, runtime="sparse")
        assert sparse_modules(sparse)
        assert not any(".experts." in name for name, _ in sparse_modules(sparse))
        assert torch.allclose(logits(sparse, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["2:4-fp32", "gptq-fp32", "gpt2"])
def test_greedy_generation_is_identical_in_float32(folders, name):
    _, packed = folders[name]
    dense = sparsegpt.load_pretrained(packed)
    sparse = sparsegpt.load_pretrained(packed, runtime="sparse")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(dense.generate(prompt, **options), sparse.generate(prompt, **options))


def test_sampling_and_the_timed_generation(folders):
    _, packed = folders["half-bf16"]
    sparse = sparsegpt.load_pretrained(packed, runtime="sparse")
    tokenizer = tiny_tokenizer()
    result = sparsegpt.generate(sparse, tokenizer, "the quick brown", max_new_tokens=8, temperature=1.0)
    again = sparsegpt.generate(sparse, tokenizer, "the quick brown", max_new_tokens=8, temperature=1.0)
    assert result.text == again.text and 1 <= result.new_tokens <= 8
    assert result.prefill_speed > 0 and result.prefill_seconds > 0


def test_perplexity_through_the_sparse_runtime_is_within_a_thousandth(folders):
    _, packed = folders["2:4-fp32"]
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))
    dense = perplexity(sparsegpt.load_pretrained(packed), windows)
    sparse = perplexity(sparsegpt.load_pretrained(packed, runtime="sparse"), windows)
    assert abs(sparse - dense) <= 1e-3 * dense


def test_resident_weights_are_no_larger_than_the_compact_files(folders):
    _, packed = folders["half-bf16"]
    stored = sum(path.stat().st_size for path in packed.glob("compact-*.safetensors"))
    assert weight_bytes(sparsegpt.load_pretrained(packed, runtime="sparse")) <= 1.05 * stored


def test_a_sparse_model_refuses_to_save_without_its_weights(folders, tmp_path):
    sparse = sparsegpt.load_pretrained(folders["half-bf16"][1], runtime="sparse")
    with pytest.raises(sparsegpt.SparseGPTError, match="no dense weights to save"):
        sparse.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy" / "model.safetensors").exists()


def test_a_corrupted_compact_folder_is_refused_naming_the_tensor(folders, tmp_path):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(folders["2:4-fp32"][1], folder)
    data = next(folder.glob("compact-*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(sparsegpt.SparseGPTError, match="CRC32 mismatch"):
        sparsegpt.load_pretrained(folder, runtime="sparse")


def test_an_unknown_runtime_is_refused(folders):
    with pytest.raises(sparsegpt.SparseGPTError, match="unknown runtime"):
        sparsegpt.load_pretrained(folders["half-bf16"][1], runtime="fast")


# --- command line ---------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main(["-q", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_prints_the_text_and_the_speeds(folders, capsys):
    _, packed = folders["half-bf16"]
    code, out, err = run(capsys, "generate", str(packed), "--prompt", "the quick", "--max-new-tokens", "5")
    assert code == 0 and "prefill" in err and "decode" in err and "tokens/s" in err
    code, out, _ = run(capsys, "generate", str(packed), "--runtime", "sparse", "--prompt", "the quick", "--json")
    result = json.loads(out)
    assert code == 0 and result["new_tokens"] >= 1 and result["decode_tokens_per_s"] > 0


def test_eval_through_the_sparse_runtime_scores_what_the_dense_one_does(folders, capsys, tmp_path):
    _, packed = folders["2:4-fp32"]
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    scores = []
    for runtime in ("dense", "sparse"):
        code, out, _ = run(
            capsys, "eval", str(packed), "--data", str(text), "--seqlen", "32", "--runtime", runtime, "--json"
        )
        assert code == 0
        scores.append(json.loads(out)["ppl"])
    assert abs(scores[1] - scores[0]) <= 1e-3 * scores[0]


def test_the_sparse_runtime_refuses_what_it_cannot_run(folders, capsys, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    code, _, err = run(capsys, "generate", str(gguf), "--runtime", "sparse", "--prompt", "x")
    assert code == 2 and err.count("\n") == 1 and "model folder" in err
    code, _, err = run(capsys, "generate", str(folders["half-bf16"][1]), "--prompt", "x", "--max-new-tokens", "0")
    assert code == 2 and "max-new-tokens" in err
