"""Pruning and evaluating a model folder block by block, with durable progress.

The output is built in a fixed sibling folder ``.<out>.sparsegpt-partial``: after each block, its pruned
tensors (one shard per block), its quantization grids, the activations the next block needs and
``progress.json`` (written last) are on disk. A run started again with ``resume`` reads the progress,
checks that it was made with the same settings, and continues; nothing else of the interrupted run is
trusted. When every block is done the remaining files are written, the progress files removed, and the
folder moved into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparsegpt.config import PruneConfig
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import compact
from sparsegpt.formats.adapter import has_adapter, read_adapter, write_adapter
from sparsegpt.formats.atomic import check_output_folder, partial_folder, publish_folder, write_json_atomically
from sparsegpt.formats.shards import INDEX_NAME, itemsize, load_safetensors, read_header, save_durably
from sparsegpt.host import available_memory
from sparsegpt.models import Block, find_weights, low_rank_hooks
from sparsegpt.perplexity import nll_of_logits, perplexity_of
from sparsegpt.pipeline import (
    advance_block,
    capture_block_inputs,
    chosen_weights,
    logits_after_blocks,
    prune_block,
    resolve_forward_dtype,
)
from sparsegpt.report import REPORT_NAME, LayerRecord, low_rank_factors, prune_report
from sparsegpt.streaming.activations import Activations
from sparsegpt.streaming.weights import Skeleton, open_skeleton

log = logging.getLogger(__name__)

PROGRESS_NAME = "progress.json"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".gguf")
_OWN_FILES = {REPORT_NAME, compact.QUANT_SIDECAR, compact.MANIFEST, INDEX_NAME, PROGRESS_NAME}


@dataclass
class StreamedRun:
    """What a streamed prune produced (the folder is already written)."""

    out: Path
    layers: list[LayerRecord]
    prune_seconds: float
    resumed_at: int | None
    report: dict[str, Any] = field(default_factory=dict)


def _fingerprint(
    folder: Path, config: PruneConfig, calibration: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> dict[str, Any]:
    digest = hashlib.sha256(calibration.numpy().tobytes()).hexdigest() if calibration is not None else None
    fingerprint = {
        "model": str(folder.resolve()),
        "config": config.to_dict(),
        "calibration_sha256": digest,
        "dtype": str(dtype),
        "device": device.type,
    }
    return json.loads(json.dumps(fingerprint))  # as it reads back from progress.json


def _shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _grids_name(index: int) -> str:
    return f"grids-{index:05d}.safetensors"


def _save_records(folder: Path, index: int, records: list[LayerRecord]) -> list[dict[str, Any]]:
    tensors = {}
    for record in records:
        for part in _RECORD_TENSORS:
            value = getattr(record, part)
            if value is not None:
                tensors[f"{record.name}::{part}"] = value
    if tensors:
        save_durably(tensors, folder / _grids_name(index))
    return [record.to_dict() for record in records]


def _load_records(folder: Path, index: int, saved: list[dict[str, Any]]) -> list[LayerRecord]:
    grids: dict[str, torch.Tensor] = {}
    if (folder / _grids_name(index)).is_file():
        grids = load_safetensors(folder / _grids_name(index))
    return [
        LayerRecord(**item, **{part: grids.get(f"{item['name']}::{part}") for part in _RECORD_TENSORS})
        for item in saved
    ]


_RECORD_TENSORS = ("scales", "zeros", "lora_b", "lora_a")  # what a block's side file keeps of its records


def _copy_side_files(source: Path, target: Path) -> None:
    """Config, tokenizer and the like: every file of the source folder that holds no weights."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_FILES) and path.name not in _OWN_FILES:
            shutil.copy2(path, target / path.name)


