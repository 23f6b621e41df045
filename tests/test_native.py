"""The native decoding kernel (_cdecode.c) against the numpy/torch reader: the same bits for every layout,
dtype and grid, with and without its AVX-512 loops, and the same refusals of bad entries."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.compact import QuantSpec, _kernel, decode_tensor, encode_tensor, native_decoding, same_bits
from sparsegpt.solver.quant import QuantGrid, dequantize_groups

DECODERS = {"vector": {"vector": True}, "portable": {"vector": False}, "python": {"native": False}}


def test_the_kernel_is_built_here():
    # `make setup` compiles it (a C compiler is part of this project's machines); without one the package
    # still installs and decodes in Python, only slower, so this is the test that notices a broken build
    assert native_decoding(), "sparsegpt._cdecode was not built: run `pip install -e .` and read its output"


def decoded_by_each(entry, parts, out_dtype=None):
    """The tensor each decoder makes of one entry (with ``out_dtype``: decoded into such a tensor)."""
    entry = json.loads(json.dumps(entry))
    results = {}
    for decoder, options in DECODERS.items():
        out = None if out_dtype is None else torch.full(entry["shape"], 7.0, dtype=out_dtype)
        results[decoder] = decode_tensor("w", entry, parts.__getitem__, out=out, **options)
    return results


def assert_all_decode_to(tensor, entry, parts, out_dtype=None):
    expected = tensor if out_dtype is None else tensor.to(out_dtype)
    for decoder, result in decoded_by_each(entry, parts, out_dtype).items():
        assert same_bits(result, expected), (decoder, entry)


def on_grid(rows, cols, bits, group, symmetric, dtype, keep, seed):
    """A (rows, cols) tensor whose kept entries (where ``keep``) lie on a random grid, and that grid."""
    generator = torch.Generator().manual_seed(seed)
    grid = QuantGrid(bits, group, symmetric)
    groups = grid.groups(cols)
    scales = (torch.rand(rows, groups, generator=generator) * 0.1 + 1e-3).half()
    zeros = torch.randint(0, 2**bits, (rows, groups), generator=generator).to(torch.uint8)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=generator).to(torch.uint8)
    width = grid.group(cols)
    codes = torch.where(keep, codes, zeros.repeat_interleave(width, dim=1)[:, :cols])
    values = dequantize_groups(codes, scales, zeros, width).to(dtype)
    return values, QuantSpec(grid, scales, zeros)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    share=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]),
    seed=st.integers(0, 10_000),
)
def test_bitmask_values_decode_the_same(rows, cols, share, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(rows, cols, generator=generator) * 50).to(dtype)
    tensor[torch.rand(rows, cols, generator=generator) < share] = 0
    if dtype.is_floating_point and tensor.numel() > 1:
        tensor.view(-1)[1] = -0.0  # a stored bit pattern, not a pruned entry
    entry, parts = encode_tensor("w", tensor, patterns=())
    assert_all_decode_to(tensor, entry, parts)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(1, 300),
    bits=st.integers(2, 8),
    group=st.sampled_from([None, 7, 8, 32, 128]),
    symmetric=st.booleans(),
    share=st.sampled_from([0.0, 0.5, 0.8]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 10_000),
)
def test_quantized_entries_decode_the_same(rows, cols, bits, group, symmetric, share, dtype, seed):
    keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed + 1)) >= share
    tensor, quant = on_grid(rows, cols, bits, group, symmetric, dtype, keep, seed)
    entry, parts = encode_tensor("w", tensor, quant, patterns=())
    assert entry["encoding"] in ("full", "bitmask")  # whichever is smaller
    assert_all_decode_to(tensor, entry, parts)


@pytest.mark.parametrize("seed", [4740, *range(12)])  # 4740: the case hypothesis found
def test_bf16_weights_on_a_grid_finer_than_bf16_encode_exactly(seed):
    # 8-bit codes with scales up to 0.1 reach |w| ≈ 25, where bf16's spacing (0.125) is wider than the
    # grid's: a stored value's nearest grid point need not be the one it was rounded from
    tensor, quant = on_grid(7, 92, 8, None, False, torch.bfloat16, torch.ones(7, 92, dtype=torch.bool), seed)
    entry, parts = encode_tensor("w", tensor, quant, patterns=())
    assert_all_decode_to(tensor, entry, parts)


def test_weights_off_their_grid_are_refused():
    tensor, quant = on_grid(5, 64, 4, 32, False, torch.float32, torch.ones(5, 64, dtype=torch.bool), 1)
    tensor[0, 0] += quant.scales[0, 0].float() * 0.37
    with pytest.raises(SparseGPTError, match="not on the quantization grid"):
        encode_tensor("w", tensor, quant, patterns=())


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (6, 8), (5, 8)])
@pytest.mark.parametrize("bits", [None, 4, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nm_entries_decode_the_same(n, m, bits, dtype):
    rows, cols = 5, 4 * m * 3
    generator = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.rand(rows, cols // m, m, generator=generator)
    keep = torch.ones_like(scores, dtype=torch.bool).scatter(2, scores.argsort(dim=2)[:, :, :n], False)
    keep = keep.reshape(rows, cols)
    if bits is None:
        tensor = torch.where(keep, torch.randn(rows, cols, generator=generator), 0.0).to(dtype)
        entry, parts = encode_tensor("w", tensor, patterns=((n, m),))
    else:
        tensor, quant = on_grid(rows, cols, bits, 16, False, dtype, keep, n * m)
        entry, parts = encode_tensor("w", tensor, quant, patterns=((n, m),))
    if n >= m // 2:  # otherwise storing every code can be smaller
        assert entry["encoding"] == "nm" and entry["m"] == m
    assert_all_decode_to(tensor, entry, parts)


def test_decoding_into_another_dtype_and_transposed_matches():
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(24, 40, generator=generator).bfloat16()
    tensor[torch.rand(24, 40, generator=generator) < 0.5] = 0
    entry, parts = encode_tensor("w", tensor)
    assert_all_decode_to(tensor, entry, parts, out_dtype=torch.float32)
    keep = torch.rand(40, 24, generator=generator) < 0.5
    matrix, quant = on_grid(40, 24, 4, 8, False, torch.float16, keep, 5)
    quant.transposed = True
    entry, parts = encode_tensor("w", matrix.T.contiguous(), quant)
    assert entry["transposed"]
    assert_all_decode_to(matrix.T.contiguous(), entry, parts)
    assert_all_decode_to(matrix.T.contiguous(), entry, parts, out_dtype=torch.float32)


def test_non_finite_scales_decode_as_torch_does():
    # the kernel leaves these to the Python reader (NaN payloads), which must still be what is stored
    _, quant = on_grid(2, 8, 4, None, False, torch.float32, torch.ones(2, 8, dtype=torch.bool), 0)
    quant.scales[1, 0] = float("inf")
    tensor = dequantize_groups(torch.full((2, 8), 3, dtype=torch.uint8), quant.scales, quant.zeros, 8)
    entry, parts = encode_tensor("w", tensor, quant)
    assert_all_decode_to(tensor, entry, parts)


def edited(entry, parts, part, change):
    parts = dict(parts)
    parts[part] = change(parts[part].clone())
    return json.loads(json.dumps(entry)), parts


@pytest.mark.parametrize("decoder", DECODERS)
def test_bad_entries_are_refused_alike(decoder):
    options = DECODERS[decoder]
    tensor = torch.randn(4, 16).masked_fill(torch.arange(16) % 3 == 0, 0.0)
    entry, parts = encode_tensor("w", tensor, patterns=())
    entry_wrong, parts_wrong = edited(entry, parts, "w::mask", lambda mask: mask.index_fill_(0, torch.tensor([0]), 0))
    with pytest.raises(SparseGPTError, match="w: the mask marks"):
        decode_tensor("w", entry_wrong, parts_wrong.__getitem__, **options)
    nm = torch.randn(4, 16).masked_fill(torch.arange(16) % 4 < 2, 0.0)
    entry, parts = encode_tensor("w", nm, patterns=((2, 4),))
    # positions 3, 2 (two bits each): not increasing
    entry_wrong, parts_wrong = edited(entry, parts, "w::positions", lambda positions: positions.fill_(0b1011))
    with pytest.raises(SparseGPTError, match="w: in-group positions are out of range or not strictly increasing"):
        decode_tensor("w", entry_wrong, parts_wrong.__getitem__, **options)


def rounded_by_kernel(values: torch.Tensor, kind: int) -> torch.Tensor:
    out = torch.empty(values.numel(), dtype=torch.int16)
    _kernel().sgpt_round(values.data_ptr(), out.data_ptr(), values.numel(), kind)
    return out


@pytest.mark.parametrize("kind, dtype", [(1, torch.bfloat16), (2, torch.float16)])
def test_rounding_to_half_precision_matches_torch(kind, dtype):
    generator = np.random.default_rng(0)
    patterns = generator.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    # every float16 neighbourhood: exact halves, ties, subnormals, overflow to infinity, NaN
    special = np.arange(0, 2**16, dtype=np.uint32) << 13
    special = np.concatenate([special, special + (1 << 12), special + (1 << 12) + 1, special - 1])
    special = np.concatenate([special, special | np.uint32(1 << 31)])
    values = torch.from_numpy(np.concatenate([patterns, special]).view(np.float32).copy())
    finite = torch.isfinite(values) | torch.isinf(values)
    ours = rounded_by_kernel(values[finite], kind)
    assert torch.equal(ours, values[finite].to(dtype).view(torch.int16))
    nan = rounded_by_kernel(values[~finite], kind).view(dtype)
    assert bool(torch.isnan(nan).all())
