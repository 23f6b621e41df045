"""Pictures of results; needs matplotlib (``pip install sparsegpt[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsegpt.errors import SparseGPTError


def plot_sweep(result: dict[str, Any], path: str | Path, source: str | None = None) -> None:
    """Perplexity against sparsity for every method of a ``sweep`` result, as a PNG: one line per method
    over the unstructured levels, one marker per N:M pattern at its sparsity, dense as a dashed line.
    ``source`` picks the evaluation (default: the first)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise SparseGPTError("the plot needs matplotlib: pip install 'sparsegpt[plot]'") from None
    rows = result["rows"]
    sources = list(rows[0]["ppl"]) if rows else []
    if not sources:
        raise SparseGPTError("nothing to plot: the sweep measured no perplexity")
    source = source or sources[0]
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    try:
        methods = list(dict.fromkeys(row["method"] for row in rows if row["method"] != "dense"))
        for index, method in enumerate(methods):
            color = f"C{index}"
            mine = [row for row in rows if row["method"] == method]
            lines = sorted((row["sparsity"], row["ppl"][source]) for row in mine if ":" not in row["level"])
            if lines:
                axes.plot(*zip(*lines), marker="o", color=color, label=method)
            for row in mine:
                if ":" in row["level"]:
                    axes.scatter(row["sparsity"], row["ppl"][source], marker="s", color=color)
                    axes.annotate(
                        row["level"],
                        (row["sparsity"], row["ppl"][source]),
                        fontsize=8,
                        xytext=(4, 2),
                        textcoords="offset points",
                    )
        for row in rows:
            if row["method"] == "dense":
                axes.axhline(row["ppl"][source], color="gray", linestyle="--", label="dense")
        axes.set_yscale("log")
        axes.set_xlabel("sparsity of the pruned layers (squares: N:M patterns)")
        axes.set_ylabel(f"perplexity on {source}")
        axes.set_title(str(result.get("model", "")), fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        pyplot.close(figure)
