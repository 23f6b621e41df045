"""Joint sparsification + quantization: against the slow transcription, on the grid, exactly zero where pruned."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver import NMPattern, relative_output_error, sparsegpt_prune
from sparsegpt.solver.quant import QuantGrid, dequantize, fit_grid, quantize

from reference import problem, slow_sparsegpt


@pytest.mark.parametrize(
    "rows, cols, sparsity, pattern, blocksize, quant, dead",
    [
        (8, 48, 0.5, None, 16, (4, 8, False), ()),  # groups inside blocks
        (6, 40, 0.0, None, 16, (3, None, True), ()),  # plain GPTQ, one grid per row, ragged last block
        (10, 32, 0.5, (2, 4), 16, (4, 16, False), (5,)),  # 2:4 + 4 bit, a dead input
        (5, 64, 0.3, None, 16, (8, 32, True), ()),  # groups spanning two blocks
        (4, 48, 0.5, (4, 8), 8, (2, 48, False), ()),  # 4:8 + 2 bit, group = row
        (6, 40, 0.5, None, 8, (4, 16, False), ()),  # groups of 16, 16 and a ragged 8
        (5, 36, 0.5, (2, 4), 12, (4, 24, True), ()),  # a group of 24 spanning two blocks, then a ragged 12
        (6, 96, 0.5, None, 64, (4, 8, False), ()),  # groups of 8 inside blocks of 64: sub-blocks of 8
        (5, 72, 0.5, (2, 4), 72, (3, 24, False), ()),  # 2:4 with groups of 24: sub-blocks of 8
        (4, 60, 0.4, None, 60, (4, 12, True), ()),  # groups of 12: sub-blocks of 12
    ],
)
def test_joint_quantization_equals_slow_transcription(rows, cols, sparsity, pattern, blocksize, quant, dead):
    weight, hessian, _ = problem(rows, cols, dead=dead)
    grid = QuantGrid(*quant)
    result = sparsegpt_prune(weight, hessian, sparsity, NMPattern(*pattern) if pattern else None, blocksize, grid=grid)
    expected_weight, expected_mask = slow_sparsegpt(weight, hessian, sparsity, pattern, blocksize, quant=quant)
    assert torch.equal(result.mask, expected_mask)
    torch.testing.assert_close(result.weight, expected_weight, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(2, 8),
    group=st.sampled_from([None, 4, 8, 16, 24, 64]),
    symmetric=st.booleans(),
    sparsity=st.sampled_from([0.0, 0.5, 0.7]),
    seed=st.integers(0, 10_000),
)
def test_kept_weights_lie_on_their_grid_and_pruned_ones_are_zero(bits, group, symmetric, sparsity, seed):
    weight, hessian, _ = problem(6, 32, tokens=64, seed=seed)
    grid = QuantGrid(bits, group, symmetric)
    result = sparsegpt_prune(weight.float(), hessian.float(), sparsity, blocksize=16, grid=grid)
    assert result.scales is not None and result.zeros is not None
    width = grid.group(32)
    assert result.scales.shape == (6, grid.groups(32))
    scale = result.scales.repeat_interleave(width, dim=1)[:, :32]
    zero = result.zeros.repeat_interleave(width, dim=1)[:, :32]
    codes = quantize(result.weight, scale, zero, grid.max_code)
    on_grid = dequantize(codes, scale, zero).masked_fill(result.mask, 0.0)
    assert torch.equal(on_grid, result.weight)  # bit for bit: stored numbers determine every weight
    assert not result.weight[result.mask].any()
    assert int(result.mask.sum()) == int(sparsity * 6 * 32 + 0.5)
    assert torch.equal(result.scales.half().float(), result.scales)  # scales are float16 numbers
    assert torch.equal(result.zeros, result.zeros.round()) and result.zeros.min() >= 0
    assert result.zeros.max() <= grid.max_code


def test_grid_of_an_all_zero_group_represents_zero():
    scale, zero = fit_grid(torch.zeros(3, 8), QuantGrid(4))
    assert torch.equal(
        dequantize(quantize(torch.zeros(3, 8), scale[:, None], zero[:, None], 15), scale[:, None], zero[:, None]),
        torch.zeros(3, 8),
    )


def test_more_bits_and_compensation_both_lower_the_error():
    weight, hessian, _ = problem(32, 128, tokens=512, seed=5)
    errors = {
        bits: relative_output_error(
            weight, sparsegpt_prune(weight, hessian, 0.0, grid=QuantGrid(bits, 32)).weight, hessian
        )
        for bits in (3, 4, 8)
    }
    assert errors[8] < errors[4] < errors[3]
    grid = QuantGrid(4, 32)
    scales, zeros = fit_grid(weight.reshape(-1, 32), grid)
    nearest = dequantize(
        quantize(weight.reshape(-1, 32), scales[:, None], zeros[:, None], 15), scales[:, None], zeros[:, None]
    )
    assert errors[4] < relative_output_error(weight, nearest.reshape(weight.shape), hessian)  # GPTQ beats rounding


def test_bad_grids_are_refused():
    weight, hessian, _ = problem(4, 48)
    for bits in (1, 9):
        with pytest.raises(SparseGPTError, match="bits"):
            QuantGrid(bits)
    with pytest.raises(SparseGPTError, match="positive integer"):
        QuantGrid(4, 0)
    with pytest.raises(SparseGPTError, match="do not align"):
        sparsegpt_prune(weight, hessian, 0.5, blocksize=16, grid=QuantGrid(4, 24))
