"""G += XᵀX for the Hessians: on the upper triangle only (XᵀX is symmetric), and for X in bfloat16 or
float16 with G in float32 by a native mixed-precision product.

For float32 (and float64) X on the CPU the upper triangle is one symmetric rank-k update, MKL's ``?syrk``,
which does exactly the triangle's arithmetic at about the matrix-multiply rate. torch does not expose it,
and the MKL in torch's CPU library exports it only under its internal name (``mkl_blas_ssyrk``, with the
Fortran BLAS calling convention); it is therefore checked against a plain product on first use and
replaced by the block triangle below wherever it is missing or disagrees.

Products of two bf16 (or fp16) numbers are exact in float32, so what such a Gram matrix loses against
one computed from float32 inputs is only the rounding of X itself, and under a bf16 forward X is what
the layer multiplies anyway. torch has no CPU matrix product with 16-bit inputs and a float32 result
(``torch.mm`` rounds its output to the inputs' precision), but the MKL that torch's CPU build links
exports one (``cblas_gemm_bf16bf16f32``, ``cblas_gemm_f16f16f32``). On Intel CPUs with AMX it runs at
several times the float32 rate, but MKL picks its code by the processor's vendor: on AMD EPYC
(AVX512-BF16) that routine runs only at the float32 rate, and MKL's float32 rank-k update at about half
of what AVX-512 reaches. Hence a second backend, "native": the AVX-512 kernels of _gram.c (one register
tile of dot products or fused multiply-adds; for bf16, exact products summed in float32), for Gram
matrices of bf16 and float32 inputs and for bf16 linear products. Which backend is faster is a fact of
the host, measured outside the solver (``host.product_backend``) and passed in; "mkl" is the default.
Where neither applies the inputs are widened and multiplied in float32, the same products summed in
another order.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE = 101, 111, 112
_ROUTINES = {torch.bfloat16: "cblas_gemm_bf16bf16f32", torch.float16: "cblas_gemm_f16f16f32"}


def _library_symbol(name: str | None) -> Any:
    """The function ``name`` exported by torch's CPU library (its MKL), or None."""
    library_path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if name is None or not library_path.exists():
        return None
    try:
        return getattr(ctypes.CDLL(str(library_path)), name)
    except (OSError, AttributeError):
        log.debug("no %s in torch's CPU library", name)
        return None


@functools.cache
def _routine(dtype: torch.dtype) -> Any:
    """MKL's 16-bit × 16-bit → float32 matrix product for ``dtype`` from torch's CPU library, or None
    (then 16-bit Gram matrices are multiplied in float32)."""
    routine = _library_symbol(_ROUTINES.get(dtype))
    if routine is None:
        return None
    integer, pointer = ctypes.c_int32, ctypes.c_void_p
    routine.restype = None
    routine.argtypes = [ctypes.c_int] * 3 + [integer] * 3 + [ctypes.c_float, pointer, integer, pointer, integer]
    routine.argtypes += [ctypes.c_float, pointer, integer]
    return routine


_SYRK_ROUTINES = {torch.float32: ("mkl_blas_ssyrk", ctypes.c_float), torch.float64: ("mkl_blas_dsyrk", ctypes.c_double)}


