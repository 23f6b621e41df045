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
from sparsegpt.solver.masks import lowest_along, lowest_k, split_count
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


FACTORIZATIONS = ("reversed", "inverse")
"""How U is computed: "reversed" (the default; about 1.8x faster from width 4096 on, ``bench/throughput.py
--sections factorization``) or "inverse" (the reference code's sequence of operations, which
llmcompressor also follows: the same bits, so the same masks)."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, damp: float, factorization: str = "reversed", dead: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = damp · mean(diag H), so that H⁻¹ = UᵀU.

    "reversed" never forms H⁻¹: with P the order-reversing permutation and L the lower Cholesky factor of
    P(H + λI)P, H + λI = (PLP)(PLP)ᵀ with PLP upper triangular, so H⁻¹ = (PL⁻¹P)ᵀ(PL⁻¹P) and U = PL⁻¹P
    (the upper factor with a positive diagonal is unique): one factorization and one triangular inverse.
    "inverse" factorizes H, inverts it from its factor and factorizes the inverse, as the reference code
    does. Both are equally accurate (docs/RESULTS.md, "The solver alone"); they round differently.

    ``dead`` (cols,) marks inputs that never fired, whose diagonal counts as 1 (``prepare_hessian``; given
    here so that the caller needs no prepared copy of H). ``hessian`` is not modified: each attempt works
    on one copy of it, factorized and inverted in place ((cols, cols) matrices are the largest memory cost
    of pruning a wide layer).

    When a factorization fails the relative damping is multiplied by ten and the attempt repeated (each
    raise is logged); after ``DAMPING_STEPS`` failures a ``SparseGPTError`` is raised. Returns U and the
    relative damping that succeeded.
    """
    if factorization not in FACTORIZATIONS:
        raise SparseGPTError(f"factorization must be one of {', '.join(FACTORIZATIONS)}, got {factorization!r}")
    if not _all_finite(hessian):
        raise SparseGPTError("the Hessian has NaN or Inf entries (non-finite layer inputs)")
    diagonal = hessian.diagonal().clone()
    if dead is not None:
        diagonal[dead] = 1.0
    mean_diagonal = diagonal.mean()
    for step in range(DAMPING_STEPS + 1):
        upper = _upper_inverse_factor(hessian, diagonal + damp * mean_diagonal, factorization)
        if upper is not None and _all_finite(upper):
            return upper, damp
        if step < DAMPING_STEPS:
            log.warning("Cholesky factorization failed with damping %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise SparseGPTError(f"Hessian is not positive definite even with relative damping {damp:.3g}")


def _upper_inverse_factor(hessian: torch.Tensor, diagonal: torch.Tensor, factorization: str) -> torch.Tensor | None:
    """U with (H with ``diagonal``)⁻¹ = UᵀU (see ``inverse_hessian_cholesky``), or None where a
    factorization fails; in one working copy of H where the sequence allows."""
    if factorization == "reversed":
        work = hessian.flip(0, 1)  # P·H·P, a copy: the one matrix this factorization writes
        work.diagonal().copy_(diagonal.flip(0))
        if not _cholesky_in_place(work):
            return None
        invert_lower_triangular(work)
        reverse_in_place(work)
        return work
    work = hessian.clone()
    work.diagonal().copy_(diagonal)
    if not _cholesky_in_place(work):
        return None
    inverse = torch.cholesky_inverse(work)
    del work
    info = torch.empty((), dtype=torch.int32, device=inverse.device)
    torch.linalg.cholesky_ex(inverse, upper=True, out=(inverse, info))
    return inverse if info == 0 else None


def _cholesky_in_place(matrix: torch.Tensor) -> bool:
    """matrix (symmetric, row-major) ← its lower Cholesky factor L, without a second matrix; False where
    it is not positive definite. LAPACK works on column-major matrices, which torch copies a row-major
    one into; the transposed view of a symmetric matrix is that matrix in column-major order already, so
    it is factorized where it lies (the same routine on the same numbers: the same bits), leaving Lᵀ in
    row-major order, which is then transposed in place."""
    info = torch.empty((), dtype=torch.int32, device=matrix.device)
    column_major = matrix.T
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    if info != 0:
        return False
    transpose_in_place(matrix)
    return True


def transpose_in_place(matrix: torch.Tensor, tile: int = 256) -> None:
    """matrix ← matrixᵀ for a square matrix, swapping ``tile`` × ``tile`` blocks (torch's transposes are
    views, and a contiguous one is a copy)."""
    size = matrix.shape[0]
    for first in range(0, size, tile):
        rows = slice(first, first + tile)
        matrix[rows, rows] = matrix[rows, rows].T.clone()
        for second in range(first + tile, size, tile):
            columns = slice(second, second + tile)
            upper = matrix[rows, columns].clone()
            matrix[rows, columns] = matrix[columns, rows].T
            matrix[columns, rows] = upper.T


def reverse_in_place(matrix: torch.Tensor, rows: int = 256) -> None:
    """matrix ← P·matrix·P (entry (i, j) from (n−1−i, n−1−j)), ``rows`` rows at a time: without a second
    matrix (torch's ``flip`` copies)."""
    size = matrix.shape[0]
    for start in range(0, size // 2, rows):
        stop = min(start + rows, size // 2)
        top = matrix[start:stop].flip(0, 1)
        matrix[start:stop] = matrix[size - stop : size - start].flip(0, 1)
        matrix[size - stop : size - start] = top
    if size % 2:
        middle = matrix[size // 2]
        middle.copy_(middle.flip(0))


@dataclass(frozen=True)
class InverseFactor:
    """What the sweep needs of a Hessian: U with (H + λI)⁻¹ = UᵀU (H with its dead inputs given a unit
    diagonal, see ``prepare_hessian``), the relative damping that succeeded, and the dead inputs. Layers
    that read the same inputs (q/k/v, gate/up) share one."""

    upper: torch.Tensor
    damp: float
    dead: torch.Tensor


def inverse_factor(
    hessian: torch.Tensor, damp: float = 0.01, factorization: str = "reversed", dtype: torch.dtype = torch.float32
) -> InverseFactor:
    """Factorize ``hessian`` for ``sparsegpt_prune`` in ``dtype`` (see ``inverse_hessian_cholesky``)."""
    dead = hessian.diagonal() == 0
    upper, damp = inverse_hessian_cholesky(hessian.to(dtype), damp, factorization, dead)
    return InverseFactor(upper, damp, dead)


def lower_triangular_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ of a lower triangular matrix (a new one; ``invert_lower_triangular`` works in place)."""
    inverse = lower.clone()
    invert_lower_triangular(inverse, leaf)
    return inverse


def invert_lower_triangular(lower: torch.Tensor, leaf: int = 256) -> None:
    """lower ← L⁻¹ in place, by halves: [[A, 0], [C, B]]⁻¹ = [[A⁻¹, 0], [−B⁻¹CA⁻¹, B⁻¹]] (entries above
    the diagonal are read as zeros and left as they are).

    The off-diagonal block is two products with a triangular factor (``triangular_product``), so the
    whole inverse costs n³/3 floating-point operations, the least a triangular inverse needs (solving
    against the identity costs n³), mostly at the matrix-multiply rate; blocks of at most ``leaf`` rows
    are solved directly. Besides the matrix it holds about a quarter of one at a time."""
    size = lower.shape[0]
    if size <= leaf:
        identity = torch.eye(size, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, identity, upper=False))
        return
    half = size // 2
    first, second, corner = lower[:half, :half], lower[half:, half:], lower[half:, :half]
    invert_lower_triangular(first, leaf)  # A⁻¹
    invert_lower_triangular(second, leaf)  # B⁻¹
    # C·A⁻¹ = (A⁻ᵀ·Cᵀ)ᵀ with A⁻ᵀ upper triangular
    right = triangular_product(first.T, corner.T, lower=False).T
    corner.copy_(triangular_product(second, right).neg_())
    del right


def triangular_product(
    triangle: torch.Tensor, dense: torch.Tensor, lower: bool = True, leaf: int = 512
) -> torch.Tensor:
    """``triangle @ dense`` for a lower (or, with ``lower=False``, upper) triangular ``triangle``, by halves:
    the zero quarter of each level is never multiplied, so half the arithmetic of a full product.
    Products of at most ``leaf`` rows are taken whole (the zeros outside the triangle must be zeros)."""
    size = triangle.shape[0]
    if size <= leaf:
        return triangle @ dense
    half = size // 2
    out = torch.empty(size, dense.shape[1], dtype=dense.dtype, device=dense.device)
    top, bottom = out[:half], out[half:]
    top.copy_(triangular_product(triangle[:half, :half], dense[:half], lower, leaf))
    bottom.copy_(triangular_product(triangle[half:, half:], dense[half:], lower, leaf))
    if lower:  # [[A, 0], [C, B]]·[x; y] = [A·x; C·x + B·y]
        bottom.addmm_(triangle[half:, :half], dense[:half])
    else:  # [[A, C], [0, B]]·[x; y] = [A·x + C·y; B·y]
        top.addmm_(triangle[:half, half:], dense[half:])
    return out


def _all_finite(matrix: torch.Tensor, rows: int = 256) -> bool:
    """No NaN or infinity in ``matrix``: then (and only then, for float32 entries, whose float64 sum cannot
    overflow) the float64 sum is finite. One reading pass, ``rows`` rows at a time: torch widens the whole
    operand of a float64 sum first, a copy twice the matrix's size."""
    sums = [band.sum(dtype=torch.float64) for band in matrix.split(rows)]
    return bool(torch.isfinite(torch.stack(sums).sum()))


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | InverseFactor,
    sparsity: float,
    pattern: NMPattern | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    grid: QuantGrid | None = None,
    mask: torch.Tensor | None = None,
    factorization: str = "reversed",
) -> SolveResult:
    """Prune ``weight`` (rows, cols) given the Hessian (cols, cols) of its inputs, or its ``inverse_factor``
    (computed in the same precision; ``damp`` and ``factorization`` are then the factor's).

    Unstructured: each lazy block prunes its exact share of the whole layer's ``pruned_count``, chosen
    jointly over the block's rows and columns. With ``pattern`` (N:M), ``sparsity`` is ignored and the N
    weights of lowest saliency in every group of M inputs of each row are pruned. With ``mask`` (rows, cols,
    True = prune) the mask is given, not chosen, and the sweep only compensates. With ``grid``, kept
    weights are also quantized. ``factorization`` picks how U is computed (``inverse_hessian_cholesky``).
    Computes in float64 when ``weight`` is float64, else in float32.
    """
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows, cols = weight.shape
    if pattern is not None and (blocksize % pattern.m or cols % pattern.m):
        raise SparseGPTError(f"block size {blocksize} and input width {cols} must be multiples of M={pattern.m}")
    group = _check_groups(grid, cols, blocksize) if grid is not None else cols
    factor = hessian if isinstance(hessian, InverseFactor) else inverse_factor(hessian, damp, factorization, compute)
    inverse_cholesky, damp, dead = factor.upper.to(compute), factor.damp, factor.dead
    # W and its mask are held transposed, (cols, rows): the sweep reads and updates whole columns of W,
    # each then one contiguous vector, and a lazy block is a slice of rows
    columns = weight.T.to(compute, copy=True, memory_format=torch.contiguous_format)
    preset = mask
    if preset is None:
        column_mask = torch.zeros(cols, rows, dtype=torch.bool, device=weight.device)
    else:
        column_mask = preset.T.contiguous()
    scales = torch.zeros(rows, -(-cols // group), dtype=compute, device=weight.device)
    zeros = torch.zeros_like(scales)

    step = _sub_block(blocksize, pattern, grid, group)
    block_starts = list(range(0, cols, blocksize))
    block_counts = split_count(sparsity, [rows * min(blocksize, cols - start) for start in block_starts])
    for block_start, block_prune in zip(block_starts, block_counts):
        block_end = min(block_start + blocksize, cols)
        width = block_end - block_start
        block = columns[block_start:block_end]
        block_mask = column_mask[block_start:block_end]
        block_inverse = inverse_cholesky[block_start:block_end, block_start:block_end]
        block_errors = torch.zeros_like(block)
        diagonal = block_inverse.diagonal()
        if pattern is None and preset is None:
            # scores in W's own (row-major) order: equal scores go by position as everywhere else
            scores = (block.square() / diagonal.square().unsqueeze(1)).T
            block_mask.copy_(lowest_k(scores, block_prune).T)
        # A removed weight's error scaled by 1 / [U]_cc; kept weights (without a grid) carry none.
        prune_scale = block_mask / diagonal.unsqueeze(1)
        # Second level of laziness: a column's update goes at once only to the rest of its sub-block of
        # ``step`` columns; each finished sub-block updates the rest of the block in one matrix product.
        for sub_start in range(0, width, step):
            sub_end = min(sub_start + step, width)
            for column in range(sub_start, sub_end):
                if pattern is not None and preset is None and column % pattern.m == 0:
                    span = slice(column, column + pattern.m)
                    scores = block[span].square() / diagonal[span].square().unsqueeze(1)
                    block_mask[span] = lowest_along(scores, pattern.n, dim=0)
                    torch.div(block_mask[span], diagonal[span].unsqueeze(1), out=prune_scale[span])
                error = block_errors[column]
                if grid is None:
                    # the column keeps its value where kept (nothing to its right changes it any more)
                    torch.mul(block[column], prune_scale[column], out=error)
                else:
                    kept = _quantized(columns, block_start + column, block_mask[column], scales, zeros, grid, group)
                    torch.div(block[column] - kept, diagonal[column], out=error)
                    block[column] = kept
                block[column + 1 : sub_end].addr_(block_inverse[column, column + 1 : sub_end], error, alpha=-1.0)
            if sub_end < width:
                update = block_inverse[sub_start:sub_end, sub_end:].T
                block[sub_end:].addmm_(update, block_errors[sub_start:sub_end], alpha=-1.0)
        block.masked_fill_(block_mask, 0.0)
        tail = inverse_cholesky[block_start:block_end, block_end:]
        columns[block_end:].addmm_(tail.T, block_errors, alpha=-1.0)
    weight, mask = columns.T.contiguous(), column_mask.T.contiguous()
    if grid is None:
        return SolveResult(weight=weight, mask=mask, damp=damp, dead_inputs=int(dead.sum()))
    return SolveResult(weight, mask, damp, int(dead.sum()), scales, zeros)


SUB_BLOCK = 16
"""Columns per sub-block of the lazy block (see ``_sub_block``)."""


def _sub_block(blocksize: int, pattern: NMPattern | None, grid: QuantGrid | None, group: int) -> int:
    """The widest sub-block of at most ``SUB_BLOCK`` columns that keeps the sweep exact: an N:M group must
    not straddle two sub-blocks (its mask is chosen from its columns as they are at its first column), and
    a quantization group that starts inside a lazy block must start a sub-block (its grid is fitted on
    columns that must have received every update from the left). Without one, the whole lazy block."""
    for step in range(min(SUB_BLOCK, blocksize), 0, -1):
        whole_groups = pattern is None or step % pattern.m == 0
        aligned_grid = grid is None or group % blocksize == 0 or group % step == 0
        if whole_groups and aligned_grid:
            return step
    return blocksize


def _quantized(
    columns: torch.Tensor,
    column: int,
    pruned: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    grid: QuantGrid,
    group: int,
) -> torch.Tensor:
    """Column ``column`` of W (held transposed, (cols, rows)) rounded to its group's grid, ``pruned``
    weights zero; fits the grid where the sweep reaches the first column of a quantization group (whose
    columns have then received every update from the left, see ``_sub_block``)."""
    index, offset = divmod(column, group)
    if offset == 0:
        scales[:, index], zeros[:, index] = fit_grid(columns[column : column + group].T, grid)
    scale, zero = scales[:, index], zeros[:, index]
    rounded = dequantize(quantize(columns[column], scale, zero, grid.max_code), scale, zero)
    return rounded.masked_fill(pruned, 0.0)


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
