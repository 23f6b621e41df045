"""Zero-shot tasks through lm-evaluation-harness: do they agree with the harness's own model, how long do
they take?

1. Agreement: the seven offline tasks (``sparsegpt.OFFLINE_TASKS``) at ``--limit`` documents each, scored
   (a) through this project (``sparsegpt.evaluate_tasks`` on the model ``load_model`` gives, in the model's
   own precision) and (b) by the harness's own transformers model, ``HFLM(pretrained=<the folder>)``, on
   the same folder and the same task definitions. Prints both and the largest difference.
2. Time: the same seven tasks scored as ``sparsegpt eval --tasks`` does by default (precision auto) at
   ``--limit``, wall seconds; with ``--full`` also with every document. The allocator is tuned as the CLI
   tunes it (``host.keep_freed_memory``; ``--default-allocator``: glibc's own settings).

    python bench/zero_shot.py [--model smollm2-135m] [--limit 100] [--full] [--skip-agreement] [--default-allocator]

Prints one JSON line per run, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import sparsegpt
from sparsegpt import assets, zeroshot
from sparsegpt.host import keep_freed_memory
from sparsegpt.loading import load_model


def timed(call) -> tuple[dict, float, str]:
    """(scores as dicts, seconds, precision) of ``call()``, which returns (scores, precision)."""
    started = time.perf_counter()
    scores, precision = call()
    return {name: score.as_dict() for name, score in scores.items()}, time.perf_counter() - started, precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--tasks", default=",".join(sparsegpt.OFFLINE_TASKS))
    parser.add_argument("--full", action="store_true", help="also score every document of every task")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument(
        "--default-allocator", action="store_true", help="glibc's own settings, not the CLI's keep_freed_memory"
    )
    args = parser.parse_args()
    if not args.default_allocator:
        keep_freed_memory()  # as `sparsegpt eval` does: its rows are labelled so
    tasks = zeroshot.parse_tasks(args.tasks)
    zeroshot.check_tasks(tasks)
    model, tokenizer, _ = load_model(args.model)
    runs = []
    if not args.skip_agreement:
        from lm_eval.models.huggingface import HFLM

        folder = assets.model_folder(args.model) if args.model in assets.MODEL_ALIASES else args.model
        ours = timed(lambda: sparsegpt.evaluate_tasks(model, tokenizer, sparsegpt.ZeroShot(tasks, args.limit, "model")))
        harness_lm = HFLM(pretrained=str(folder), dtype=torch.float32, device="cpu", batch_size=8)
        theirs = timed(lambda: (zeroshot.run_harness(harness_lm, tasks, args.limit), "harness"))
        del harness_lm
        for way, (scores, seconds, precision) in (("this project", ours), ("HFLM(folder)", theirs)):
            runs.append({"way": way, "limit": args.limit, "precision": precision, "seconds": seconds, "tasks": scores})
            print(json.dumps(runs[-1]))
        gaps = {
            f"{name}.{key}": abs(ours[0][name][key] - theirs[0][name][key])
            for name in tasks
            for key in ("acc", "acc_norm", "perplexity")
            if key in ours[0][name]
        }
        worst = max(gaps, key=gaps.get)
        print(json.dumps({"largest_difference": worst, "value": gaps[worst]}))
    for limit in [args.limit] + ([None] if args.full else []):
        scores, seconds, precision = timed(
            lambda: sparsegpt.evaluate_tasks(model, tokenizer, sparsegpt.ZeroShot(tasks, limit))  # noqa: B023
        )
        runs.append({"way": "sparsegpt eval --tasks", "limit": limit, "precision": precision, "seconds": seconds,
                     "tasks": scores})  # fmt: skip
        print(json.dumps(runs[-1]))
    print(f"\n| way | limit | precision | seconds | {' | '.join(tasks)} | mean acc |")
    print("|---" * (len(tasks) + 5) + "|")
    for run in runs:
        accs = [run["tasks"][name]["acc"] for name in tasks]
        cells = " | ".join(f"{acc:.4f}" for acc in accs)
        limit = run["limit"] if run["limit"] is not None else "all"
        print(
            f"| {run['way']} | {limit} | {run['precision']} | {run['seconds']:.0f} | {cells} | "
            f"{sum(accs) / len(accs):.4f} |"
        )


if __name__ == "__main__":
    main()
