"""Issue 6, the solver alone: this project's SparseGPT against llmcompressor 0.14's ``sparsify_weight``.

Both solve identical (W, H) pairs: W random normal, H = 2·XᵀX/n from n = 2048 correlated random inputs (a
few strong feature directions, as in transformer activations), 50% unstructured and 2:4, block size 128,
damping 0.01, fp32. Calls alternate (ours, peer, ours, peer, ...) in one process; medians are reported
with the time ratio, the share of mask entries that agree and the largest weight difference.

Run it with the peer's interpreter and this project's sources on the path:

    PYTHONPATH=src /tmp/lcvenv/bin/python bench/solver_speed.py [--shapes 576x576,1536x576] [--repeats 3]

(``python3 -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 && /tmp/lcvenv/bin/pip
install llmcompressor==0.14.0.1 transformers==5.17.0``). Prints one JSON line per case and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from sparsegpt.solver import NMPattern, sparsegpt_prune

SHAPES = "576x576,192x576,1536x576,576x1536,4096x4096,11008x4096,4096x11008"


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = 2048
    directions = torch.randn(8, cols, generator=generator)
    inputs = (
        torch.randn(tokens, cols, generator=generator) + 4 * torch.randn(tokens, 8, generator=generator) @ directions
    )
    return torch.randn(rows, cols, generator=generator), 2 * inputs.T @ inputs / tokens


def ours(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern | None) -> torch.Tensor:
    return sparsegpt_prune(weight, hessian, 0.5, pattern, 128, 0.01).weight


def peer(weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern | None) -> torch.Tensor:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    n, m = (pattern.n, pattern.m) if pattern is not None else (0, 0)
    _, pruned = sparsify_weight(layer, {layer: hessian.clone()}, 0.5, n, m, 128, 0.01, False)
    return pruned


def timed(solve, weight, hessian, pattern) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    result = solve(weight, hessian, pattern)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="ROWSxCOLS of W, comma-separated")
    parser.add_argument("--patterns", default="none,2:4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows_out = []
    for shape in args.shapes.split(","):
        rows, cols = (int(size) for size in shape.split("x"))
        weight, hessian = problem(rows, cols)
        for text in args.patterns.split(","):
            pattern = None if text == "none" else NMPattern.parse(text)
            times: dict[str, list[float]] = {"ours": [], "peer": []}
            results = {}
            for _ in range(args.repeats):
                for name, solve in (("ours", ours), ("peer", peer)):
                    seconds, results[name] = timed(solve, weight, hessian, pattern)
                    times[name].append(seconds)
            mine = results["ours"]
            theirs = results["peer"].to(mine.dtype)
            row = {
                "shape": shape,
                "pattern": text,
                "ours_s": statistics.median(times["ours"]),
                "peer_s": statistics.median(times["peer"]),
                "mask_agreement": float(((mine == 0) == (theirs == 0)).float().mean()),
                "largest_weight_difference": float((mine - theirs).abs().max()),
                "threads": torch.get_num_threads(),
            }
            row["speedup"] = row["peer_s"] / row["ours_s"]
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    print("| W shape | pattern | ours s | peer s | peer/ours | same mask | max |ΔW| |")
    print("|---|---|---|---|---|---|---|")
    for row in rows_out:
        print(
            f"| {row['shape']} | {row['pattern']} | {row['ours_s']:.3f} | {row['peer_s']:.3f} | {row['speedup']:.2f} "
            f"| {row['mask_agreement']:.5f} | {row['largest_weight_difference']:.2e} |"
        )


if __name__ == "__main__":
    main()