@functools.cache
def _syrk(dtype: torch.dtype) -> Any:
    """``C += AᵀA`` on C's upper triangle for row-major float32/float64 A (tokens, n) and C (n, n), by MKL's
    symmetric rank-k update from torch's CPU library, as a function ``(out, rows) -> None``; None where
    the routine is missing or fails its check against a plain product (then ``add_gram`` sums the
    upper block triangle)."""
    name, scalar = _SYRK_ROUTINES.get(dtype, (None, ctypes.c_float))
    routine = _library_symbol(name)
    if routine is None:
        return None
    routine.restype = None

    def update(out: torch.Tensor, rows: torch.Tensor) -> None:
        # Row-major (tokens, n) A is column-major Aᵀ (n, tokens), and row-major C's upper triangle is
        # column-major C's lower one: C_cm += Aᵀ_cm (Aᵀ_cm)ᵀ, uplo "L", trans "N". Integers are passed as
        # 64-bit: an LP64 library reads their low halves, which hold the same values.
        size, tokens = (ctypes.c_int64(value) for value in (rows.shape[1], rows.shape[0]))
        lda, ldc = ctypes.c_int64(rows.stride(0)), ctypes.c_int64(out.stride(0))
        one, lower, plain = scalar(1.0), ctypes.c_char(b"L"), ctypes.c_char(b"N")
        a, c = ctypes.c_void_p(rows.data_ptr()), ctypes.c_void_p(out.data_ptr())
        byref = ctypes.byref
        routine(
            byref(lower), byref(plain), byref(size), byref(tokens), byref(one), a, byref(lda), byref(one), c, byref(ldc)
        )

    if not rank_update_agrees(update, dtype):
        log.warning("%s in torch's CPU library gave wrong results: Gram matrices use the block triangle", name)
        return None
    return update


