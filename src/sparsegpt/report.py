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
    rank: int | None = None  # the low-rank term's; ``error`` is then that of S + BA
    sparse_error: float | None = None  # with a low-rank term: the error of S alone
    scales: torch.Tensor | None = field(default=None, repr=False)  # quantized: grid per (row, group)
    zeros: torch.Tensor | None = field(default=None, repr=False)
    lora_b: torch.Tensor | None = field(default=None, repr=False)  # the low-rank term BA: B (out, r)
    lora_a: torch.Tensor | None = field(default=None, repr=False)  # and A (r, in)

    def to_dict(self) -> dict[str, Any]:
        """The record as the report shows it (tensors left out)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.name not in _TENSORS}


_TENSORS = ("scales", "zeros", "lora_b", "lora_a")


def low_rank_factors(layers: list[LayerRecord]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (B, A)} of the layers that have a low-rank term."""
    return {
        layer.name: (layer.lora_b, layer.lora_a)
        for layer in layers
        if layer.lora_b is not None and layer.lora_a is not None
    }


def factor_count(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The values the low-rank factors ``factors`` ({name: (B, A)}) hold."""
    return sum(b.numel() + a.numel() for b, a in factors.values())


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
    low_rank = {}
    factors = low_rank_factors(layers)
    if factors:
        count = factor_count(factors)
        dense = sum(layer.shape[0] * layer.shape[1] for layer in layers)
        low_rank = {"low_rank": {"layers": len(factors), "parameters": count, "share": count / dense}}
    return {
        "method": config.method,
        "pattern": str(config.pattern) if config.pattern else None,
        "sparsity": overall_sparsity(layers),
        "target_sparsity": config.target_sparsity,
        "prune_seconds": seconds,
        "model": model,
        **low_rank,
        **details,
        "layers": [layer.to_dict() for layer in layers],
        "config": config.to_dict(),
        "versions": versions(),
    }
