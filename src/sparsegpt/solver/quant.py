"""Uniform quantization grids for joint sparsification + quantization (the paper's section 3.5, GPTQ-style).

A grid maps a weight w of one row and one group of ``group_size`` consecutive inputs to an integer code
c = clamp(round(w / s) + z, 0, 2^bits − 1) and back to (c − z) · s. Scales s are float16 numbers (what the
compact format stores) and zero points z are integers, so a dequantized weight is an exact function of
stored numbers, and a pruned weight (which stores no code) is exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparsegpt.errors import SparseGPTError

SCALE_DTYPE = torch.float16
"""The dtype scales are rounded to (and stored in)."""


@dataclass(frozen=True)
class QuantGrid:
    """``bits`` per weight; one (scale, zero point) per row and group of ``group_size`` consecutive inputs
    (None = the whole row; the last group may be shorter); ``symmetric`` grids are centred on zero (z = 2^(bits−1)), asymmetric ones span [min, max]."""

    bits: int
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SparseGPTError(f"bits must be between 2 and 8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise SparseGPTError(f"group size must be a positive integer, got {self.group_size}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def group(self, cols: int) -> int:
        """The group width for a layer with ``cols`` inputs. Groups run from the left; when the width
        does not divide ``cols`` the last group of each row is shorter (576 inputs in groups of 128:
        four of 128 and one of 64)."""
        return min(self.group_size or cols, cols)

    def groups(self, cols: int) -> int:
        """How many groups a row of ``cols`` inputs has."""
        return -(-cols // self.group(cols))

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"{self.bits}-bit {kind}, group {self.group_size or 'row'}"


def fit_grid(weights: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``weights`` (rows, group), from the row's range (which includes 0).

    Returns (scale, zero), each of shape (rows,) in ``weights``' dtype; scales are float16 values.
    """
    if grid.symmetric:
        bound = weights.abs().amax(dim=1)
        scale = 2 * bound / grid.max_code
        zero = torch.full_like(scale, float(2 ** (grid.bits - 1)))
    else:
        low = weights.amin(dim=1).clamp(max=0)
        high = weights.amax(dim=1).clamp(min=0)
        scale = (high - low) / grid.max_code
    if (scale > torch.finfo(SCALE_DTYPE).max).any():
        raise SparseGPTError("a quantization scale exceeds the float16 range (weights above 6e4)")
    scale = scale.to(SCALE_DTYPE).to(weights.dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    if not grid.symmetric:
        zero = torch.round(-low / scale).clamp(0, grid.max_code)
    return scale, zero


def quantize(weights: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int) -> torch.Tensor:
    """Integer codes (as floats) of ``weights`` on the grid; scale and zero broadcast against it."""
    return torch.clamp(torch.round(weights / scale) + zero, 0, max_code)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weights that codes stand for: (c − z) · s."""
    return (codes - zero) * scale


def group_views(matrix: torch.Tensor, group: int) -> Iterator[tuple[torch.Tensor, slice]]:
    """The column groups of a (rows, cols) matrix as (rows, k, width) views: the k full groups of ``group``
    columns, then the shorter last group if there is one; each with the slice of group indices it covers."""
    rows, cols = matrix.shape
    full = cols // group
    if full:
        yield matrix[:, : full * group].view(rows, full, group), slice(0, full)
    if cols % group:
        yield matrix[:, full * group :].view(rows, 1, cols % group), slice(full, full + 1)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """``dequantize`` of a whole (rows, cols) code matrix whose (rows, groups) float16 scales and integer
    zero points each cover ``group`` consecutive columns; float32.

    Computed as c·s − z·s, two passes instead of three: with codes and zero points below 2^8 and float16
    scales every product is exact in float32, so the difference is (c − z)·s exactly, rounded once."""
    values = codes.float()
    scales = scales.float()
    offsets = zeros.float().mul_(scales).neg_()
    for view, which in group_views(values, group):
        view.mul_(scales[:, which, None]).add_(offsets[:, which, None])
    return values
