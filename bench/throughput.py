"""What this host's CPU does for the matrix products that dominate pruning: fp32 against bf16.

Prints the SIMD flags that matter and the median GFLOP/s of ``F.linear`` at the shapes of smollm2-135m's
MLP (2048×576 by 576×1536) and lm_head (2048×576 by 576×49152) on the current torch threads.

    python bench/throughput.py
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"mlp": (2048, 576, 1536), "lm_head": (2048, 576, 49152)}


def gflops(dtype: torch.dtype, rows: int, inner: int, cols: int, repeats: int = 5) -> float:
    """Median GFLOP/s of ``F.linear`` on random (rows, inner) inputs and a (cols, inner) weight."""
    inputs, weight = torch.randn(rows, inner, dtype=dtype), torch.randn(cols, inner, dtype=dtype)
    F.linear(inputs, weight)  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        F.linear(inputs, weight)
        seconds.append(time.perf_counter() - started)
    return 2 * rows * inner * cols / statistics.median(seconds) / 1e9


def main() -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {flag: f" {flag} " in cpuinfo.replace("\n", " ") for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "flags": flags}
    for dtype in (torch.float32, torch.bfloat16):
        result[str(dtype).removeprefix("torch.")] = {
            name: round(gflops(dtype, *shape), 1) for name, shape in SHAPES.items()
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
