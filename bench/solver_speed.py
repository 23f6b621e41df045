"""Issue 6, the solver alone: this project's SparseGPT against llmcompressor 0.14's ``sparsify_weight``.

Both solve identical (W, H) pairs: W random normal, H = 2·XᵀX/n from n = 2048 correlated random inputs (a
few strong feature directions, as in transformer activations), 50% unstructured and 2:4, block size 128,
damping 0.01, fp32. Ours runs twice: with its default factorization of the inverse Hessian ("reversed",
one Cholesky and one triangular inverse) and with the peer's sequence ("inverse": Cholesky, inverse,
Cholesky; the same bits). Calls alternate (ours, ours inverse, peer, ...) in one process; medians are
reported with the time ratios, the share of mask entries that agree and the largest weight difference.

Run it with the peer's interpreter (its virtualenv: ``common.PEER_VENV``, bench/README.md) and this
project's sources on the path:

    PYTHONPATH=src /tmp/lcvenv/bin/python bench/solver_speed.py [--shapes 576x576,1536x576] [--repeats 3]

Prints one JSON line per case and a Markdown table.

``--accuracy`` instead compares the three float32 solutions (the peer's, ours with each factorization)
with a float64 solve of the same problem: the share of mask entries each shares with it, and each one's
layer loss Σ (ŵ − w)ᵀ H (ŵ − w) relative to the float64 solution's (``--seeds`` problems per shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

from sparsegpt.solver import NMPattern, sparsegpt_prune
from sparsegpt.solver.baselines import layer_loss

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


def ours_reference_factorization(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: NMPattern | None
) -> torch.Tensor:
    """The same, with U computed by the reference's (and the peer's) sequence of operations."""
    return sparsegpt_prune(weight, hessian, 0.5, pattern, 128, 0.01, factorization="inverse").weight


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


def accuracy(shapes: str, patterns: str, seeds: str) -> None:
    """Each float32 solution against a float64 solve: shared mask entries and relative layer loss."""
    solvers = {"peer": peer, "ours": ours, "ours_inverse": ours_reference_factorization}
    print("| W shape | seed | pattern | " + " | ".join(f"{name}: same mask, loss" for name in solvers) + " |")
    print("|---|---|---|" + "---|" * len(solvers))
    for shape in shapes.split(","):
        rows, cols = (int(size) for size in shape.split("x"))
        for seed in (int(text) for text in seeds.split(",")):
            weight, hessian = problem(rows, cols, seed)
            for text in patterns.split(","):
                pattern = None if text == "none" else NMPattern.parse(text)
                exact = sparsegpt_prune(weight.double(), hessian.double(), 0.5, pattern, 128, 0.01).weight
                exact_loss = layer_loss(exact, weight, hessian)
                row = {"shape": shape, "seed": seed, "pattern": text}
                for name, solve in solvers.items():
                    solved = solve(weight, hessian, pattern).detach()
                    row[f"{name}_mask_agreement"] = float(((solved == 0) == (exact == 0)).float().mean())
                    row[f"{name}_loss_ratio"] = layer_loss(solved, weight, hessian) / exact_loss
                print(json.dumps(row), flush=True)
                cells = [f"{row[f'{name}_mask_agreement']:.6f}, {row[f'{name}_loss_ratio']:.4f}" for name in solvers]
                print(f"| {shape} | {seed} | {text} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="ROWSxCOLS of W, comma-separated")
    parser.add_argument("--patterns", default="none,2:4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true", help="compare with a float64 solve instead of timing")
    parser.add_argument("--seeds", default="0,1", help="problems per shape for --accuracy")
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args.shapes, args.patterns, args.seeds)
        return
    rows_out = []
    for shape in args.shapes.split(","):
        rows, cols = (int(size) for size in shape.split("x"))
        weight, hessian = problem(rows, cols)
        for text in args.patterns.split(","):
            pattern = None if text == "none" else NMPattern.parse(text)
            solvers = {"ours": ours, "ours_inverse": ours_reference_factorization, "peer": peer}
            times: dict[str, list[float]] = {name: [] for name in solvers}
            results = {}
            for _ in range(args.repeats):
                for name, solve in solvers.items():
                    seconds, results[name] = timed(solve, weight, hessian, pattern)
                    times[name].append(seconds)
            theirs = results["peer"]
            row = {"shape": shape, "pattern": text, "threads": torch.get_num_threads()}
            row |= {f"{name}_s": statistics.median(times[name]) for name in solvers}
            for name in ("ours", "ours_inverse"):
                mine = results[name]
                row[f"{name}_speedup"] = row["peer_s"] / row[f"{name}_s"]
                row[f"{name}_mask_agreement"] = float(((mine == 0) == (theirs == 0)).float().mean())
                row[f"{name}_largest_weight_difference"] = float((mine - theirs.to(mine.dtype)).abs().max())
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    print("| W shape | pattern | peer s | ours s | peer/ours | same mask | ours (inverse) s | peer/ours | same mask |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows_out:
        print(
            f"| {row['shape']} | {row['pattern']} | {row['peer_s']:.3f} | {row['ours_s']:.3f} "
            f"| {row['ours_speedup']:.2f} | {row['ours_mask_agreement']:.5f} | {row['ours_inverse_s']:.3f} "
            f"| {row['ours_inverse_speedup']:.2f} | {row['ours_inverse_mask_agreement']:.6f} |"
        )


if __name__ == "__main__":
    main()
