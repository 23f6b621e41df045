"""SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune a linear layer while keeping its outputs.

Rows of W (rows, cols) are pruned independently but share one sequence of inverse Hessians, read off the
upper Cholesky factor U of H⁻¹. Columns are visited left to right; each removed weight's error is spread
over the row's not-yet-visited weights (the OBS update), first inside a lazy block of columns and then, in
one matrix product, onto everything to the right of the block. The mask is chosen adaptively at the start
of each block (or of each N:M group) from the saliency w² / [U]²_cc.

Joint quantization (the paper's section 3.5) rides on the same sweep: each kept weight is rounded to its
group's grid as its column is visited, and the rounding error is compensated exactly like a pruning error
(with no pruning this is GPTQ). A group's grid is fitted when the sweep reaches the group's first column, on
the row's weights of that group as they are then, so it sees all compensation made so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.solver.masks import lowest_k, n_of_m, split_count
from sparsegpt.solver.quant import QuantGrid, dequantize, fit_grid, quantize

log = logging.getLogger(__name__)

DAMPING_STEPS = 6
"""How many times a failed factorization is retried, with ten times the damping each time."""


@dataclass(frozen=True)
class NMPattern:
    """Semi-structured sparsity: ``n`` of every ``m`` consecutive weights along a row's inputs are zero."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise SparseGPTError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        """Read ``"N:M"``, e.g. ``"2:4"``."""
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise SparseGPTError(f"pattern must look like N:M (e.g. 2:4), got {text!r}") from None
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass
class SolveResult:
    """A pruned weight (rows, cols), its mask (True = pruned) and the relative damping that was used.

    When quantized, ``scales`` and ``zeros`` (rows, groups) give each kept weight's grid.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    damp: float
    dead_inputs: int
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None


def prepare_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy H and give inputs that never fired (zero diagonal) a unit diagonal.

    Such an input cannot change the layer's outputs on the calibration data, so its weights carry no
    error information: with a unit diagonal (and no coupling) their removal is judged by magnitude alone
    and compensates nothing. Returns the copy and the boolean mask of dead inputs, shape (cols,).
    """
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    return hessian, dead


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), so that H⁻¹ = UᵀU.

    When a factorization fails the relative damping is multiplied by ten and the attempt repeated (each
    raise is logged); after ``DAMPING_STEPS`` failures a ``SparseGPTError`` is raised. Returns U and the
    relative damping that succeeded.
    """
    if not torch.isfinite(hessian).all():
        raise SparseGPTError("the Hessian has NaN or Inf entries (non-finite layer inputs)")
    diagonal = hessian.diagonal().clone()
    mean_diagonal = diagonal.mean()
    for step in range(DAMPING_STEPS + 1):
        # H + λI is formed in place (only the diagonal changes, and it is restored), and each
        # temporary is dropped once the next exists: (cols, cols) matrices are the largest memory cost
        # of pruning a wide layer
        hessian.diagonal().copy_(diagonal + damp * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(hessian)
        hessian.diagonal().copy_(diagonal)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0 and torch.isfinite(upper).all():
                return upper, damp
        if step < DAMPING_STEPS:
            log.warning("Cholesky factorization failed with damping %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise SparseGPTError(f"Hessian is not positive definite even with relative damping {damp:.3g}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    grid: QuantGrid | None = None,
    mask: torch.Tensor | None = None,
) -> SolveResult:
    """Prune ``weight`` (rows, cols) given the Hessian (cols, cols) of its inputs.

    Unstructured: each lazy block prunes its exact share of the whole layer's ``pruned_count``, chosen
    jointly over the block's rows and columns. With ``pattern`` (N:M), ``sparsity`` is ignored and the N
    weights of lowest saliency in every group of M inputs of each row are pruned. With ``mask`` (rows, cols,
    True = prune) the mask is given, not chosen, and the sweep only compensates. With ``grid``, kept
    weights are also quantized. Computes in float64 when ``weight`` is float64, else in float32.
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows, cols = weight.shape
    if pattern is not None and (blocksize % pattern.m or cols % pattern.m):
        raise SparseGPTError(f"block size {blocksize} and input width {cols} must be multiples of M={pattern.m}")
    group = _check_groups(grid, cols, blocksize) if grid is not None else cols
    hessian, dead = prepare_hessian(hessian.to(compute))
    inverse_cholesky, damp = inverse_hessian_cholesky(hessian, damp)
    weight = weight.to(compute).clone()
    preset = mask
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device) if preset is None else preset.clone()
    scales = torch.zeros(rows, -(-cols // group), dtype=compute, device=weight.device)
    zeros = torch.zeros_like(scales)

    block_starts = list(range(0, cols, blocksize))
    block_counts = split_count(sparsity, [rows * min(blocksize, cols - start) for start in block_starts])
    for block_start, block_prune in zip(block_starts, block_counts):
        block_end = min(block_start + blocksize, cols)
        block = weight[:, block_start:block_end].clone()
        block_mask = mask[:, block_start:block_end]
        block_inverse = inverse_cholesky[block_start:block_end, block_start:block_end]
        block_errors = torch.zeros_like(block)
        diagonal = block_inverse.diagonal()
        if pattern is None and preset is None:
            block_mask[:] = lowest_k(block.square() / diagonal.square(), block_prune)
        for column in range(block_end - block_start):
            if pattern is not None and preset is None and column % pattern.m == 0:
                span = slice(column, column + pattern.m)
                block_mask[:, span] = n_of_m(block[:, span].square() / diagonal[span].square(), pattern.n, pattern.m)
            kept = block[:, column].masked_fill(block_mask[:, column], 0.0)
            if grid is not None:
                index, offset = divmod(block_start + column, group)
                if offset == 0:  # the group starts here: its columns right of the block are up to date too
                    beyond = weight[:, block_end : block_start + column + group]
                    current = torch.cat([block[:, column : column + group], beyond], dim=1)
                    scales[:, index], zeros[:, index] = fit_grid(current, grid)
                scale, zero = scales[:, index], zeros[:, index]
                rounded = dequantize(quantize(kept, scale, zero, grid.max_code), scale, zero)
                kept = rounded.masked_fill(block_mask[:, column], 0.0)
            error = (block[:, column] - kept) / diagonal[column]
            block[:, column:].addr_(error, block_inverse[column, column:], alpha=-1.0)
            block[:, column] = kept
            block_errors[:, column] = error
        weight[:, block_start:block_end] = block
        weight[:, block_end:].addmm_(block_errors, inverse_cholesky[block_start:block_end, block_end:], alpha=-1.0)
    if grid is None:
        return SolveResult(weight=weight, mask=mask, damp=damp, dead_inputs=int(dead.sum()))
    return SolveResult(weight, mask, damp, int(dead.sum()), scales, zeros)


def _check_groups(grid: QuantGrid, cols: int, blocksize: int) -> int:
    """The group width; every group must start a lazy block or lie inside one, so that the weights it
    is fitted on have received every compensation from the columns left of it."""
    group = grid.group(cols)
    for start in range(0, cols, group):
        last = min(start + group, cols) - 1
        if start % blocksize and start // blocksize != last // blocksize:
            raise SparseGPTError(
                f"quantization group size {group} and block size {blocksize} do not align "
                "(one must be a multiple of the other)"
            )
    return group