def rank_update_agrees(update: Any, dtype: torch.dtype) -> bool:
    """Whether ``update(out, rows)`` adds rowsᵀrows to ``out``'s upper triangle of ``dtype`` and leaves
    the rest alone, on a small odd-sized case (against float64 products)."""
    probe = torch.randn(37, 21, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    result = torch.full((21, 21), 0.5, dtype=dtype)
    update(result, probe)
    rounded = probe.double()
    start = torch.full((21, 21), 0.5, dtype=torch.float64)
    expected = (rounded.T @ rounded + start).triu() + start.tril(-1)
    return bool(torch.allclose(result.double(), expected, rtol=1e-4, atol=1e-4))


@functools.cache
def _native() -> Any:
    """The AVX-512 kernels of _gram.c through ctypes, or None (the optional extension was not built)."""
    try:  # by its full name: the package's __init__ imports this module
        extension = importlib.import_module("sparsegpt.solver._gram")
    except ImportError:
        return None
    library = ctypes.CDLL(extension.__file__)
    integer, pointer, small = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
    for name in ("sgpt_bf16_available", "sgpt_f32_available"):
        getattr(library, name).restype = small
        getattr(library, name).argtypes = []
    library.sgpt_packed_size.restype = integer
    library.sgpt_packed_size.argtypes = [integer, integer]
    library.sgpt_pack_bf16.restype = integer
    library.sgpt_pack_bf16.argtypes = [pointer, integer, integer, integer, pointer]
    for name in ("sgpt_gram_bf16", "sgpt_gram_f32"):
        getattr(library, name).restype = integer
        getattr(library, name).argtypes = [pointer, integer, integer, integer, pointer, integer, small]
    library.sgpt_linear_bf16.restype = integer
    library.sgpt_linear_bf16.argtypes = [pointer, integer, integer, integer, pointer, integer, pointer, integer]
    library.sgpt_linear_bf16.argtypes += [small, small]
    library.sgpt_column_squares.restype = integer
    library.sgpt_column_squares.argtypes = [pointer, integer, integer, integer, small, pointer, small]
    return library


BACKENDS = ("mkl", "native")
"""The ways products into float32 run on the CPU: "mkl" (torch's library: its bf16 × bf16 → float32
routine, its rank-k update) and "native" (the AVX-512 kernels of _gram.c)."""


def native_available(dtype: torch.dtype) -> bool:
    """Whether the native kernels take ``dtype`` inputs on this processor: bf16 with AVX512-BF16 (Gram
    matrices and linear products), float32 with AVX-512 (Gram matrices)."""
    native = _native()
    if native is None:
        return False
    if dtype == torch.bfloat16:
        return bool(native.sgpt_bf16_available())
    return dtype == torch.float32 and bool(native.sgpt_f32_available())


def mixed_backends(dtype: torch.dtype) -> tuple[str, ...]:
    """The ``BACKENDS`` that multiply ``dtype`` (16-bit) inputs into float32 on this host."""
    found = ["mkl"] if _routine(dtype) is not None else []
    if dtype == torch.bfloat16 and native_available(dtype):
        found.append("native")
    return tuple(found)


def native_mixed_gram(dtype: torch.dtype) -> bool:
    """Whether products of ``dtype`` inputs into float32 (Gram matrices by ``add_gram``, linear layers by
    ``mixed_linear``) run natively (``mixed_backends``) rather than in float32 after widening them."""
    return bool(mixed_backends(dtype))


_ERROR_ISA = -3  # what _gram.c's entry points return where the processor lacks the instructions


def _check(status: int, what: str) -> None:
    """Raise where a native kernel reported an error (a bug here, not bad input: the callers check shapes)."""
    if status != 0:
        raise RuntimeError(f"the native {what} kernel failed with status {status}")


_INT32_MAX = 2**31 - 1


def _addressable(*matrices: tuple[int, int]) -> bool:
    """Whether every (rows, leading dimension) matrix spans fewer elements than a 32-bit integer counts,
    as the MKL routines here need."""
    return all(rows * leading <= _INT32_MAX for rows, leading in matrices)


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


def add_gram(gram: torch.Tensor, rows: torch.Tensor, edges: list[int] | None = None, backend: str = "mkl") -> None:
    """``gram += rowsᵀ rows`` in place, on and above the diagonal; ``rows`` is (tokens, width).

    XᵀX is symmetric, so only its upper triangle is needed. Float32/float64 rows on the CPU (with a Gram
    matrix of their precision) go to one symmetric rank-k update, which computes exactly that triangle.
    With ``backend`` "native", bf16 or float32 rows with a float32 Gram matrix on the CPU go to the native
    kernel where the processor has it (``native_available``), which sums exactly the upper triangle.
    Otherwise the matrix is split into column blocks at ``edges`` (by default ``triangle_edges`` for the
    rows' precision) and only the blocks on and above the diagonal are computed: with k blocks, (k + 1) / 2k
    of the full product's arithmetic. Either way nothing below a diagonal block is touched, and within
    the diagonal blocks only the upper triangle is to be read: ``mirror_gram`` (given the same edges)
    fills in the rest."""
    cpu = gram.device.type == "cpu" and gram.stride(1) == 1 and rows.shape[0] > 0
    if backend == "native" and cpu and gram.dtype == torch.float32 and native_available(rows.dtype):
        _native_gram(gram, _row_major(rows))
        return
    syrk = _syrk(rows.dtype) if gram.device.type == "cpu" and gram.dtype == rows.dtype else None
    if syrk is not None and cpu:
        rows = _row_major(rows)
        if _addressable((rows.shape[0], rows.stride(0)), (gram.shape[0], gram.stride(0))):
            syrk(gram, rows)
            return
    add_block_triangle(gram, rows, triangle_edges(rows.shape[1], rows.dtype) if edges is None else edges)


def _native_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """``gram += rowsᵀ rows`` on and above the diagonal by the native kernel (row-major bf16 or float32
    ``rows``, a float32 ``gram`` with unit column stride)."""
    tokens, width = rows.shape
    kernel = _native().sgpt_gram_bf16 if rows.dtype == torch.bfloat16 else _native().sgpt_gram_f32
    status = kernel(
        rows.data_ptr(), tokens, width, rows.stride(0), gram.data_ptr(), gram.stride(0), torch.get_num_threads()
    )
    _check(status, "Gram")


def native_column_squares(squares: torch.Tensor, rows: torch.Tensor) -> bool:
    """``squares += (rows.float() ** 2).sum(dim=0)`` by the native kernel (the Gram matrix's diagonal alone),
    each square rounded to float32 and added in row order within chunks of 256 rows, for a float32
    ``squares`` and 2-D CPU ``rows`` (float32 or bfloat16, each row contiguous, no gradient); False
    (nothing done) where the kernel does not take them or the processor lacks AVX-512 (F, BW, VL)."""
    library = _native()
    if (
        library is None
        or squares.dtype != torch.float32
        or not squares.is_contiguous()
        or rows.dtype not in (torch.float32, torch.bfloat16)
        or rows.ndim != 2
        or rows.shape[1] != squares.shape[0]
        or rows.stride(1) != 1
        or squares.device.type != "cpu"
        or rows.device.type != "cpu"
        or (torch.is_grad_enabled() and rows.requires_grad)
    ):
        return False
    tokens, width = rows.shape
    with torch.profiler.record_function("sparsegpt::column_squares"):  # named in profiles, as torch's ops are
        status = library.sgpt_column_squares(
            rows.data_ptr(), tokens, width, rows.stride(0), int(rows.dtype == torch.float32), squares.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
    if status == _ERROR_ISA:  # no AVX-512 BW/VL here
        return False
    _check(status, "column squares")
    return True


def add_block_triangle(gram: torch.Tensor, rows: torch.Tensor, edges: list[int]) -> None:
    """``gram += rowsᵀ rows`` on the blocks (split at ``edges``) on and above the diagonal, each block by
    one matrix product (``add_product``)."""
    for start, end in zip(edges, edges[1:]):
        add_product(gram[start:end, start:], rows[:, start:end], rows[:, start:])


def mirror_gram(gram: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """``gram`` (summed by ``add_gram`` with the same ``edges``) made whole and exactly symmetric, in place:
    each block below the diagonal becomes the transpose of its mirror image above it, and each diagonal
    block is mirrored from its upper triangle. Returns ``gram``."""
    for start, end in zip(edges, edges[1:]):
        gram[end:, start:end] = gram[start:end, end:].T
        diagonal = gram[start:end, start:end]
        below = torch.ones_like(diagonal, dtype=torch.bool).tril_(-1)
        diagonal.copy_(torch.where(below, diagonal.T, diagonal))
    return gram


def add_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``out += leftᵀ right`` in place, for ``left`` (tokens, m), ``right`` (tokens, n), ``out`` (m, n), any of
    them views with unit column stride or not.

    16-bit inputs with a float32 ``out`` on the CPU go to the native mixed-precision product where
    torch's library has it; every other combination multiplies in ``out``'s precision."""
    if not _mixed_product(out, left, right, transpose_left=True, beta=1.0):
        out.addmm_(left.T.to(out.dtype), right.to(out.dtype))


@dataclass(frozen=True)
class MixedWeight:
    """A 16-bit weight W (n, k) ready for products with 16-bit inputs summed in float32 (``mixed_linear``):
    the matrix itself, and for the native backend its packed panels (made once, as _gram.c reads them)."""

    matrix: torch.Tensor
    packed: torch.Tensor | None = None


def mixed_weight(matrix: torch.Tensor, backend: str = "mkl") -> MixedWeight:
    """``matrix`` (n, k, 16-bit) as a ``MixedWeight`` for ``backend`` (packed for "native" where the
    processor has the bf16 kernels)."""
    if backend != "native" or matrix.device.type != "cpu" or not native_available(matrix.dtype):
        return MixedWeight(matrix)
    native, matrix = _native(), _row_major(matrix)
    (n, k), leading = matrix.shape, matrix.stride(0)
    packed = torch.empty(native.sgpt_packed_size(n, k), dtype=torch.int32)
    _check(native.sgpt_pack_bf16(matrix.data_ptr(), n, k, leading, packed.data_ptr()), "packing")
    return MixedWeight(matrix, packed)


def mixed_linear(out: torch.Tensor, inputs: torch.Tensor, weight: MixedWeight, accumulate: bool = False) -> None:
    """``out = inputs · Wᵀ`` (``+ out`` when ``accumulate``) in place, for ``inputs`` (tokens, k) of W's
    16-bit dtype and a float32 ``out`` (tokens, n): the products of a linear layer, exact and summed in
    float32. The native kernels where W was packed for them, else MKL's mixed-precision routine with no
    copy of either operand where their rows are unit-stride, else in float32 after widening them."""
    if weight.packed is not None and out.stride(1) == 1 and inputs.shape[0] > 0:
        inputs, (n, k) = _row_major(inputs), weight.matrix.shape
        status = _native().sgpt_linear_bf16(
            inputs.data_ptr(), inputs.shape[0], k, inputs.stride(0), weight.packed.data_ptr(), n,
            out.data_ptr(), out.stride(0), int(accumulate), torch.get_num_threads(),
        )  # fmt: skip
        _check(status, "linear")
        return
    if not _mixed_product(out, inputs, weight.matrix, transpose_left=False, beta=1.0 if accumulate else 0.0):
        product = inputs.to(out.dtype) @ weight.matrix.to(out.dtype).T
        out.add_(product) if accumulate else out.copy_(product)


def _mixed_product(
    out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, transpose_left: bool, beta: float
) -> bool:
    """``out = leftᵀ · right + β·out`` (``transpose_left``) or ``out = left · rightᵀ + β·out`` by MKL's
    16-bit × 16-bit → float32 routine, for a row-major float32 ``out`` on the CPU; False, with nothing
    done, where the routine does not apply (then the caller multiplies in float32)."""
    routine = _routine(left.dtype) if out.device.type == "cpu" and out.dtype == torch.float32 else None
    if routine is None or right.dtype != left.dtype or left.shape[0] == 0 or out.stride(1) != 1:
        return False
    left, right = _row_major(left), _row_major(right)
    (lda, ldb, ldc) = left.stride(0), right.stride(0), out.stride(0)
    if not _addressable((left.shape[0], lda), (right.shape[0], ldb), (out.shape[0], ldc)):
        return False
    (m, n), k = out.shape, left.shape[0] if transpose_left else left.shape[1]
    transposes = (_TRANSPOSE, _NO_TRANSPOSE) if transpose_left else (_NO_TRANSPOSE, _TRANSPOSE)
    a, b, c = left.data_ptr(), right.data_ptr(), out.data_ptr()
    routine(_ROW_MAJOR, *transposes, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)
    return True


def split_bfloat16(weight: torch.Tensor, backend: str = "mkl") -> tuple[MixedWeight, MixedWeight]:
    """A float32 ``weight`` as two bf16 parts, hi = bf16(w) and lo = bf16(w − hi), each a ``MixedWeight``
    for ``backend`` (``mixed_weight``): hi + lo holds about 16 significant bits of each entry."""
    high = weight.bfloat16()
    low = (weight - high.float()).bfloat16()
    return mixed_weight(high, backend), mixed_weight(low, backend)


def split_linear(
    inputs: torch.Tensor, high: MixedWeight, low: MixedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``inputs · (high + low)ᵀ + bias`` for float32 ``inputs`` (..., k) and a weight split by
    ``split_bfloat16`` (n, k): the inputs rounded to bf16 once, both products exact and summed in float32
    (``mixed_linear``)."""
    rows = inputs.reshape(-1, inputs.shape[-1]).bfloat16()
    out = torch.empty(rows.shape[0], high.matrix.shape[0])
    mixed_linear(out, rows, high)
    mixed_linear(out, rows, low, accumulate=True)
    if bias is not None:
        out += bias
    return out.reshape(*inputs.shape[:-1], high.matrix.shape[0])


def _row_major(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` itself when its rows are unit-stride vectors, else a contiguous copy."""
    return matrix if matrix.stride(1) == 1 and matrix.stride(0) >= matrix.shape[1] else matrix.contiguous()
