"""Issue 2's acceptance figures: smollm2-135m pruned by this project, by magnitude and by a peer.

Calibration: 128 windows of 512 tokens from sotu:train (seed 0), saved to OUT/calib.pt so that the peer
(llmcompressor 0.14's SparseGPTModifier, run by bench/peer_llmcompressor.py in its own virtualenv)
prunes on exactly the same tokens. Perplexity: every 512-token window of sotu:test, fp32.

    python bench/acceptance.py --out bench-out [--peer-python /tmp/lcvenv/bin/python] [--patterns none,2:4]
                               [--seeds 0,1,2]

With several calibration seeds every method (and the peer) is run once per seed on that seed's windows,
so that a difference between two implementations can be told apart from the run-to-run spread.

Prints one JSON object and a Markdown table; also writes OUT/acceptance.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import sparsegpt
from sparsegpt import PruneConfig, assets, data
from sparsegpt.api import calibration_windows, versions
from sparsegpt.evaluate import perplexity
from sparsegpt.pipeline import prune_model
from sparsegpt.solver import NMPattern

SEQLEN = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peer-python", default=None, help="python of a virtualenv with llmcompressor 0.14")
    parser.add_argument("--patterns", default="none,2:4")
    parser.add_argument("--methods", default="magnitude,sparsegpt")
    parser.add_argument("--eval-windows", type=int, default=None, help="limit (default: all windows)")
    parser.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, source = sparsegpt.load_model("smollm2-135m")
    train = data.load_text("sotu:train")
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), SEQLEN, args.eval_windows)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    rows = []
    if not args.no_dense:
        rows.append({"method": "dense", "pattern": None, "seed": None, "ppl": perplexity(model, test)})
        print(json.dumps(rows[-1]), flush=True)
    for seed in (int(text) for text in args.seeds.split(",")):
        config = PruneConfig(nsamples=128, seqlen=SEQLEN, seed=seed)
        windows = calibration_windows(model, tokenizer, train, config)
        calib_file = args.out / ("calib.pt" if seed == 0 else f"calib-seed{seed}.pt")
        torch.save(windows, calib_file)
        for pattern_text in args.patterns.split(","):
            pattern = None if pattern_text == "none" else NMPattern.parse(pattern_text)
            for method in args.methods.split(","):
                model.load_state_dict(dense_state)
                started = time.perf_counter()
                prune_model(model, replace(config, method=method, pattern=pattern), windows)
                seconds = time.perf_counter() - started
                row = {"method": method, "pattern": pattern_text, "seed": seed}
                rows.append({**row, "ppl": perplexity(model, test), "prune_seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
            if args.peer_python:
                rows.append(run_peer(args, pattern_text, seed, calib_file, test))
                print(json.dumps(rows[-1]), flush=True)

    result = {
        "model": source,
        "calibration": f"128 x 512 tokens of sotu:train, seeds {args.seeds}",
        "evaluation": f"{test.shape[0]} windows of {SEQLEN} tokens of sotu:test",
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": versions(),
    }
    (args.out / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print("\n| method | pattern | seed | perplexity | prune s |\n|---|---|---|---|---|")
    for row in rows:
        seconds = row.get("prune_seconds", 0.0)
        print(f"| {row['method']} | {row['pattern'] or 'dense'} | {row['seed']} | {row['ppl']:.3f} | {seconds:.1f} |")


def run_peer(args: argparse.Namespace, pattern_text: str, seed: int, calib_file: Path, test: torch.Tensor) -> dict:
    """Prune with llmcompressor in its own virtualenv on the same windows; evaluate its folder here."""
    suffix = "" if seed == 0 else f"-seed{seed}"
    peer_out = args.out / f"peer-{pattern_text.replace(':', '-')}{suffix}"
    command = [
        args.peer_python,
        str(Path(__file__).with_name("peer_llmcompressor.py")),
        "--model",
        str(assets.model_folder("smollm2-135m")),
        "--calib-tokens",
        str(calib_file),
        "--out",
        str(peer_out),
        "--json",
        str(peer_out) + ".json",
    ]
    if pattern_text != "none":
        command += ["--pattern", pattern_text]
    subprocess.run(command, check=True)
    peer = json.loads(Path(str(peer_out) + ".json").read_text())
    peer_model, _, _ = sparsegpt.load_model(str(peer_out))
    ppl = perplexity(peer_model, test)
    return {
        "method": "llmcompressor",
        "pattern": pattern_text,
        "seed": seed,
        "ppl": ppl,
        "prune_seconds": peer["prune_seconds"],
    }


if __name__ == "__main__":
    sys.exit(main())
