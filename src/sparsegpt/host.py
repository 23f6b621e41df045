"""The machine this process runs on: which device to compute on, whether it multiplies bf16 natively,
how much memory is free, and the C allocator's settings that the command line applies.

glibc's allocator hands tensors above a size threshold straight back to the kernel when they are freed,
and trims the heap as soon as its free top grows, so every forward pass of a calibration batch faults its
activations in again, page by page. On 2 cores that cost 10-20% of a block's forward time, all of it
kernel time (docs/RESULTS.md, "The allocator tuning the CLI applies"). Keeping freed memory in the process removes it. Threads other
than the main one get arenas of their own, whose heaps glibc unmaps as soon as they empty, whatever the
trim threshold: one arena for all threads keeps their temporaries warm too (the compact loader decodes on
worker threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path
from typing import Any

import torch

from sparsegpt.errors import SparseGPTError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_NEVER_TRIM = 2**31 - 1


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (the accelerator when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparseGPTError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparseGPTError(f"device {name} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SparseGPTError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or auto)")
    return device


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    probes = (torch.cpu._is_amx_tile_supported, torch.cpu._is_avx512_bf16_supported)  # private, yet stable
    try:
        return any(probe() for probe in probes)
    except (AttributeError, RuntimeError):
        return False


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def return_freed_memory() -> bool:
    """The opposite trade, for runs that are about peak memory (streaming): every allocation of 1 MiB or
    more gets pages of its own, handed back to the system the moment it is freed, and the heap is
    trimmed eagerly. glibc's default raises its threshold after the first large free, after which freed
    tensors linger in a heap that fragments, and a run's peak grows with it. Returns False (and does nothing) where the C library is not glibc."""
    return _mallopt(((_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 1 << 20), (_M_TOP_PAD, 0)))


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap, never trim it, and serve all threads from
    one arena. Returns False (and does nothing) where the C library is not glibc."""
    return _mallopt(
        (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _NEVER_TRIM),
            (_M_TOP_PAD, 256 << 20),
            (_M_ARENA_MAX, 1),
        )
    )


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc's malloc_trim): after a load whose
    temporaries were freed between the tensors that stay, so that they do not count as resident. Returns
    False (and does nothing) where the C library is not glibc."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def _libc_function(name: str) -> Any:
    """A function of the C library, or None where it has none by that name (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        log.debug("no %s in the C library; allocator left as it is", name)
        return None


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(option, value) == 1 for option, value in settings)
