"""The library's entry points: prune a model, evaluate it, compare methods, save the result."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt import assets, data
from sparsegpt.config import PruneConfig, level, variant
from sparsegpt.distributed import Ranks
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import compact
from sparsegpt.formats.adapter import write_adapter
from sparsegpt.formats.atomic import write_folder_atomically, write_json_atomically
from sparsegpt.host import resolve_device
from sparsegpt.loading import load_model, load_tokenizer
from sparsegpt.models import (
    attach_low_rank,
    config_context_length,
    context_length,
    find_blocks,
    low_rank_hooks,
    read_config,
    resolve_dtype,
)
from sparsegpt.perplexity import check_eval_precision, perplexity, resolve_eval_precision
from sparsegpt.pipeline import prune_model, resolve_forward_dtype
from sparsegpt.report import (
    REPORT_NAME,
    LayerRecord,
    factor_count,
    low_rank_factors,
    overall_sparsity,
    prune_report,
    versions,
)
from sparsegpt.streaming import driver as streamed
from sparsegpt.zeroshot import TaskScore, ZeroShot, check_tasks, evaluate_tasks, task_summary
from sparsegpt.zeroshot import evaluate_tasks_streamed as _tasks_streamed

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A text to score and how: ``windows`` caps the number of windows (None = all); ``precision`` is one
    of ``perplexity.EVAL_PRECISIONS``: "auto" (split-bfloat16 products for a float32 model where the host
    runs them fast, else the model's own), "model", "split-bfloat16" or "bfloat16" (see
    ``sparsegpt.perplexity``). Streamed evaluation always scores in the model's own precision."""

    source: str
    seqlen: int
    windows: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_eval_precision(self.precision)


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
    eval_precision: dict[str, str] = field(default_factory=dict)  # per source: as scored, or "model"
    tasks: dict[str, TaskScore] = field(default_factory=dict)  # zero-shot scores, by task
    tasks_precision: str | None = None  # as the tasks were scored, or "model"

    @property
    def sparsity(self) -> float:
        """Share of zeros over all pruned weights."""
        return overall_sparsity(self.layers)

    def report(self) -> dict[str, Any]:
        """The report saved beside the model (``sparsegpt_report.json``)."""
        return prune_report(
            self.config,
            self.layers,
            self.prune_seconds,
            self.model_source,
            ppl=self.ppl,
            eval_precision=self.eval_precision,
            **task_summary(self.tasks, self.tasks_precision),
            calibration=self.calibration,
        )

    def write_low_rank(self, folder: Path) -> None:
        """The layers' low-rank terms as a PEFT LoRA adapter in ``folder`` (``formats.adapter``), if any."""
        factors = low_rank_factors(self.layers)
        transposed = {weight.name: weight.transposed for block in find_blocks(self.model) for weight in block.weights}
        dtype = next(self.model.parameters()).dtype
        write_adapter(folder, factors, dtype, any(transposed.get(name, False) for name in factors))

    def quant_specs(self) -> dict[str, compact.QuantSpec]:
        """The grid of every quantized weight tensor, by its state-dict name."""
        return quant_specs(self.model, self.layers, self.config)

    def save(self, out: str | Path, overwrite: bool = False, compact_format: bool = False) -> None:
        """Write a transformers folder (safetensors, config, tokenizer, the quantization grids when
        quantized) plus the report, atomically; or, with ``compact_format``, the compact folder."""
        out = Path(out)

        def fill(folder: Path) -> None:
            plain = folder / "plain" if compact_format else folder
            plain.mkdir(exist_ok=True)
            self.model.save_pretrained(plain)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(plain)
            compact.write_quant_sidecar(plain, self.quant_specs())
            self.write_low_rank(plain)
            write_json_atomically(plain / REPORT_NAME, self.report())
            if compact_format:
                compact.pack_into(plain, folder)
                shutil.rmtree(plain)

        write_folder_atomically(out, fill, overwrite)


