"""What the benchmarks share: the median time of a call, the peak memory of a process and of a child process,
and the peer's environment (llmcompressor in a virtualenv of its own, bench/README.md).

Standard library only: bench/peer_llmcompressor.py imports it inside the peer's virtualenv.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

PEER_ROOT = "/tmp/lcvenv"
PEER_VENV = (
    f"python3 -m venv {PEER_ROOT} && {PEER_ROOT}/bin/pip install torch==2.13.0 && "
    f"{PEER_ROOT}/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0"
)
"""The commands that make the peer's virtualenv (llmcompressor 0.14 pins its own torch and transformers)."""

PEER_SCRIPT = Path(__file__).with_name("peer_llmcompressor.py")


def peer_python(given: str | None) -> str:
    """The peer's interpreter: ``given`` (a ``--peer-python`` option), else the one ``PEER_VENV`` makes."""
    path = Path(given or f"{PEER_ROOT}/bin/python")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no peer python at {path}; make the peer's virtualenv with: {PEER_VENV}")
    return str(path)


def peer_command(
    python: str, model: Path, calib_tokens: Path, out: Path, report: Path, pattern: str, method: str = "sparsegpt"
) -> list[str]:
    """The command that prunes ``model`` with llmcompressor's ``method`` (sparsegpt or wanda) on the windows
    saved in ``calib_tokens`` (``pattern`` "none": 50% unstructured, else N:M), saves the result to ``out``
    and writes its pruning time and its own peak memory to ``report`` (JSON)."""
    command = [python, str(PEER_SCRIPT), "--model", str(model), "--calib-tokens", str(calib_tokens)]
    command += ["--out", str(out), "--json", str(report), "--method", method]
    return command + ([] if pattern == "none" else ["--pattern", pattern])


def own_peak_rss_gib() -> float:
    """This process's peak resident memory in GiB: the high-water mark of its own address space (VmHWM).
    ru_maxrss is not that: on Linux a process started by fork and exec keeps, as a floor, the resident
    size its parent had at the fork (a benchmark's parent holding a model inflates every child's figure)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_with_peak_rss(command: list[str]) -> tuple[str, int]:
    """Run ``command`` in a child process; its standard output and its peak resident memory in bytes, from
    the kernel (``wait4``'s ru_maxrss: the interpreter and every library included). That figure has the
    parent's resident size at the fork as its floor, so use it only from a parent that holds little (a
    parent that holds a model lets the child report ``own_peak_rss_gib`` instead)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return output, usage.ru_maxrss * 1024


def median_seconds(call: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``call()`` over ``repeats`` calls, after one warm-up call."""
    call()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)
