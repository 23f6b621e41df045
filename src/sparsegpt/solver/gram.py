"""G += XᵀX for the Hessians: on the upper block triangle only (XᵀX is symmetric), and for X in bfloat16
or float16 with G in float32 by a native mixed-precision product.

Products of two bf16 (or fp16) numbers are exact in float32, so what such a Gram matrix loses against
one computed from float32 inputs is only the rounding of X itself, and under a bf16 forward X is what
the layer multiplies anyway. torch has no CPU matrix product with 16-bit inputs and a float32 result
(``torch.mm`` rounds its output to the inputs' precision), but the MKL that torch's CPU build links
exports one (``cblas_gemm_bf16bf16f32``, ``cblas_gemm_f16f16f32``; on CPUs with AMX or AVX512-BF16 it
runs at several times the float32 rate). It is used where it exists; elsewhere the inputs are widened
and multiplied in float32, the same products summed in another order.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112
_ROUTINES = {torch.bfloat16: "cblas_gemm_bf16bf16f32", torch.float16: "cblas_gemm_f16f16f32"}


@functools.cache
def _routine(dtype: torch.dtype) -> Any:
    """MKL's 16-bit × 16-bit → float32 matrix product for ``dtype`` from torch's CPU library, or None."""
    name = _ROUTINES.get(dtype)
    library_path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if name is None or not library_path.exists():
        return None
    try:
        routine = getattr(ctypes.CDLL(str(library_path)), name)
    except (OSError, AttributeError):
        log.debug("no %s in torch's CPU library: 16-bit Gram matrices are multiplied in float32", name)
        return None
    integer, pointer = ctypes.c_int32, ctypes.c_void_p
    routine.restype = None
    routine.argtypes = [ctypes.c_int] * 3 + [integer] * 3 + [ctypes.c_float, pointer, integer, pointer, integer]
    routine.argtypes += [ctypes.c_float, pointer, integer]
    return routine


def native_mixed_gram(dtype: torch.dtype) -> bool:
    """Whether Gram matrices of ``dtype`` inputs are accumulated by the native float32-output product."""
    return _routine(dtype) is not None


_INT32_MAX = 2**31 - 1

TRIANGLE_BLOCKS = {torch.float32: 192, torch.bfloat16: 512, torch.float16: 512}
"""Width of the column blocks that split a Gram matrix for ``add_gram``, by the inputs' precision: the
narrower the blocks, the less arithmetic, but the slower each product. ``bench/throughput.py`` (4096
tokens, 2 threads, AVX-512/AMX Xeon): in float32 the triangle took 0.69 / 0.64 of the whole product's
time at 192 columns (widths 576 / 1536); the native bf16 product loses more on small blocks (1.01 / 0.81
at 512, 1.0-1.29 / 0.88-0.93 at 128-256)."""


def triangle_edges(width: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """Boundaries of the column blocks of a (width, width) Gram matrix of ``dtype`` inputs: near-equal
    blocks of about ``TRIANGLE_BLOCKS[dtype]`` columns (256 for other precisions), at least one."""
    count = max(1, round(width / TRIANGLE_BLOCKS.get(dtype, 256)))
    return [width * index // count for index in range(count + 1)]


def add_gram(gram: torch.Tensor, rows: torch.Tensor, edges: list[int] | None = None) -> None:
    """``gram += rowsᵀ rows`` in place, on the upper block triangle only; ``rows`` is (tokens, width).

    XᵀX is symmetric, so of its blocks (split at ``edges``, by default ``triangle_edges`` for the rows'
    precision) only those on and above the diagonal are computed: with k blocks, (k + 1) / 2k of the full
    product's arithmetic. The blocks below the diagonal are left as they are; ``mirror_gram`` (given the
    same edges) fills them in."""
    edges = triangle_edges(rows.shape[1], rows.dtype) if edges is None else edges
    for start, end in zip(edges, edges[1:]):
        add_product(gram[start:end, start:], rows[:, start:end], rows[:, start:])


def mirror_gram(gram: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """``gram`` (summed by ``add_gram`` with the same ``edges``) made whole, in place: each block below the
    diagonal becomes the transpose of its mirror image above it. Returns ``gram``."""
    for start, end in zip(edges, edges[1:]):
        gram[end:, start:end] = gram[start:end, end:].T
    return gram


def add_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``out += leftᵀ right`` in place, for ``left`` (tokens, m), ``right`` (tokens, n), ``out`` (m, n), any of
    them views with unit column stride or not.

    16-bit inputs with a float32 ``out`` on the CPU go to the native mixed-precision product where
    torch's library has it; every other combination multiplies in ``out``'s precision."""
    routine = _routine(left.dtype) if out.device.type == "cpu" and out.dtype == torch.float32 else None
    if routine is not None and right.dtype == left.dtype and left.shape[0] > 0:
        left, right = _row_major(left), _row_major(right)
        tokens, (m, n) = left.shape[0], out.shape
        (lda, ldb, ldc) = left.stride(0), right.stride(0), out.stride(0)
        if out.stride(1) == 1 and max(tokens * lda, tokens * ldb, m * ldc) <= _INT32_MAX:
            # row-major C (m × n) = 1·Aᵀ B + 1·C: A is (tokens × m), B (tokens × n)
            a, b, c = left.data_ptr(), right.data_ptr(), out.data_ptr()
            routine(_ROW_MAJOR, _TRANSPOSE, _NO_TRANSPOSE, m, n, tokens, 1.0, a, lda, b, ldb, 1.0, c, ldc)
            return
    out.addmm_(left.T.to(out.dtype), right.to(out.dtype))


def _row_major(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` itself when its rows are unit-stride vectors, else a contiguous copy."""
    return matrix if matrix.stride(1) == 1 and matrix.stride(0) >= matrix.shape[1] else matrix.contiguous()