def quant_specs(model: nn.Module, layers: list[LayerRecord], config: PruneConfig) -> dict[str, compact.QuantSpec]:
    """Gather the per-weight grids of ``layers`` by state-dict tensor (expert slices stacked in order).

    A tensor some of whose experts were not quantized gets no grid (it is then stored with its values).
    """
    grid = config.grid
    if grid is None:
        return {}
    parameters = dict(model.named_parameters())
    names = {id(param): name for name, param in parameters.items()}
    weights = {weight.name: weight for block in find_blocks(model) for weight in block.weights}
    slices: dict[str, list[tuple[int, LayerRecord, bool]]] = {}
    for layer in layers:
        if layer.scales is None or layer.zeros is None:
            continue
        weight = weights[layer.name]
        slices.setdefault(names[id(weight.parameter)], []).append((weight.expert or 0, layer, weight.transposed))
    specs = {}
    for name, parts in slices.items():
        parts.sort(key=lambda part: part[0])
        experts = parameters[name].shape[0] if parameters[name].ndim == 3 else 1
        if len(parts) != experts:
            log.warning("%s: only %d of %d experts were quantized; stored unquantized", name, len(parts), experts)
            continue
        scales = torch.cat([layer.scales for _, layer, _ in parts if layer.scales is not None])
        zeros = torch.cat([layer.zeros for _, layer, _ in parts if layer.zeros is not None])
        specs[name] = compact.QuantSpec(grid, scales.to(torch.float16), zeros.to(torch.uint8), parts[0][2])
    return specs


def capped_seqlen(model: nn.Module | Any, seqlen: int) -> int:
    """``seqlen`` limited to the context length of a model (or of a transformers config)."""
    limit = context_length(model) if isinstance(model, nn.Module) else config_context_length(model)
    if limit is not None and seqlen > limit:
        log.info("sequence length %d capped at the model's context length %d", seqlen, limit)
        return limit
    return seqlen


def calibration_windows(model: nn.Module, tokenizer: Any, text: data.Text, config: PruneConfig) -> torch.Tensor:
    """The calibration windows (nsamples, seqlen) of ``config`` from a text."""
    seqlen = capped_seqlen(model, config.seqlen)
    return data.calibration_windows(data.tokenize(text, tokenizer), config.nsamples, seqlen, config.seed)


def evaluate(model: nn.Module, tokenizer: Any, evaluation: Evaluation, progress: bool = False) -> tuple[str, float]:
    """Perplexity of ``model`` on a source; returns (source name, perplexity)."""
    text = data.load_text(evaluation.source, data.EVALUATION)
    seqlen = capped_seqlen(model, evaluation.seqlen)
    windows = data.evaluation_windows(data.tokenize(text, tokenizer), seqlen, evaluation.windows)
    return text.name, _score(model, windows, evaluation.precision, progress)[0]


def _score(model: nn.Module, windows: torch.Tensor, asked: str, progress: bool) -> tuple[float, str]:
    """(perplexity, the precision it was scored in, or "model") of ``windows`` with the precision ``asked``."""
    precision = resolve_eval_precision(asked, model)
    return perplexity(model, windows, progress=progress, precision=precision), precision or "model"


@dataclass
class _Prepared:
    """A loaded model with its calibration windows and evaluation windows, all checked."""

    model: nn.Module
    tokenizer: Any
    source: str
    calibration_name: str | None
    calibration: torch.Tensor | None
    evaluations: list[tuple[str, torch.Tensor, str]]  # (source name, windows, asked precision)


def _prepare(
    model: str | tuple[nn.Module, Any],
    config: PruneConfig,
    calibration: str | None,
    evaluations: list[Evaluation],
    dtype: str,
    needs_calibration: bool,
    tasks: ZeroShot | None = None,
) -> _Prepared:
    """Read and check every source (and zero-shot task) before the model is loaded, then tokenize and cut
    windows."""
    if needs_calibration and not calibration:
        raise SparseGPTError(f"{config.method} needs a calibration source")
    if tasks is not None:
        check_tasks(tasks.tasks)
    calib_text = data.load_text(calibration, data.CALIBRATION) if needs_calibration and calibration else None
    eval_texts = [data.load_text(evaluation.source, data.EVALUATION) for evaluation in evaluations]
    if isinstance(model, str):
        network, tokenizer, source = load_model(model, dtype)
    else:
        (network, tokenizer), source = model, type(model[0]).__name__
    windows = calibration_windows(network, tokenizer, calib_text, config) if calib_text else None
    scored = [
        (
            text.name,
            data.evaluation_windows(data.tokenize(text, tokenizer), capped_seqlen(network, e.seqlen), e.windows),
            e.precision,
        )
        for text, e in zip(eval_texts, evaluations)
    ]
    return _Prepared(network, tokenizer, source, calib_text.name if calib_text else None, windows, scored)


