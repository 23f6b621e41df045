"""Issue 6, utilization: how close one pruning run comes to the machine's matrix-multiply rate.

Prunes smollm2-135m (``--nsamples`` × ``--seqlen`` windows of sotu:train, seed 0) with this project's
settings, timing each part of the run, and counting the floating-point operations each part needs:

- forward passes: the block forwards over the calibration windows (dense, to observe; pruned, to
  advance), counted as they run: 2·in·out per token for each linear layer, and for attention
  2 · 2 · heads · head_dim per query-key pair that a causal decoder needs (half the square);
- Hessian accumulation: the symmetric half of XᵀX, tokens · w · (w + 1) per distinct layer input;
- factorizations: 2·n³/3 per layer (one Cholesky factorization and one triangular inverse of n × n);
- the sweep: rows · cols · (cols − 1) per layer (each column's error reaches every later column of its
  row), whatever the mask.

Each part's rate (useful FLOP / its time) is set against the rate at which this machine multiplies
matrices in the precision the part runs in (float32, or bfloat16 for forwards under ``--forward-dtype``,
and for Hessians summed from their bf16 inputs), measured in the same invocation: the best of ``F.linear``
(in float32 also of oneDNN's product) on a few large shapes and the model's own, and of the Gram product the Hessians use (both from
bench/throughput.py). The whole run's utilization is Σ part FLOP / part rate (the time a run at the
machine's rate would take) divided by its wall time; "other" is the time no part accounts for (input
capture, Python, copies).

    python bench/utilization.py [--nsamples 128] [--seqlen 512] [--pattern 2:4] [--forward-dtype bfloat16]

Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from throughput import gflops, gram_gflops
from torch.overrides import TorchFunctionMode

import sparsegpt
from sparsegpt import PruneConfig, data, pipeline
from sparsegpt.api import calibration_windows
from sparsegpt.linears import onednn_agrees, onednn_linear
from sparsegpt.pipeline import resolve_forward_dtype
from sparsegpt.report import versions
from sparsegpt.solver import NMPattern, hessian
from sparsegpt.solver import sparsegpt as solver
from sparsegpt.solver.gram import native_mixed_gram

PARTS = ("forward", "hessian", "factorization", "sweep")


class Ledger:
    """Seconds and useful FLOP per part of the run, and which precision each part's FLOP ran in."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.flop: dict[tuple[str, str], float] = defaultdict(float)  # (part, precision) -> FLOP

    def timed(self, part: str, function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        return wrapper


class ForwardCounter(TorchFunctionMode):
    """Counts the useful FLOP of linear layers, matrix products and attention as a forward runs."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flop = 0.0
        if func is F.linear:
            inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            flop = 2.0 * inputs.numel() / inputs.shape[-1] * weight.numel()
        elif func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            *batch, queries, head = query.shape
            keys = key.shape[-2]
            pairs = queries * (keys + 1) / 2 if queries == keys else queries * keys  # causal self-attention
            flop = 4.0 * torch.Size(batch).numel() * pairs * head
        elif func in (torch.matmul, torch.bmm, torch.Tensor.__matmul__):
            left, right = args[0], args[1]
            out = torch.broadcast_shapes(left.shape[:-2], right.shape[:-2]).numel()
            flop = 2.0 * out * left.shape[-2] * left.shape[-1] * right.shape[-1]
        if flop:
            precision = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else args[0].dtype
            self.ledger.flop[("forward", str(precision).removeprefix("torch."))] += flop
        return func(*args, **kwargs)


def instrument(ledger: Ledger) -> None:
    """Wrap the pipeline's parts (in this process only) so that they report their time and FLOP."""
    observe, advance = pipeline.observe_block, pipeline.advance_block
    add, factorize, prune = hessian.InputStatistics.add, solver.inverse_hessian_cholesky, pipeline.sparsegpt_prune

    def forwards(function: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with ForwardCounter(ledger):
                return function(*args, **kwargs)

        return ledger.timed("observe", run) if function is observe else ledger.timed("forward", run)

    def add_counted(self: hessian.InputStatistics, inputs: torch.Tensor, token_mask: Any = None) -> None:
        before = self.tokens
        add(self, inputs, token_mask)
        mixed = self.operands is not None and native_mixed_gram(self.operands)
        precision = self.operands if mixed else self.dtype
        ledger.flop[("hessian", str(precision).removeprefix("torch."))] += (
            (self.tokens - before) * self.width * (self.width + 1)
        )

    def factorize_counted(matrix: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        ledger.flop[("factorization", "float32")] += 2 * matrix.shape[0] ** 3 / 3
        return factorize(matrix, *args, **kwargs)

    def prune_counted(weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows, cols = weight.shape
        ledger.flop[("sweep", "float32")] += rows * cols * (cols - 1)
        return prune(weight, *args, **kwargs)

    pipeline.observe_block = forwards(observe)
    pipeline.advance_block = forwards(advance)
    hessian.InputStatistics.add = ledger.timed("hessian", add_counted)
    solver.inverse_hessian_cholesky = ledger.timed("factorization", factorize_counted)
    pipeline.sparsegpt_prune = ledger.timed("solve", prune_counted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--pattern", default="none", help="none (50%% unstructured) or N:M")
    parser.add_argument("--forward-dtype", default=PruneConfig.forward_dtype, help="default: the project's default")
    args = parser.parse_args()

    model, tokenizer, source = sparsegpt.load_model(args.model)
    pattern = None if args.pattern == "none" else NMPattern.parse(args.pattern)
    config = PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen, pattern=pattern, forward_dtype=args.forward_dtype)
    windows = calibration_windows(model, tokenizer, data.load_text("sotu:train"), config)

    hidden = model.config.hidden_size
    tokens = config.batch_size * args.seqlen
    shapes = [(2048, 2048, 2048), (tokens, hidden, model.config.intermediate_size), (hidden, tokens, hidden)]
    rates = {  # FLOP/s
        str(dtype).removeprefix("torch."): 1e9
        * max(
            [gflops(dtype, *shape) for shape in shapes]
            + [gflops(dtype, *shape, onednn_linear) for shape in shapes if dtype == torch.float32 and onednn_agrees()]
            + [gram_gflops(dtype, tokens, hidden)]
        )
        for dtype in (torch.float32, torch.bfloat16)
    }

    ledger = Ledger()
    instrument(ledger)
    started = time.perf_counter()
    pipeline.prune_model(model, config, windows)
    total = time.perf_counter() - started

    seconds = dict(ledger.seconds)
    seconds["forward"] = seconds.pop("forward", 0.0) + seconds.pop("observe") - seconds["hessian"]
    seconds["sweep"] = seconds.pop("solve") - seconds["factorization"]
    parts = []
    ideal_total = 0.0
    for part in PARTS:
        flop = {precision: value for (name, precision), value in ledger.flop.items() if name == part}
        ideal = sum(value / rates[precision] for precision, value in flop.items())
        ideal_total += ideal
        parts.append(
            {
                "part": part,
                "tflop": sum(flop.values()) / 1e12,
                "precision": ", ".join(sorted(flop)),
                "seconds": seconds[part],
                "gflop_per_s": sum(flop.values()) / seconds[part] / 1e9,
                "ideal_seconds": ideal,
                "utilization": ideal / seconds[part],
            }
        )
    accounted = sum(seconds[part] for part in PARTS)
    parts.append({"part": "other", "seconds": total - accounted})
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    result = {
        "model": source,
        "settings": {"nsamples": args.nsamples, "seqlen": args.seqlen, "pattern": args.pattern}
        | {"forward_dtype": resolve_forward_dtype(config, torch.float32, torch.device("cpu")) or "none"},
        "machine": machine,
        "versions": versions(),
        "matmul_gflop_per_s": {precision: rate / 1e9 for precision, rate in rates.items()},
        "parts": parts,
        "total_seconds": total,
        "utilization": ideal_total / total,
    }
    print(json.dumps(result))
    print(
        f"\nmatrix-multiply rate: {rates['float32'] / 1e9:.0f} GFLOP/s float32, "
        f"{rates['bfloat16'] / 1e9:.0f} GFLOP/s bfloat16\n"
    )
    print("| part | useful TFLOP | precision | s | GFLOP/s | s at the machine's rate | utilization |")
    print("|---|---|---|---|---|---|---|")
    for row in parts:
        if row["part"] == "other":
            print(f"| other | | | {row['seconds']:.1f} | | | |")
            continue
        print(
            f"| {row['part']} | {row['tflop']:.2f} | {row['precision']} | {row['seconds']:.1f} "
            f"| {row['gflop_per_s']:.0f} | {row['ideal_seconds']:.1f} | {row['utilization']:.0%} |"
        )
    print(f"| **whole run** | | | {total:.1f} | | {ideal_total:.1f} | **{ideal_total / total:.0%}** |")


if __name__ == "__main__":
    main()
