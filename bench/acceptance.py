"""Issue 2's acceptance figures: smollm2-135m pruned by this project, by magnitude and by a peer.

Calibration: 128 windows of 512 tokens from sotu:train (seed 0), saved to OUT/calib.pt so that the peer
(llmcompressor 0.14's SparseGPTModifier, run by bench/peer_llmcompressor.py in its own virtualenv)
prunes on exactly the same tokens. Perplexity: every 512-token window of sotu:test, fp32.

    python bench/acceptance.py --out bench-out [--peer-python /tmp/lcvenv/bin/python] [--patterns none,2:4]

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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, source = sparsegpt.load_model("smollm2-135m")
    config = PruneConfig(nsamples=128, seqlen=SEQLEN, seed=0)
    windows = calibration_windows(model, tokenizer, data.load_text("sotu:train"), config)
    torch.save(windows, args.out / "calib.pt")
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), SEQLEN, args.eval_windows)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    rows = [{"method": "dense", "pattern": None, "ppl": perplexity(model, test), "prune_seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for pattern_text in args.patterns.split(","):
        pattern = None if pattern_text == "none" else NMPattern.parse(pattern_text)
        for method in args.methods.split(","):
            model.load_state_dict(dense_state)
            started = time.perf_counter()
            prune_model(model, replace(config, method=method, pattern=pattern), windows)
            seconds = time.perf_counter() - started
            rows.append(
                {"method": method, "pattern": pattern_text, "ppl": perplexity(model, test), "prune_seconds": seconds}
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.peer_python:
            peer_out = args.out / f"peer-{pattern_text.replace(':', '-')}"
            command = [
                args.peer_python,
                str(Path(__file__).with_name("peer_llmcompressor.py")),
                "--model",
                str(assets.model_folder("smollm2-135m")),
                "--calib-tokens",
                str(args.out / "calib.pt"),
                "--out",
                str(peer_out),
                "--json",
                str(peer_out) + ".json",
            ]
            if pattern is not None:
                command += ["--pattern", pattern_text]
            subprocess.run(command, check=True)
            peer = json.loads(Path(str(peer_out) + ".json").read_text())
            peer_model, _, _ = sparsegpt.load_model(str(peer_out))
            rows.append(
                {
                    "method": "llmcompressor",
                    "pattern": pattern_text,
                    "ppl": perplexity(peer_model, test),
                    "prune_seconds": peer["prune_seconds"],
                }
            )
            del peer_model
            print(json.dumps(rows[-1]), flush=True)

    result = {
        "model": source,
        "calibration": "128 x 512 tokens of sotu:train, seed 0",
        "evaluation": f"{test.shape[0]} windows of {SEQLEN} tokens of sotu:test",
        "rows": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "versions": versions(),
    }
    (args.out / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print("\n| method | pattern | perplexity | prune s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['pattern'] or 'dense'} | {row['ppl']:.3f} | {row['prune_seconds']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
