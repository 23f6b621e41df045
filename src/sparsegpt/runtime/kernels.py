"""The native sparse kernels (_kernels.c) through ctypes: the weight's layout as a C structure, and the
instruction sets to choose from."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

PORTABLE, AVX2, AVX512, AVX512_BF16 = 0, 1, 2, 3
ISA_NAMES = {PORTABLE: "portable", AVX2: "avx2", AVX512: "avx512", AVX512_BF16: "avx512-bf16"}
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
CODES = 3
MAX_VECTORS = 64
"""The most vectors one ``matvec`` call takes (sgpt_matvec's MAX_VECTORS)."""


class Matrix(ctypes.Structure):
    """The C ``Matrix`` of _kernels.c: pointers into tensors the caller keeps alive."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("kept", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("mask_size", ctypes.c_int64),
        ("offsets", ctypes.c_void_p),
        ("kind", ctypes.c_int32),
        ("round", ctypes.c_int32),
        ("values", ctypes.c_void_p),
        ("codes", ctypes.c_void_p),
        ("codes_size", ctypes.c_int64),
        ("bits", ctypes.c_int64),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("group", ctypes.c_int64),
        ("ngroups", ctypes.c_int64),
    ]


@functools.cache
def library() -> Any:
    """The native library, or None where the optional extension was not built (then sparse modules
    compute through a dense copy decoded with torch, the same numbers, without the savings)."""
    try:
        from sparsegpt.runtime import _kernels
    except ImportError:
        return None
    native = ctypes.CDLL(_kernels.__file__)
    integer, pointer, small = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
    native.sgpt_best_isa.restype = small
    native.sgpt_best_isa.argtypes = []
    native.sgpt_matvec.restype = integer
    native.sgpt_matvec.argtypes = [ctypes.POINTER(Matrix), integer, pointer, small, pointer, small, small]
    native.sgpt_takes_bfloat16.restype = small
    native.sgpt_takes_bfloat16.argtypes = [ctypes.POINTER(Matrix), small]
    native.sgpt_densify.restype = integer
    native.sgpt_densify.argtypes = [ctypes.POINTER(Matrix), integer, integer, small, pointer, small, small]
    native.sgpt_nm_mask.restype = integer
    native.sgpt_nm_mask.argtypes = [pointer, integer, integer, integer, integer, integer, pointer]
    native.sgpt_row_offsets.restype = integer
    native.sgpt_row_offsets.argtypes = [pointer, integer, integer, integer, pointer]
    return native


def best_isa() -> int | None:
    """The fastest instruction set the kernels have for this processor (None without the library)."""
    native = library()
    return None if native is None else int(native.sgpt_best_isa())


def available_isas() -> list[int]:
    """Every instruction set the kernels can run here, portable first."""
    best = best_isa()
    return [] if best is None else list(range(best + 1))
