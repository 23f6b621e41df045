"""What a pruning run records: one ``LayerRecord`` per weight matrix, and the report written beside the
pruned model (``sparsegpt_report.json``)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from sparsegpt._version import __version__
from sparsegpt.config import PruneConfig

REPORT_NAME = "sparsegpt_report.json"


@dataclass
class LayerRecord:
    """What happened to one weight matrix."""

    name: str
    shape: list[int]
    sparsity: float
    error: float | None
    seconds: float
    damp: float | None = None
    note: str | None = None
    swaps: int | None = None  # mask repair: prune-and-grow pairs taken
    refine_iterations: int | None = None
    scales: torch.Tensor | None = field(default=None, repr=False)  # quantized: grid per (row, group)
    zeros: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as the report shows it (grids left out)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.name not in ("scales", "zeros")}


def overall_sparsity(layers: list[LayerRecord]) -> float:
    """Share of zeros over all the weights of ``layers``."""
    total = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in layers)
    return zeros / total if total else 0.0


def versions() -> dict[str, str]:
    """The versions that made a result: this package, torch, transformers, Python."""
    import transformers

    return {
        "sparsegpt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prune_report(
    config: PruneConfig, layers: list[LayerRecord], seconds: float, model: str, **details: Any
) -> dict[str, Any]:
    """The report of a pruning run: method, pattern, achieved and target sparsity, time, where the model
    came from, ``details`` (perplexities, calibration source, ...), every layer, the config, the versions."""
    return {
        "method": config.method,
        "pattern": str(config.pattern) if config.pattern else None,
        "sparsity": overall_sparsity(layers),
        "target_sparsity": config.target_sparsity,
        "prune_seconds": seconds,
        "model": model,
        **details,
        "layers": [layer.to_dict() for layer in layers],
        "config": config.to_dict(),
        "versions": versions(),
    }
