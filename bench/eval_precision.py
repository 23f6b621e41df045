"""How far does scoring perplexity with bf16 products move it, and how much faster is it?

Each model (dense, and smollm2-135m pruned here at each ``--levels`` entry with SparseGPT on a small
calibration sample) is scored on the first ``--windows`` windows of 512 tokens of sotu:test, in one process,
three ways:

- ``float32``: the model's own precision (float32);
- ``split-bfloat16``: what ``--eval-precision auto`` does where it measures fast: inputs of each linear
  rounded to bf16, weights split into two bf16 parts, products summed in float32;
- ``bfloat16``: the decoder's products under bf16 autocast, the output layer in float32;
- ``bfloat16, bf16 logits`` (a control): the whole forward under autocast, so the logits are rounded to
  bf16 before the (float32) log-softmax.

    python bench/eval_precision.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--levels 50%,2:4] [--windows 64]

Prints the host's measured product rates (``host.matmul_rates``), one JSON line per model and way, and a
Markdown table: perplexity, its shift against float32, seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

import sparsegpt
from sparsegpt import PruneConfig, data, host
from sparsegpt.perplexity import perplexity
from sparsegpt.pipeline import prune_model
from sparsegpt.solver import NMPattern

WAYS = ("float32", "split-bfloat16", "bfloat16", "bfloat16, bf16 logits")


def score(model: torch.nn.Module, windows: torch.Tensor, way: str) -> tuple[float, float]:
    """(perplexity, seconds) of ``model`` scored ``way``."""
    whole = torch.autocast("cpu", dtype=torch.bfloat16) if way == "bfloat16, bf16 logits" else contextlib.nullcontext()
    started = time.perf_counter()
    with whole:
        value = perplexity(model, windows, precision=way if way in ("split-bfloat16", "bfloat16") else None)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m", help="aliases or folders, scored dense")
    parser.add_argument("--levels", default="50%,2:4", help="smollm2-135m pruned at these (or none)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # what --eval-precision auto decides by (measured once per host and cached)
    print(json.dumps({"host_rates_gflop_per_s": dataclasses.asdict(host.matmul_rates())}), flush=True)
    text = data.load_text("sotu:test", data.EVALUATION)

    def candidates():
        train = None  # the calibration text, tokenized once
        for name in args.models.split(","):
            model, tokenizer, _ = sparsegpt.load_model(name, dtype="float32")
            yield name, model, tokenizer
        for level in [text for text in args.levels.split(",") if text and text != "none"]:
            model, tokenizer, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
            if train is None:
                train = data.tokenize(data.load_text("sotu:train"), tokenizer)
            pattern = NMPattern.parse(level) if ":" in level else None
            config = PruneConfig(nsamples=16, seqlen=512, pattern=pattern)
            prune_model(model, config, data.calibration_windows(train, 16, 512, 0))
            yield f"smollm2-135m {level} (SparseGPT, 16 × 512 calibration)", model, tokenizer

    rows = []
    for name, model, tokenizer in candidates():
        windows = data.evaluation_windows(data.tokenize(text, tokenizer), 512, args.windows)
        results = {}
        for way in WAYS:
            results[way] = score(model, windows, way)
            print(json.dumps({"model": name, "way": way, "ppl": results[way][0], "seconds": results[way][1]}))
        rows.append((name, results))
        del model

    print(f"\n{args.windows} windows of 512 tokens of sotu:test, {args.threads} threads\n")
    print("| model | way | perplexity | vs float32 | seconds |\n|---|---|---|---|---|")
    for name, results in rows:
        exact = results["float32"][0]
        for way, (value, seconds) in results.items():
            shift = "" if way == "float32" else f"{value / exact - 1:+.3%}"
            print(f"| {name} | {way} | {value:.4f} | {shift} | {seconds:.1f} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