def _prune(prepared: _Prepared, config: PruneConfig, progress: bool, ranks: Ranks | None = None) -> PruneResult:
    if prepared.calibration is not None:
        config = replace(config, seqlen=prepared.calibration.shape[1])
    parameter = next(prepared.model.parameters())
    # the report names the precision the forwards ran in, not "auto"
    config = replace(config, forward_dtype=resolve_forward_dtype(config, parameter.dtype, parameter.device))
    calibration = prepared.calibration if config.needs_calibration else None
    started = time.perf_counter()
    layers = prune_model(prepared.model, config, calibration, progress=progress, ranks=ranks)
    return PruneResult(
        prepared.model,
        prepared.tokenizer,
        config,
        layers,
        time.perf_counter() - started,
        prepared.source,
        prepared.calibration_name if calibration is not None else None,
    )


def prune(
    model: str | tuple[nn.Module, Any],
    config: PruneConfig | None = None,
    calibration: str | None = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    progress: bool = False,
    ranks: Ranks | None = None,
    device: str = "cpu",
    tasks: ZeroShot | None = None,
) -> PruneResult:
    """Prune a model (a spec for ``load_model``, or a (model, tokenizer) pair pruned in place).

    Sources and tasks are read and checked before the model is touched; perplexities of ``evaluations``
    are measured after pruning and kept in ``result.ppl``, zero-shot scores of ``tasks`` (through
    lm-evaluation-harness, ``sparsegpt.zeroshot``) in ``result.tasks``. With a low-rank term
    (``config.low_rank``), ``result.model`` holds the sparse weights S and computes S + BA through forward
    hooks (``models.attach_low_rank``); ``save`` writes S and the factors. ``ranks``: this process's place in
    a multi-process run (``sparsegpt.distributed``); every process calls ``prune`` alike and gets the same
    model.
    """
    config = config or PruneConfig()
    prepared = _prepare(model, config, calibration, evaluations or [], dtype, config.needs_calibration, tasks)
    prepared.model.to(resolve_device(device))
    result = _prune(prepared, config, progress, ranks)
    attach_low_rank(prepared.model, low_rank_factors(result.layers))  # the model computes S + BA from now on
    for name, windows, asked in prepared.evaluations:
        result.ppl[name], result.eval_precision[name] = _score(prepared.model, windows, asked, progress)
    if tasks is not None:
        result.tasks, result.tasks_precision = evaluate_tasks(prepared.model, prepared.tokenizer, tasks, progress)
    return result


def compare(
    model: str,
    methods: list[str],
    config: PruneConfig | None = None,
    calibration: str = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    progress: bool = False,
    tasks: ZeroShot | None = None,
) -> dict[str, Any]:
    """Perplexity (and zero-shot scores of ``tasks``) of the dense model and of each pruning method, side by
    side, from one loaded model.

    ``methods`` may include ``dense`` and variants such as ``sparsegpt+owl+refine`` (see
    ``config.variant``: each variant sets the allocation, mask score, repair and refine of ``config`` to
    what its name says, taking only the repair and refine counts from ``config``). Returns {"rows": [{"method", "sparsity", "prune_seconds", "ppl"}], ...}.
    """
    config = config or PruneConfig()
    entries = [(method, None, None if method == "dense" else variant(config, method)) for method in methods]
    return _run_entries(model, config, entries, calibration, evaluations or [], dtype, progress, tasks)


