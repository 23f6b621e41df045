"""How much does a 2:4 perplexity move when only the rounding changes?

Prunes smollm2-135m at 2:4 on the windows of ``--calib-tokens`` several times: as given, with another
batch size, or with the windows in a shuffled order (the same tokens, so only the order of floating-point
sums changes), and evaluates every result (and optionally peer folders) on all 512-token windows of
sotu:test. Per-window NLLs are saved under ``--out`` so that any subset can be compared afterwards.

    python bench/sensitivity.py --calib-tokens calib.pt --out DIR --runs bs=8,perm=1 [--peer DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import sparsegpt
from sparsegpt import PruneConfig, data
from sparsegpt.evaluate import window_nll
from sparsegpt.pipeline import prune_model
from sparsegpt.solver import NMPattern

SEQLEN = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", default="bs=8,perm=1", help="bs=B (batch size) or perm=S (shuffle seed)")
    parser.add_argument("--peer", type=Path, action="append", default=[], help="a pruned folder to evaluate")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m")
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), SEQLEN)
    calibration = torch.load(args.calib_tokens)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    base = PruneConfig(nsamples=calibration.shape[0], seqlen=calibration.shape[1], pattern=NMPattern(2, 4))

    jobs: list[tuple[str, nn.Module | None]] = [(run, None) for run in args.runs.split(",") if run]
    for folder in args.peer:
        peer, _, _ = sparsegpt.load_model(str(folder))
        jobs.append((f"peer:{folder.name}", peer))
    for name, peer in jobs:
        seconds = 0.0
        if peer is None:
            kind, value = name.split("=")
            model.load_state_dict(dense)
            config, windows = base, calibration
            if kind == "bs":
                config = replace(base, batch_size=int(value))
            elif kind == "perm":
                order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(int(value)))
                windows = calibration[order]
            else:
                raise SystemExit(f"unknown run {name!r}")
            started = time.perf_counter()
            prune_model(model, config, windows)
            seconds = time.perf_counter() - started
        nll = window_nll(peer if peer is not None else model, test) / (test.shape[1] - 1)  # mean per token
        torch.save(nll, args.out / f"nll-{name.replace(':', '-').replace('=', '-')}.pt")
        row = {"run": name, "ppl": math.exp(nll.mean()), "ppl_first_64": math.exp(nll[:64].mean())}
        print(json.dumps({**row, "prune_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
