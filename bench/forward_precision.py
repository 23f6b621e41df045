"""Do bf16 calibration forwards keep a method's accuracy (SparseGPT, Wanda)? Paired runs over calibration samples.

For each seed (one sample of ``--nsamples`` × 512 windows of sotu:train), smollm2-135m (fp32) is pruned
once per variant and evaluated on the first ``--eval-windows`` windows of sotu:test in fp32:

- ``fp32``: float32 forwards (``forward_dtype=None``);
- ``bf16``: bf16 forwards under autocast, Hessians summed from the bf16 inputs the layers multiply;
- ``fp32-b4``: float32 forwards in batches of 4 windows instead of 8, a control: the same arithmetic in
  another summation order, which shows how far a run moves from perturbations that cost no accuracy;
- ``bf16-observe`` / ``bf16-advance`` (diagnostics): bf16 only in the forwards that collect the Hessians,
  or only in those that carry the hidden states to the next block.

The differences that matter are the paired ones (same seed): their mean over seeds against their scatter.

    python bench/forward_precision.py --pattern 2:4 --seeds 0,1,2,3,4,5 [--variants fp32,bf16,fp32-b4] [--method wanda]

Prints one JSON line per run and a Markdown table (perplexity per seed and variant, paired differences
against ``fp32``, and their mean, standard deviation and standard error over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

import sparsegpt
from sparsegpt import PruneConfig, data, pipeline
from sparsegpt.perplexity import perplexity
from sparsegpt.solver import NMPattern

VARIANTS = {
    "fp32": {"forward_dtype": "none"},
    "bf16": {"forward_dtype": "bfloat16"},
    "fp32-b4": {"forward_dtype": "none", "batch_size": 4},
    # diagnostics: bf16 in one of the two passes only
    "bf16-observe": {"forward_dtype": "bfloat16"},
    "bf16-advance": {"forward_dtype": "bfloat16"},
}


def only_in(kind: str) -> None:
    """Make bf16 forwards apply only to the observing passes (kind "observe") or only to the passes that
    advance the hidden states ("advance"); the other pass runs in the model's precision."""
    if kind == "observe":
        advance = pipeline.advance_block
        pipeline.advance_block = lambda block, hidden, calls, forward_dtype=None: advance(block, hidden, calls)
    else:
        observe = pipeline.observe_block

        def observe_exactly(*args: Any, **kwargs: Any) -> Any:
            kwargs["forward_dtype"] = None
            return observe(*args, **kwargs)

        pipeline.observe_block = observe_exactly


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4", help="N:M, or none for 50%% unstructured")
    parser.add_argument("--method", default="sparsegpt", help="sparsegpt or wanda")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="fp32,bf16,fp32-b4")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()

    pattern = None if args.pattern == "none" else NMPattern.parse(args.pattern)
    variants = args.variants.split(",")
    model, tokenizer, source = sparsegpt.load_model("smollm2-135m", dtype="float32")
    train = data.tokenize(data.load_text("sotu:train"), tokenizer)
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), 512, args.eval_windows)
    dense = perplexity(model, test)
    print(json.dumps({"model": source, "dense_ppl": dense}), flush=True)
    del model

    table: dict[int, dict[str, float]] = {}
    for seed in (int(text) for text in args.seeds.split(",")):
        windows = data.calibration_windows(train, args.nsamples, 512, seed)
        for variant in variants:
            originals = pipeline.observe_block, pipeline.advance_block
            if variant.startswith("bf16-"):
                only_in(variant.removeprefix("bf16-"))
            model, _, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
            config = PruneConfig(
                method=args.method, nsamples=args.nsamples, seqlen=512, seed=seed, pattern=pattern, **VARIANTS[variant]
            )
            started = time.perf_counter()
            pipeline.prune_model(model, config, windows)
            seconds = time.perf_counter() - started
            ppl = perplexity(model, test)
            table.setdefault(seed, {})[variant] = ppl
            row = {"seed": seed, "method": args.method, "variant": variant, "pattern": args.pattern}
            row.update(prune_seconds=seconds, ppl=ppl)
            print(json.dumps(row), flush=True)
            del model
            pipeline.observe_block, pipeline.advance_block = originals

    others = [variant for variant in variants if variant != "fp32"]
    print(f"\ndense: {dense:.3f}\n")
    header = " | ".join(variants + [f"{variant} vs fp32" for variant in others if "fp32" in variants])
    print(f"| seed | {header} |")
    print("|---" * (1 + len(variants) + (len(others) if "fp32" in variants else 0)) + "|")
    differences: dict[str, list[float]] = {variant: [] for variant in others}
    for seed, results in table.items():
        cells = [f"{results[variant]:.3f}" for variant in variants]
        if "fp32" in variants:
            for variant in others:
                difference = results[variant] / results["fp32"] - 1
                differences[variant].append(difference)
                cells.append(f"{difference:+.2%}")
        print(f"| {seed} | {' | '.join(cells)} |")
    if "fp32" in variants and len(table) > 1:
        means = [f"{statistics.mean(table[seed][variant] for seed in table):.3f}" for variant in variants]
        spreads = [
            f"{statistics.mean(values):+.2%} ± {statistics.stdev(values):.2%} "
            f"(standard error {statistics.stdev(values) / len(values) ** 0.5:.2%})"
            for values in differences.values()
        ]
        print(f"| mean | {' | '.join(means + spreads)} |")
        print(json.dumps({"paired_differences": differences}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