def sweep(
    model: str,
    methods: list[str],
    levels: list[str],
    config: PruneConfig | None = None,
    calibration: str = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    progress: bool = False,
    tasks: ZeroShot | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    finished: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Perplexity (and zero-shot scores of ``tasks``) of every method (or variant) at every sparsity level
    (``0.7`` or ``2:4``), plus dense.

    Combinations that cannot be run (OWL with an N:M pattern, say) are listed under "skipped" with the
    reason. Returns {"rows": [{"method", "level", "sparsity", "prune_seconds", "ppl", "eval_precision"}],
    "skipped": [...], ...}. ``on_row`` is called with each row as soon as it is measured; rows in
    ``finished`` (those ``on_row`` saw in an interrupted sweep with the same settings) are taken as they are
    instead of being pruned and scored again.
    """
    config = config or PruneConfig()
    entries: list[tuple[str, str | None, PruneConfig | None]] = [("dense", None, None)]
    skipped = []
    for method in methods:  # unknown names and impossible combinations are errors, whatever the level
        variant(replace(config, pattern=None), method)
    for text in levels:
        at_level = level(config, text)
        for method in methods:
            try:
                entries.append((method, text, variant(at_level, method)))
            except SparseGPTError as error:
                skipped.append({"method": method, "level": text, "reason": str(error)})
                log.warning("skipping %s at %s: %s", method, text, error)
    result = _run_entries(
        model, config, entries, calibration, evaluations or [], dtype, progress, tasks, on_row, finished
    )
    result["skipped"] = skipped
    return result


def _run_entries(
    model: str,
    config: PruneConfig,
    entries: list[tuple[str, str | None, PruneConfig | None]],
    calibration: str,
    evaluations: list[Evaluation],
    dtype: str,
    progress: bool,
    tasks: ZeroShot | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    finished: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Load once, then for each (method, level, config) entry prune from the dense weights (None: stay
    dense) and measure every evaluation and task; an entry with a row in ``finished`` takes that row."""
    earlier = {(row["method"], row.get("level")): row for row in finished}
    entries_left = [entry for entry in entries if (entry[0], entry[1]) not in earlier]
    needs_calibration = any(entry.needs_calibration for _, _, entry in entries_left if entry is not None)
    prepared = _prepare(model, config, calibration, evaluations, dtype, needs_calibration, tasks)
    dense_state = {name: tensor.clone() for name, tensor in prepared.model.state_dict().items()}
    rows = []
    precisions: dict[str, str] = {}
    for method, level_text, entry in entries:
        if (method, level_text) in earlier:
            rows.append(earlier[method, level_text])
            precisions.update(earlier[method, level_text].get("eval_precision", {}))
            continue
        prepared.model.load_state_dict(dense_state)
        row: dict[str, Any] = {"method": method, "sparsity": 0.0, "prune_seconds": 0.0, "ppl": {}}
        if level_text is not None:
            row["level"] = level_text
        factors = {}
        if entry is not None:
            result = _prune(prepared, entry, progress)
            row.update(sparsity=result.sparsity, prune_seconds=result.prune_seconds)
            factors = low_rank_factors(result.layers)
            if factors:
                row["low_rank_parameters"] = factor_count(factors)
        with low_rank_hooks(prepared.model, factors):
            for name, windows, asked in prepared.evaluations:
                row["ppl"][name], precisions[name] = _score(prepared.model, windows, asked, progress)
            row["eval_precision"] = {name: precisions[name] for name in row["ppl"]}
            if tasks is not None:
                row.update(task_summary(*evaluate_tasks(prepared.model, prepared.tokenizer, tasks, progress)))
        rows.append(row)
        log.info("%s: %s", method, row)
        if on_row is not None:
            on_row(row)
    return {
        "model": prepared.source,
        "calibration": prepared.calibration_name,
        "config": config.to_dict(),
        "rows": rows,
        "eval_precision": precisions,
        "versions": versions(),
    }


def _stream_folder(model: str) -> Path:
    """The local transformers folder a streamed run reads (an alias resolves to its cached folder)."""
    if model in assets.MODEL_ALIASES:
        return assets.model_folder(model)
    if model.endswith(".gguf"):
        return assets.converted_gguf(Path(model))
    folder = Path(model)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise SparseGPTError(
            f"streaming reads a local transformers folder with safetensors weights; {model} is not one"
        )
    return folder


def plan_streamed(
    model: str,
    config: PruneConfig | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    offload_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The plan of a streamed prune (see ``sparsegpt.streaming.driver.plan``), reading no weights."""
    config = config or PruneConfig()
    folder = _stream_folder(model)
    config = replace(config, seqlen=capped_seqlen(read_config(folder), config.seqlen))
    return streamed.plan(
        folder,
        config,
        dtype=resolve_dtype(dtype),
        device=resolve_device(device),
        offload_dir=Path(offload_dir) if offload_dir else None,
    )


def prune_streamed(
    model: str,
    out: str | Path,
    config: PruneConfig | None = None,
    calibration: str | None = "sotu:train",
    evaluations: list[Evaluation] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    offload_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    tasks: ZeroShot | None = None,
) -> Any:
    """Prune a model folder into ``out`` one decoder block at a time (see ``sparsegpt.streaming.driver``):
    memory holds one block, its Hessians and the calibration activations (or, with ``offload_dir``, one
    batch of them). ``resume`` continues an interrupted run. Perplexities of ``evaluations`` and zero-shot
    scores of ``tasks`` are measured on the output, streamed the same way, into ``result.report``
    ("ppl", "tasks")."""
    config = config or PruneConfig()
    folder = _stream_folder(model)
    model_config = read_config(folder)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    offload = Path(offload_dir) if offload_dir else None
    evaluations = evaluations or []
    if config.needs_calibration and not calibration:
        raise SparseGPTError(f"{config.method} needs a calibration source")
    calib_text = data.load_text(calibration, data.CALIBRATION) if config.needs_calibration and calibration else None
    eval_texts = [data.load_text(evaluation.source, data.EVALUATION) for evaluation in evaluations]
    if tasks is not None:
        check_tasks(tasks.tasks)
    tokenizer = load_tokenizer(str(folder)) if calib_text or eval_texts or tasks else None
    windows = None
    if calib_text is not None:
        seqlen = capped_seqlen(model_config, config.seqlen)
        windows = data.calibration_windows(data.tokenize(calib_text, tokenizer), config.nsamples, seqlen, config.seed)
        config = replace(config, seqlen=seqlen)
    streamed.check_plan(streamed.plan(folder, config, dtype=torch_dtype, device=torch_device, offload_dir=offload))
    run = streamed.prune_streamed(
        folder,
        Path(out),
        config,
        windows,
        dtype=torch_dtype,
        device=torch_device,
        offload_dir=offload,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    run.report["ppl"] = {}
    for text, evaluation in zip(eval_texts, evaluations):
        scored = data.evaluation_windows(
            data.tokenize(text, tokenizer), capped_seqlen(model_config, evaluation.seqlen), evaluation.windows
        )
        run.report["ppl"][text.name] = streamed.perplexity_streamed(
            run.out, scored, dtype=torch_dtype, device=torch_device, offload_dir=offload, progress=progress
        )
    if tasks is not None:
        scores, precision = _tasks_streamed(
            run.out, tokenizer, tasks, dtype=torch_dtype, device=torch_device, offload_dir=offload, progress=progress
        )
        run.report.update(task_summary(scores, precision))
    if run.report["ppl"] or tasks is not None:
        write_json_atomically(run.out / REPORT_NAME, run.report)
    return run


def evaluate_tasks_streamed(
    model: str,
    tasks: ZeroShot,
    dtype: str = "auto",
    device: str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[dict[str, TaskScore], str]:
    """Zero-shot scores of a model folder (or alias, or GGUF file) holding one decoder block in memory at a
    time; returns them and the precision ("model")."""
    check_tasks(tasks.tasks)
    folder = _stream_folder(model)
    return _tasks_streamed(
        folder,
        load_tokenizer(str(folder)),
        tasks,
        dtype=resolve_dtype(dtype),
        device=resolve_device(device),
        offload_dir=Path(offload_dir) if offload_dir else None,
        progress=progress,
    )


def evaluate_streamed(
    model: str,
    evaluation: Evaluation,
    dtype: str = "auto",
    device: str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = False,
) -> tuple[str, float]:
    """Perplexity of a model folder holding one decoder block in memory at a time."""
    folder = _stream_folder(model)
    text = data.load_text(evaluation.source, data.EVALUATION)
    tokenizer = load_tokenizer(str(folder))
    seqlen = capped_seqlen(read_config(folder), evaluation.seqlen)
    windows = data.evaluation_windows(data.tokenize(text, tokenizer), seqlen, evaluation.windows)
    value = streamed.perplexity_streamed(
        folder,
        windows,
        dtype=resolve_dtype(dtype),
        device=resolve_device(device),
        offload_dir=Path(offload_dir) if offload_dir else None,
        progress=progress,
    )
    return text.name, value
