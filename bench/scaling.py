"""Are larger models easier to prune? Several model sizes × methods × levels, perplexity and zero-shot
accuracy against dense; and how much calibration text each method needs.

    python bench/scaling.py [--models smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]
        [--methods sparsegpt,wanda,magnitude] [--levels 0.5,2:4,0.7] [--nsamples 128] [--eval-windows 32]
        [--tasks arc_easy,...] [--limit 100] [--eval-precision auto] [--calibration-sizes 32,128,512]
        [--calibration-model qwen2.5-coder-0.5b] [--calibration-levels 0.5] [--results /tmp/scaling.jsonl]
        [--plot scaling.png]

For each model, one ``sparsegpt.sweep`` (loaded once, every method at every level pruned from the dense
weights; calibration ``--nsamples`` × 512 tokens of sotu:train, seed 0) scored on sotu:test (the
calibration's domain) and enwiki (out of it), ``--eval-windows`` windows of 512 tokens each, and on the
zero-shot tasks at ``--limit`` documents each. Then, on ``--calibration-model``, SparseGPT and Wanda at each of
``--calibration-levels`` calibrated on each of ``--calibration-sizes`` windows (perplexity only; ``--models ''``
runs only this part). Each finished sweep is appended to ``--results`` (JSON lines; a sweep already there,
with every method at every level, is not run again), and each row of a sweep is kept as it is measured
(``sparsegpt.journal``, beside ``--results``), so an interrupted run continues from its last row. Prints Markdown
tables (perplexity, mean accuracy, the relative perplexity increase over dense and the accuracy drop) and
draws ``--plot``: the relative increase against the parameter count, one line per method and level.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sparsegpt
from sparsegpt import OFFLINE_TASKS, PruneConfig, assets
from sparsegpt.journal import RowJournal

SOURCES = ("sotu:test", "enwiki")


def parameter_count(alias: str) -> int:
    """Parameters of a model alias (built without weights; tied weights counted once)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(assets.model_folder(alias))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def run_sweep(
    alias: str, kind: str, methods: list[str], levels: list[str], nsamples: int, args: argparse.Namespace
) -> dict:
    evaluations = [sparsegpt.Evaluation(source, 512, args.eval_windows, args.eval_precision) for source in SOURCES]
    tasks = sparsegpt.ZeroShot(args.tasks.split(","), args.limit) if args.tasks and kind == "sizes" else None
    config = PruneConfig(nsamples=nsamples, seqlen=512)
    settings = {"methods": methods, "levels": levels, "config": config.to_dict(), "windows": args.eval_windows}
    settings |= {"eval_precision": args.eval_precision, "tasks": args.tasks if tasks else None, "limit": args.limit}
    named = "+".join(levels).replace(":", "-")
    out = args.results.with_name(f"{args.results.stem}-{alias}-{kind}-{nsamples}-{named}")
    journal = RowJournal(out, settings, resume=True, overwrite=False)
    started = time.perf_counter()
    result = sparsegpt.sweep(
        alias,
        methods,
        levels,
        config,
        "sotu:train",
        evaluations,
        tasks=tasks,
        on_row=journal.append,
        finished=list(journal.rows),
    )
    journal.remove()
    return {"seconds": time.perf_counter() - started, "eval_precision": args.eval_precision, **result}