def _quant_specs(skeleton: Skeleton, layers: list[LayerRecord], config: PruneConfig) -> dict[str, compact.QuantSpec]:
    grid = config.grid
    if grid is None:
        return {}
    specs = {}
    for layer in layers:
        if layer.scales is None or layer.zeros is None or layer.name.split(".")[-1].isdigit():
            continue  # expert slices of fused banks are stored unquantized in streamed runs
        transposed = _is_transposed(skeleton, layer.name)
        specs[f"{layer.name}.weight"] = compact.QuantSpec(
            grid, layer.scales.to(torch.float16), layer.zeros.to(torch.uint8), transposed
        )
    return specs


def _is_transposed(skeleton: Skeleton, name: str) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(skeleton.model.get_submodule(name), Conv1D)


def prune_streamed(
    folder: Path,
    out: Path,
    config: PruneConfig,
    calibration: torch.Tensor | None,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | None = None,
    offload_dir: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> StreamedRun:
    """Prune the model in ``folder`` into ``out`` with at most one decoder block in memory.

    ``calibration`` holds the token windows (None for magnitude pruning). With ``offload_dir`` the
    activations between blocks live in files there instead of memory. ``resume`` continues an
    interrupted run to the same ``out`` (bitwise the same result as an uninterrupted run).
    """
    device = device or torch.device("cpu")
    if config.allocation != "uniform":
        raise SparseGPTError(
            f"--allocation {config.allocation} needs every block's dense activations before the first is pruned; "
            "it is not available with --stream yet"
        )
    check_output_folder(out, overwrite)
    work = partial_folder(out)
    started = time.perf_counter()
    with ExitStack() as stack:
        skeleton = open_skeleton(folder, dtype, device, stack, output_layer=False, input_embedding=False)
        config = replace(config, forward_dtype=resolve_forward_dtype(config, skeleton.dtype, device))
        fingerprint = _fingerprint(folder, config, calibration, skeleton.dtype, device)
        state = _start(work, fingerprint, resume, overwrite)
        total = len(skeleton.blocks)
        layers: list[LayerRecord] = []
        for index in range(state["done"]):
            layers.extend(_load_records(work, index, state["records"][index]))
        resumed_at = state["done"] if resume and state["done"] else None
        if resumed_at is not None:
            log.info("resuming %s after block %d of %d", out, resumed_at, total)
        if config.needs_calibration:
            if calibration is None:
                raise SparseGPTError(f"{config.method} needs calibration data")
            layers.extend(_calibrated(skeleton, work, state, config, calibration, offload_dir, progress))
        else:
            skeleton.release_outside()
            for index in tqdm(range(state["done"], total), desc="pruning blocks", disable=not progress):
                block = skeleton.load_block(index)
                records = prune_block(block, chosen_weights(block, config), [], [], device, config, False)
                del block
                _finish_block(skeleton, work, state, index, records, None)
                layers.extend(records)
        if not layers:
            raise SparseGPTError("no prunable layers: every linear layer of the model is skipped")
        seconds = time.perf_counter() - started
        report = _finalize(skeleton, folder, work, layers, config, seconds)
    publish_folder(work, out, overwrite)
    return StreamedRun(out, layers, seconds, resumed_at, report)


def _start(work: Path, fingerprint: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
    progress_file = work / PROGRESS_NAME
    if work.exists() and progress_file.is_file() and not overwrite:
        state = json.loads(progress_file.read_text())
        if not resume:
            raise SparseGPTError(
                f"an interrupted run to this output is at {work} ({state['done']} blocks done): "
                "use --resume to continue it, or --overwrite to start again"
            )
        if state["fingerprint"] != fingerprint:
            changed = sorted(key for key in fingerprint if fingerprint[key] != state["fingerprint"].get(key))
            raise SparseGPTError(
                f"cannot resume {work}: it was made with different {', '.join(changed)}; use --overwrite to start again"
            )
        return state
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    return {"fingerprint": fingerprint, "done": 0, "records": [], "activations": None}


@torch.no_grad()
def _calibrated(
    skeleton: Skeleton,
    work: Path,
    state: dict[str, Any],
    config: PruneConfig,
    calibration: torch.Tensor,
    offload_dir: Path | None,
    progress: bool,
) -> list[LayerRecord]:
    device = skeleton.device
    batches = list(calibration.to(device).split(config.batch_size))
    modules = list(skeleton.blocks)
    total = len(modules)
    first = skeleton.load_block(0)  # the structure blocks return is learnt from a real call of block 0
    rows = torch.unique(calibration)  # the embedding's rows the calibration tokens read, sorted
    with skeleton.embedding_rows(rows):
        entering, calls = capture_block_inputs(
            skeleton.model,
            [first] + [_stub(skeleton, i) for i in range(1, total)],
            [torch.searchsorted(rows.to(device), batch) for batch in batches],
        )
    skeleton.release_outside()  # the blocks' inputs are known: the embedding is not needed again
    if state["done"] == total:  # killed while finishing: only the last files are missing
        skeleton.release_block(0)
        return []
    if state["done"] == 0:
        if offload_dir is not None:
            offload_dir.mkdir(parents=True, exist_ok=True)
        hidden = Activations(len(batches), device, offload_dir)
        hidden.fill(entering)
    else:
        skeleton.release_block(0)
        hidden = Activations.restore(state["activations"], len(batches), device, work)
    del entering
    block: Block | None = first if state["done"] == 0 else None
    del first
    layers = []
    for index in tqdm(
        range(state["done"], total), initial=state["done"], total=total, desc="pruning blocks", disable=not progress
    ):
        block = block or skeleton.load_block(index)
        advance = index < total - 1
        records = prune_block(block, chosen_weights(block, config), hidden, calls[index], device, config, advance)
        if advance:
            hidden.commit()
        block = None  # no holder of the block's tensors may be left when it is released
        _finish_block(skeleton, work, state, index, records, hidden if advance else None)
        layers.extend(records)
    hidden.clear()
    return layers


def _stub(skeleton: Skeleton, index: int) -> Block:
    return Block(skeleton.block_name(index), skeleton.blocks[index], [])


def _finish_block(
    skeleton: Skeleton,
    work: Path,
    state: dict[str, Any],
    index: int,
    records: list[LayerRecord],
    hidden: Activations | None,
) -> None:
    """Write block ``index`` out, free it, and record the progress (the progress file last)."""
    total = len(skeleton.blocks) + 1
    save_durably(skeleton.block_tensors(index), work / _shard_name(index, total))
    skeleton.release_block(index)
    state["records"].append(_save_records(work, index, records))
    previous = state["activations"]
    if hidden is not None:
        state["activations"] = hidden.checkpoint(work)
    state["done"] = index + 1
    write_json_atomically(work / PROGRESS_NAME, state)
    if hidden is not None:
        hidden.drop_old()
        if previous is not None and previous != state["activations"]:
            hidden.forget_checkpoint(work, previous)


def _finalize(
    skeleton: Skeleton, folder: Path, work: Path, layers: list[LayerRecord], config: PruneConfig, seconds: float
) -> dict[str, Any]:
    """The last shard, the index, side files, grids and report; progress files removed."""
    blocks = len(skeleton.blocks)
    total = blocks + 1
    others = skeleton.other_tensors()
    save_durably(others, work / _shard_name(blocks, total))
    weight_map: dict[str, str] = {}
    size = 0
    for index in range(total):
        name = _shard_name(index, total)
        start, header = read_header(work / name)
        for key, entry in header.items():
            weight_map[key] = name
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
    write_json_atomically(work / INDEX_NAME, {"metadata": {"total_size": size}, "weight_map": weight_map})
    _copy_side_files(folder, work)
    compact.write_quant_sidecar(work, _quant_specs(skeleton, layers, config))
    factors = low_rank_factors(layers)
    write_adapter(work, factors, skeleton.dtype, any(_is_transposed(skeleton, name) for name in factors))
    report = prune_report(config, layers, seconds, str(folder), streamed=True)
    write_json_atomically(work / REPORT_NAME, report)
    for path in list(work.iterdir()):
        if path.name == PROGRESS_NAME or path.name.startswith(("activations-", "grids-")):
            path.unlink()
    return report


@torch.no_grad()
def perplexity_streamed(
    folder: Path,
    windows: torch.Tensor,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | None = None,
    offload_dir: Path | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """Perplexity of the model in ``folder`` on ``windows``, holding one decoder block at a time."""
    device = device or torch.device("cpu")
    sums: list[torch.Tensor] = []
    with ExitStack() as stack:
        skeleton = open_skeleton(folder, dtype, device, stack)
        batches = list(windows.to(device).split(batch_size))

        def score(index: int, logits: torch.Tensor) -> None:
            sums.extend(nll_of_logits(logits, batches[index]))

        logits_streamed(skeleton, batches, score, offload_dir, "perplexity (streamed)", progress)
    return perplexity_of(torch.cat(sums), windows)


@torch.no_grad()
def logits_streamed(
    skeleton: Skeleton,
    batches: list[torch.Tensor],
    consume: Any,
    offload_dir: Path | None = None,
    description: str = "blocks (streamed)",
    progress: bool = False,
) -> None:
    """Run token ``batches`` (each its own length) through ``skeleton``'s blocks, one block in memory at a
    time, then call ``consume(index, logits)`` for each batch in order (logits are not kept)."""
    total = len(skeleton.blocks)
    template: list[Any] = []
    first = skeleton.load_block(0)
    entering, calls = capture_block_inputs(
        skeleton.model, [first] + [_stub(skeleton, i) for i in range(1, total)], batches, template
    )
    if offload_dir is not None:
        offload_dir.mkdir(parents=True, exist_ok=True)
    hidden = Activations(len(batches), skeleton.device, offload_dir)
    hidden.fill(entering)
    del entering
    block: Block | None = first
    del first
    folder = skeleton.source.folder
    factors = read_adapter(folder) if has_adapter(folder) else {}  # S + BA where the folder has low-rank terms
    for index in tqdm(range(total), desc=description, disable=not progress):
        block = block or skeleton.load_block(index)
        inside = {name: pair for name, pair in factors.items() if name.startswith(f"{block.name}.")}
        with low_rank_hooks(block.module, inside, block.name):
            advance_block(block, hidden, calls[index])
        block = None
        hidden.commit()
        hidden.drop_old()
        skeleton.release_block(index)
    for index, (batch, final) in enumerate(zip(batches, hidden)):
        consume(index, logits_after_blocks(skeleton.model, list(skeleton.blocks), batch, final, template[0]))
    hidden.clear()


PROCESS_BASELINE = 600 * 2**20
"""Resident memory of a process that has imported torch and transformers (measured: 0.5-0.6 GiB)."""


def plan(
    folder: Path,
    config: PruneConfig,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | None = None,
    offload_dir: Path | None = None,
) -> dict[str, Any]:
    """What a streamed prune of ``folder`` would hold, without reading any weight: blocks, layers,
    Hessians, activations, and the expected peak memory on each device (estimates, upper bounds where
    the sharing of inputs is not known before running)."""
    device = device or torch.device("cpu")
    with ExitStack() as stack:
        skeleton = open_skeleton(folder, dtype, device, stack, load=False)
        size = itemsize(skeleton.dtype)
        config_hidden = getattr(skeleton.model.config, "hidden_size", None)
        blocks = []
        for index, module in enumerate(skeleton.blocks):
            weights = find_weights(module, skeleton.block_name(index))
            chosen = [(w, config.sparsity_for(w.name)) for w in weights]
            shapes = [tuple(w.matrix().shape) for w, sparsity in chosen if sparsity is not None]
            blocks.append(
                {
                    "name": skeleton.block_name(index),
                    "bytes": sum(p.numel() for p in module.parameters()) * size,
                    "layers": len(shapes),
                    "hessian_bytes": sum(cols * cols * 4 for _, cols in shapes) if config.needs_hessian else 0,
                    "largest_layer": max(shapes, key=lambda shape: shape[0] * shape[1]) if shapes else None,
                    "widest_output": max((rows for rows, _ in shapes), default=0),
                }
            )
        head, embedding = skeleton.model.get_output_embeddings(), skeleton.model.get_input_embeddings()
        own_head = {id(p) for p in head.parameters()} if head is not None else set()
        own_head -= {id(p) for p in embedding.parameters()} if embedding is not None else set()  # tied
        outside = [
            (id(p) in own_head, p.numel())
            for name, p in skeleton.model.named_parameters()
            if not name.startswith(f"{skeleton.list_name}.")
        ]
        others = sum(count for _, count in outside) * size
        others_but_head = sum(count for is_head, count in outside if not is_head) * size
        vocabulary, row = embedding.weight.shape if embedding is not None else (0, 0)
        weights_on_disk = skeleton.source.nbytes()
    hidden = config_hidden or 0
    tokens = config.nsamples * config.seqlen if config.needs_calibration else 0
    activations = 2 * tokens * hidden * size  # the states entering a block and those leaving it
    batch_tokens = min(config.batch_size, config.nsamples) * config.seqlen if config.needs_calibration else 0
    biggest = max(blocks, key=lambda block: block["bytes"] + block["hessian_bytes"])
    rows, cols = biggest["largest_layer"] or (0, 0)
    solver = 3 * rows * cols * 4 + (2 * cols * cols * 4 if config.method == "sparsegpt" else 0)
    forward = 4 * batch_tokens * max(block["widest_output"] for block in blocks) * 4
    block_peak = biggest["bytes"] + biggest["hessian_bytes"] + solver + forward
    spilled = offload_dir is not None
    resident_activations = 2 * batch_tokens * hidden * size if spilled else activations
    # the parts outside the blocks are held while the first block's inputs are captured, and dropped while
    # blocks are pruned; of the embedding only the rows of the calibration's tokens are read, and an untied
    # output layer not at all
    embedding_rows = min(vocabulary, tokens) * row * size
    capture = others_but_head - vocabulary * row * size + embedding_rows + blocks[0]["bytes"] + tokens * hidden * size
    if device.type == "cpu":
        peaks = {"cpu": PROCESS_BASELINE + max(capture, block_peak + resident_activations)}
    else:
        peaks = {
            str(device): max(capture, block_peak + 2 * batch_tokens * hidden * size),
            "cpu": PROCESS_BASELINE + max(tokens * hidden * size, resident_activations),
        }
    return {
        "model": str(folder),
        "weights_on_disk": weights_on_disk,
        "dtype": str(skeleton.dtype),
        "blocks": len(blocks),
        "block_bytes": biggest["bytes"],
        "layers_per_block": biggest["layers"],
        "hessian_bytes_per_block": biggest["hessian_bytes"],
        "outside_blocks_bytes": others,
        "calibration_tokens": tokens,
        "activation_bytes": activations,
        "activations_on": "disk" if spilled else "cpu",
        "peak_bytes": peaks,
        "available_bytes": {name: available_memory(torch.device(name)) for name in peaks},
    }


def check_plan(summary: dict[str, Any]) -> None:
    """Refuse a plan whose expected peak exceeds what a device has free."""
    for name, peak in summary["peak_bytes"].items():
        available = summary["available_bytes"].get(name)
        if available is not None and peak > available:
            hint = "" if summary["activations_on"] == "disk" else "; --offload-dir keeps activations on disk"
            raise SparseGPTError(
                f"the plan needs about {peak / 2**30:.1f} GiB on {name} and {available / 2**30:.1f} GiB are "
                f"free (fewer --nsamples or a smaller --batch-size need less{hint})"
            )
