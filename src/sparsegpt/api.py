"""The library's entry points: prune a model, evaluate it, compare methods, save the result."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt import data
from sparsegpt.config import PruneConfig
from sparsegpt.errors import SparseGPTError
from sparsegpt.evaluate import perplexity
from sparsegpt.io import REPORT_NAME, write_folder_atomically, write_json_atomically
from sparsegpt.models import context_length, load_model
from sparsegpt.pipeline import LayerRecord, prune_model

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A text to score and how: ``windows`` caps the number of windows (None = all)."""

    source: str
    seqlen: int
    windows: int | None = None


@dataclass
class PruneResult:
    """A pruned model in memory with everything the report says about it."""

    model: nn.Module
    tokenizer: Any
    config: PruneConfig
    layers: list[LayerRecord]
    prune_seconds: float
    model_source: str
    calibration: str | None
    ppl: dict[str, float] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Share of zeros over all pruned weights."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / total if total else 0.0

    def report(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "pattern": str(self.config.pattern) if self.config.pattern else None,
            "sparsity": self.sparsity,
            "target_sparsity": self.config.target_sparsity,
            "prune_seconds": self.prune_seconds,
            "ppl": self.ppl,
            "model": self.model_source,
            "calibration": self.calibration,
            "layers": [asdict(layer) for layer in self.layers],
            "config": self.config.to_dict(),
            "versions": versions(),
        }

    def save(self, out: Path, overwrite: bool = False) -> None:
        """Write a transformers folder (safetensors, config, tokenizer) plus the report, atomically."""

        def fill(folder: Path) -> None:
            self.model.save_pretrained(folder)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
            write_json_atomically(folder / REPORT_NAME, self.report())

        write_folder_atomically(out, fill, overwrite)


def versions() -> dict[str, str]:
    import transformers

    from sparsegpt import __version__

    return {"sparsegpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def capped_seqlen(model: nn.Module, seqlen: int) -> int:
    """``seqlen`` limited to the model's context length."""
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        log.info("sequence length %d capped at the model's context length %d", seqlen, limit)
        return limit
    return seqlen


def calibration_windows(model: nn.Module, tokenizer: Any, text: data.Text, config: PruneConfig) -> torch.Tensor:
    """The calibration windows (nsamples, seqlen) of ``config`` from a text."""
    seqlen = capped_seqlen(model, config.seqlen)
    return data.calibration_windows(data.tokenize(text, tokenizer), config.nsamples, seqlen, config.seed)


def evaluate(model: nn.Module, tokenizer: Any, evaluation: Evaluation, progress: bool = False,
             text: data.Text | None = None) -> tuple[str, float]:
    """Perplexity of ``model`` on a source; returns (source name, perplexity)."""
    text = text or data.load_text(evaluation.source, data.EVALUATION)
    seqlen = capped_seqlen(model, evaluation.seqlen)
    windows = data.evaluation_windows(data.tokenize(text, tokenizer), seqlen, evaluation.windows)
    return text.name, perplexity(model, windows, progress=progress)


def prune(
    model: str | tuple[nn.Module, Any],
    config: PruneConfig | None = None,
    calibration: str | None = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    progress: bool = False,
) -> PruneResult:
    """Prune a model (a spec for ``load_model``, or a (model, tokenizer) pair pruned in place).

    Sources are read and checked before the model is touched; perplexities of ``evaluations`` are
    measured after pruning and kept in ``result.ppl``.
    """
    config = config or PruneConfig()
    evaluations = evaluations or []
    calib_text = data.load_text(calibration, data.CALIBRATION) if config.needs_calibration and calibration else None
    if config.needs_calibration and calib_text is None:
        raise SparseGPTError(f"{config.method} needs a calibration source")
    eval_texts = [data.load_text(e.source, data.EVALUATION) for e in evaluations]
    if isinstance(model, str):
        network, tokenizer, source = load_model(model, dtype)
    else:
        (network, tokenizer), source = model, type(model[0]).__name__
    windows = calibration_windows(network, tokenizer, calib_text, config) if calib_text else None
    eval_windows = [
        data.evaluation_windows(data.tokenize(text, tokenizer), capped_seqlen(network, e.seqlen), e.windows)
        for text, e in zip(eval_texts, evaluations)
    ]
    if windows is not None:
        config = replace(config, seqlen=windows.shape[1])
    started = time.perf_counter()
    layers = prune_model(network, config, windows, progress=progress)
    result = PruneResult(network, tokenizer, config, layers, time.perf_counter() - started, source,
                         calib_text.name if calib_text else None)
    for text, windows_ in zip(eval_texts, eval_windows):
        result.ppl[text.name] = perplexity(network, windows_, progress=progress)
    return result


def compare(
    model: str,
    methods: list[str],
    config: PruneConfig | None = None,
    calibration: str = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of the dense model and of each pruning method, side by side, from one loaded model.

    ``methods`` may include ``dense``. Returns {"rows": [{"method", "sparsity", "prune_seconds", "ppl"}], ...}.
    """
    config = config or PruneConfig()
    evaluations = evaluations or []
    for method in methods:
        if method != "dense":
            replace(config, method=method)  # validates the name
    calib_text = data.load_text(calibration, data.CALIBRATION)
    eval_texts = [data.load_text(e.source, data.EVALUATION) for e in evaluations]
    network, tokenizer, source = load_model(model, dtype)
    windows = calibration_windows(network, tokenizer, calib_text, config)
    eval_windows = [
        data.evaluation_windows(data.tokenize(text, tokenizer), capped_seqlen(network, e.seqlen), e.windows)
        for text, e in zip(eval_texts, evaluations)
    ]
    dense_state = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    rows = []
    for method in methods:
        network.load_state_dict(dense_state)
        row: dict[str, Any] = {"method": method, "sparsity": 0.0, "prune_seconds": 0.0, "ppl": {}}
        if method != "dense":
            method_config = replace(config, method=method, seqlen=windows.shape[1])
            started = time.perf_counter()
            layers = prune_model(network, method_config, windows if method_config.needs_calibration else None, progress)
            row["prune_seconds"] = time.perf_counter() - started
            result = PruneResult(network, tokenizer, method_config, layers, row["prune_seconds"], source, calib_text.name)
            row["sparsity"] = result.sparsity
        for text, windows_ in zip(eval_texts, eval_windows):
            row["ppl"][text.name] = perplexity(network, windows_, progress=progress)
        rows.append(row)
        log.info("%s: %s", method, row)
    return {"model": source, "calibration": calib_text.name, "config": config.to_dict(), "rows": rows,
            "versions": versions()}