def done(path: Path) -> list[dict]:
    """The sweeps already in ``path``."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def covered(
    entries: list[dict], alias: str, kinds: tuple[str, ...], nsamples: int, methods: list[str], levels: list[str]
) -> bool:
    """Whether one sweep of ``entries`` (of ``alias``, one of ``kinds``, ``nsamples`` windows) holds a row for
    every method at every level."""
    for entry in entries:
        if (entry["alias"], entry["nsamples"]) == (alias, nsamples) and entry["kind"] in kinds:
            rows = {(row["method"], row.get("level")) for row in entry["rows"]}
            if all((method, level) in rows for method in methods for level in levels):
                return True
    return False


def relative(row: dict, dense: dict, source: str) -> float:
    return row["ppl"][source] / dense["ppl"][source] - 1


def size_table(entries: list[dict]) -> str:
    """Markdown: model × method × level -> perplexities, their increase over dense, mean acc and its drop."""
    tasks = any("tasks_average_acc" in row for entry in entries for row in entry["rows"])
    head = "| model | parameters | method | level | sotu:test | enwiki | Δ sotu | Δ enwiki |"
    head += " mean acc | Δ acc |" if tasks else ""
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for entry in entries:
        dense = next(row for row in entry["rows"] if row["method"] == "dense")
        for row in entry["rows"]:
            level = row.get("level", "-")
            cells = [f"{row['ppl'][source]:.2f}" for source in SOURCES]
            cells += ["-" if row is dense else f"{relative(row, dense, source):+.1%}" for source in SOURCES]
            if tasks and "tasks_average_acc" not in row:
                cells += ["-", "-"]  # this model's sweep scored no tasks
            elif tasks:
                drop = row["tasks_average_acc"] - dense["tasks_average_acc"]
                cells += [f"{row['tasks_average_acc']:.4f}", "-" if row is dense else f"{drop:+.4f}"]
            millions = f"{entry['parameters'] / 1e6:.0f}M"
            lines.append(f"| {entry['alias']} | {millions} | {row['method']} | {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(entries: list[dict], levels: list[str]) -> str:
    """Markdown: calibration windows × method × level (of ``levels``) -> perplexity in and out of the
    calibration's domain."""
    lines = ["| model | windows | method | level | sotu:test | enwiki | Δ sotu | Δ enwiki | prune s |"]
    lines.append("|---" * 9 + "|")
    found = [
        (levels.index(row["level"]), row["method"], entry["nsamples"], entry, row)
        for entry in entries
        for row in entry["rows"]
        if row["method"] in ("sparsegpt", "wanda") and row.get("level") in levels
    ]
    for _, method, windows, entry, row in sorted(found, key=lambda item: item[:3]):
        dense = next(other for other in entry["rows"] if other["method"] == "dense")
        cells = [f"{row['ppl'][source]:.2f}" for source in SOURCES]
        cells += [f"{relative(row, dense, source):+.1%}" for source in SOURCES]
        lines.append(
            f"| {entry['alias']} | {windows} | {method} | {row['level']} | "
            + " | ".join(cells)
            + f" | {row['prune_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(entries: list[dict], path: Path) -> None:
    """Relative perplexity increase over dense against parameters, one line per method and level, one
    panel per evaluation source."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot, ticker

    figure, panels = pyplot.subplots(1, len(SOURCES), figsize=(11, 4.5), sharey=True)
    try:
        keys = list(
            dict.fromkeys((row["method"], row["level"]) for e in entries for row in e["rows"] if "level" in row)
        )
        methods = list(dict.fromkeys(method for method, _ in keys))
        for panel, source in zip(panels, SOURCES):
            for method, level in keys:
                points = []
                for entry in sorted(entries, key=lambda entry: entry["parameters"]):
                    dense = next(row for row in entry["rows"] if row["method"] == "dense")
                    found = [r for r in entry["rows"] if r["method"] == method and r.get("level") == level]
                    if found:
                        points.append((entry["parameters"], relative(found[0], dense, source)))
                style = {"0.5": "-", "2:4": "--"}.get(level, ":")
                panel.plot(
                    *zip(*points),
                    marker="o",
                    linestyle=style,
                    color=f"C{methods.index(method)}",  # a colour per method, a line style per level
                    label=f"{method} {level}",
                )
            panel.set_xscale("log")
            panel.set_yscale("log")
            panel.yaxis.set_major_locator(ticker.FixedLocator([0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100]))
            panel.yaxis.set_major_formatter(ticker.PercentFormatter(1.0, decimals=0))
            panel.yaxis.set_minor_formatter(ticker.NullFormatter())
            panel.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value / 1e6:.0f}M"))
            panel.xaxis.set_minor_formatter(ticker.NullFormatter())
            panel.set_xticks([entry["parameters"] for entry in entries])
            panel.set_xlabel("parameters")
            panel.set_title(f"perplexity increase over dense, {source}", fontsize=9)
            panel.grid(True, which="both", alpha=0.3)
        panels[0].set_ylabel("perplexity increase over dense (log scale)")
        panels[-1].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    parser.add_argument("--levels", default="0.5,2:4,0.7")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--tasks", default=",".join(OFFLINE_TASKS), help="empty: no zero-shot tasks")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--eval-precision", default="auto", help="how perplexity is scored (sparsegpt.Evaluation)")
    parser.add_argument("--calibration-sizes", default="32,128,512", help="empty: skip this part")
    parser.add_argument("--calibration-model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--calibration-levels", default="0.5", help="levels of the calibration-size part")
    parser.add_argument("--results", type=Path, default=Path("/tmp/scaling.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("scaling.png"))
    args = parser.parse_args()
    methods, levels = args.methods.split(","), args.levels.split(",")
    calibration_levels = args.calibration_levels.split(",")
    plans = [(alias, "sizes", args.nsamples, methods, levels) for alias in filter(None, args.models.split(","))]
    for size in filter(None, args.calibration_sizes.split(",")):
        plans.append((args.calibration_model, "calibration", int(size), ["sparsegpt", "wanda"], calibration_levels))
    for alias, kind, nsamples, its_methods, its_levels in plans:
        # (a size sweep at the same calibration may already hold a calibration sweep's rows)
        kinds = ("sizes", "calibration") if kind == "calibration" else ("sizes",)
        if covered(done(args.results), alias, kinds, nsamples, its_methods, its_levels):
            continue
        result = run_sweep(alias, kind, its_methods, its_levels, nsamples, args)
        entry = {"alias": alias, "kind": kind, "nsamples": nsamples, "parameters": parameter_count(alias), **result}
        with args.results.open("a") as sink:
            sink.write(json.dumps(entry) + "\n")
        print(f"{alias} ({kind}, {nsamples} windows): {entry['seconds']:.0f} s", flush=True)
    entries = done(args.results)
    sizes = [entry for entry in entries if entry["kind"] == "sizes"]
    calibrations = [entry for entry in entries if entry["kind"] == "calibration"]
    calibrations += [e for e in sizes if e["alias"] == args.calibration_model]  # its size sweep: one more size
    if sizes:
        print(size_table(sorted(sizes, key=lambda entry: entry["parameters"])))
    if calibrations:
        print()
        print(calibration_table(calibrations, calibration_levels))
    if sizes:
        plot(sizes, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
