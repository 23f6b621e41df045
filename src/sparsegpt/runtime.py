"""Process-wide tuning that the command line applies (a library user may call it too).

glibc's allocator hands tensors above a size threshold straight back to the kernel when they are freed,
and trims the heap as soon as its free top grows, so every forward pass of a calibration batch faults its
activations in again, page by page. On 2 cores that cost 10-20% of a block's forward time, all of it
kernel time (see docs/BENCHMARKS.md). Keeping freed memory in the process removes it. Threads other than
the main one get arenas of their own, whose heaps glibc unmaps as soon as they empty, whatever the trim
threshold: one arena for all threads keeps their temporaries warm too (the compact loader decodes on
worker threads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_NEVER_TRIM = 2**31 - 1


def return_freed_memory() -> bool:
    """The opposite trade, for runs that are about peak memory (streaming): every allocation of 1 MiB or
    more gets pages of its own, handed back to the system the moment it is freed, and the heap is
    trimmed eagerly. glibc's default raises its threshold after the first large free, after which freed
    tensors linger in a heap that fragments: measured 1.44-1.66 GiB peaks for a run this setting holds
    lower (docs/BENCHMARKS.md). Returns False (and does nothing) where the C library is not glibc."""
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


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in the C library; allocator left as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(option, value) == 1 for option, value in settings)
