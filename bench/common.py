"""Peak memory of the calling process, for the benchmarks that run each side in a process of its own
(standard library only: the peer's virtualenv imports it too)."""

from __future__ import annotations

import resource
from pathlib import Path


def own_peak_rss_gib() -> float:
    """This process's peak resident memory in GiB: the high-water mark of its own address space (VmHWM).
    ru_maxrss is not that: on Linux a process started by fork and exec keeps, as a floor, the resident
    size its parent had at the fork (a benchmark's parent holding a model inflates every child's figure)."""
    peak = _status_gib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def own_rss_gib() -> float | None:
    """This process's resident memory now, in GiB (VmRSS), or None where /proc does not say."""
    return _status_gib("VmRSS")


def _status_gib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
