"""Where a pruning run's peak memory goes: resident memory after each step of the pipeline.

Loads smollm2-135m (fp32), then prunes it with default settings on ``--nsamples`` × 512 windows of
sotu:train (seed 0) at ``--pattern`` (none = 50%, or N:M), printing the process's resident memory (VmRSS)
and its peak so far (VmHWM), in GiB, after: the imports, loading, touching every weight once (a loaded
checkpoint is paged in lazily), cutting the calibration windows (tokenizing the text), capturing the first block's inputs, and the first two observing passes,
solves and advancing passes; then at the end. One JSON line per step, then a Markdown table.

    python bench/memory_steps.py [--pattern 2:4] [--nsamples 128]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from _rss import own_peak_rss_gib, own_rss_gib

steps: list[dict[str, Any]] = []


def record(step: str) -> None:
    steps.append({"step": step, "rss_gib": round(own_rss_gib() or 0.0, 3), "peak_gib": round(own_peak_rss_gib(), 3)})
    print(json.dumps(steps[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4", help="none (50% unstructured) or N:M")
    parser.add_argument("--nsamples", type=int, default=128)
    args = parser.parse_args()
    record("start")
    import torch

    import sparsegpt
    from sparsegpt import PruneConfig, data, pipeline
    from sparsegpt.api import calibration_windows
    from sparsegpt.solver import NMPattern

    record("imports")
    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
    record("loaded")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0)
    record("weights touched")
    config = PruneConfig(
        nsamples=args.nsamples, seqlen=512, pattern=None if args.pattern == "none" else NMPattern.parse(args.pattern)
    )
    windows = calibration_windows(model, tokenizer, data.load_text("sotu:train"), config)
    record("calibration windows")
    calls: Counter[str] = Counter()

    def traced(name: str, step: Any) -> Any:
        def run(*positional: Any, **named: Any) -> Any:
            result = step(*positional, **named)
            calls[name] += 1
            if calls[name] <= 2:
                record(f"{name} #{calls[name]}")
            return result

        return run

    for name in ("capture_block_inputs", "observe_block", "_solve", "advance_block"):
        setattr(pipeline, name, traced(name, getattr(pipeline, name)))
    pipeline.prune_model(model, config, windows)
    record("end")
    print("\n| step | resident GiB | peak GiB |\n|---|---|---|")
    for row in steps:
        print(f"| {row['step']} | {row['rss_gib']:.3f} | {row['peak_gib']:.3f} |")


if __name__ == "__main__":
    main()
