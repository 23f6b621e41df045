"""Where a streamed model's weights come from: read block by block from a folder's safetensors files.

A *skeleton* is the model built without weights (parameters on the meta device, buffers real). The
small parts outside the decoder blocks (embeddings, final norm, lm_head) are loaded once; each block's
tensors are read from the shards when that block is processed and dropped after it. The pipeline
(``sparsegpt.pipeline``) is the same one that prunes in-memory models; this module only moves weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import compact
from sparsegpt.formats.shards import INDEX_NAME, SINGLE_NAME, LazyTensor, read_header, read_rows, read_tensor
from sparsegpt.models import (
    Block,
    CheckpointNames,
    config_dtype,
    find_block_list,
    find_weights,
    prefer_eager_experts,
    read_config,
)

log = logging.getLogger(__name__)


class WeightSource:
    """The tensors of a transformers folder's safetensors files (one file, or shards with an index),
    read one at a time with plain file reads (a memory-mapped file would count as resident memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise SparseGPTError(f"{index}: unreadable shard index ({error})") from None
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / SINGLE_NAME).is_file():
            self.files = dict.fromkeys(read_header(folder / SINGLE_NAME)[1], folder / SINGLE_NAME)
        else:
            raise SparseGPTError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}: streaming needs safetensors weights")
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._names: CheckpointNames | None = None
        self._realized: dict[str, torch.Tensor] = {}  # converted, not yet taken

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._headers.clear()

    def attach(self, model: nn.Module) -> None:
        """Name tensors as ``model`` does (``models.CheckpointNames``): tensors that are merged on load
        are converted as a group when one of their targets is first read."""
        self._names = CheckpointNames(model, self.files)

    def key(self, name: str) -> str:
        """The checkpoint key of the model's tensor ``name`` (itself for tensors made by a conversion)."""
        return name if self._names is None else self._names.key(name)

    def __contains__(self, name: str) -> bool:
        return name in self._names if self._names is not None else name in self.files

    def read(self, name: str) -> torch.Tensor:
        """The model's tensor ``name``, read from its file (or converted from the tensors it is made of)."""
        group = None if self._names is None else self._names.group(name)
        if group is None:
            return self._read_key(self.key(name))
        if name not in self._realized:
            assert self._names is not None
            self._realized.update(self._names.convert(group, self._read_key))
        if name not in self._realized:
            raise SparseGPTError(f"{self.folder}: converting the tensors of {group} did not produce {name}")
        return self._realized.pop(name)

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, distinct) of the model's tensor ``name``, without reading the rest into
        memory (where the tensor is stored as it is; one made by a conversion is read whole first)."""
        if self._names is not None and self._names.group(name) is not None:
            return self.read(name)[rows]
        path, start, entry = self._locate(self.key(name))
        return read_rows(path, start, self.key(name), entry, rows)

    def _read_key(self, name: str) -> torch.Tensor:
        path, start, entry = self._locate(name)
        return read_tensor(path, start, name, entry)

    def _locate(self, name: str) -> tuple[Path, int, dict[str, Any]]:
        """The file of checkpoint tensor ``name``, its data offset and its header entry."""
        path = self.files.get(name)
        if path is None:
            raise SparseGPTError(f"{self.folder}: the weights lack tensor {name}")
        if not path.is_file():
            raise SparseGPTError(f"{path.name}, named in the shard index, is missing")
        if path not in self._headers:
            self._headers[path] = read_header(path)
        start, header = self._headers[path]
        entry = header.get(name)
        if entry is None:
            raise SparseGPTError(f"{path.name}: the index places {name} here, but the file lacks it")
        return path, start, entry

    def nbytes(self) -> int:
        """Total size of the weight files."""
        return sum(path.stat().st_size for path in set(self.files.values()))


@dataclass
class Skeleton:
    """A model whose decoder blocks hold no weights until ``load_block``; everything else is loaded."""

    model: nn.Module
    list_name: str
    blocks: nn.ModuleList
    source: WeightSource
    dtype: torch.dtype
    device: torch.device

    def block_name(self, index: int) -> str:
        return f"{self.list_name}.{index}"

    def load_block(self, index: int) -> Block:
        """Read block ``index``'s tensors onto the device; returns it with its prunable weights."""
        name = self.block_name(index)
        module = self.blocks[index]
        _materialize(module, name, self.source, self.dtype, self.device)
        missing = [key for key, param in module.named_parameters() if param.device.type == "meta"]
        if missing:
            raise SparseGPTError(f"{self.source.folder}: the weights lack tensor {name}.{missing[0]}")
        return Block(name, module, find_weights(module, name))

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s tensors (back to the meta device)."""
        _to_meta(self.blocks[index])

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s parameters and persistent buffers by checkpoint name, on the CPU."""
        name = self.block_name(index)
        stored = _stored(self.blocks[index])
        return {self.source.key(f"{name}.{key}"): tensor.detach().cpu() for key, tensor in stored.items()}

    @contextmanager
    def embedding_rows(self, rows: torch.Tensor) -> Iterator[None]:
        """Inside, the input embedding holds only the rows ``rows`` (sorted, distinct token ids), read
        without the rest: the model then takes each token as its index in ``rows``. With a large
        vocabulary the embedding is the largest tensor a streamed prune would otherwise load whole."""
        embedding = self.model.get_input_embeddings()
        full, padding = embedding.weight, getattr(embedding, "padding_idx", None)
        name = next(path for path, module in self.model.named_modules() if module is embedding)
        tensor = self.source.read_rows(f"{name}.weight", rows.cpu()).to(device=self.device, dtype=self.dtype)
        embedding._parameters["weight"] = nn.Parameter(tensor, requires_grad=False)
        if padding is not None:  # it only shapes gradients, and may lie past the rows read
            embedding.padding_idx = None
        try:
            yield
        finally:
            embedding._parameters["weight"] = full
            if padding is not None:
                embedding.padding_idx = padding
            self.model.tie_weights()

    def release_outside(self) -> None:
        """Drop the parameters outside the blocks (the embedding, the output layer: with a large vocabulary
        the largest tensors of a small model) while blocks are pruned; ``other_tensors`` reads them again."""
        inside = {id(module) for module in self.blocks.modules()}
        for module in self.model.modules():
            if id(module) not in inside:
                _own_to_meta(module)
        self.model.tie_weights()

    def other_tensors(self) -> dict[str, torch.Tensor | LazyTensor]:
        """The stored tensors outside the blocks (tied copies once), on the CPU; where ``release_outside``
        dropped them (or they were never loaded), to be read from the folder again one at a time as they
        are written (in the skeleton's dtype, as they were loaded)."""
        inside = {id(tensor) for tensor in self.blocks.state_dict(keep_vars=True).values()}
        seen: set[int] = set()
        tensors = {}
        for key, tensor in _stored(self.model).items():
            if id(tensor) in inside or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tensor.device.type == "meta":
                if key not in self.source:
                    continue  # tied to a tensor stored under another name
                tensors[self.source.key(key)] = LazyTensor(tensor.dtype, tuple(tensor.shape), self._reader(key))
            else:
                tensors[self.source.key(key)] = tensor.detach().cpu()
        return tensors

    def _reader(self, key: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            tensor = self.source.read(key)
            return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

        return read


def _stored(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of ``module`` holds: parameters and persistent buffers, shared ones once."""
    return dict(module.state_dict(keep_vars=True))


def _materialize(
    module: nn.Module, prefix: str, source: WeightSource, dtype: torch.dtype, device: torch.device
) -> None:
    for path, owner in module.named_modules():
        for key, param in list(owner._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            name = ".".join(part for part in (prefix, path, key) if part)
            if name not in source:
                continue  # tied to a parameter loaded elsewhere, or missing: the caller checks
            tensor = source.read(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise SparseGPTError(
                    f"{name}: stored shape {list(tensor.shape)}, the model expects {list(param.shape)}"
                )
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            owner._parameters[key] = nn.Parameter(tensor, requires_grad=False)
        for key, buffer in list(owner._buffers.items()):
            name = ".".join(part for part in (prefix, path, key) if part)
            if buffer is not None and name in source and key not in owner._non_persistent_buffers_set:
                owner._buffers[key] = source.read(name).to(device)
            elif buffer is not None and buffer.device != device:
                owner._buffers[key] = buffer.to(device)


def _to_meta(module: nn.Module) -> None:
    for owner in module.modules():
        _own_to_meta(owner)


def _own_to_meta(owner: nn.Module) -> None:
    """``owner``'s own parameters (not its children's) back on the meta device."""
    for key, param in list(owner._parameters.items()):
        if param is not None:
            owner._parameters[key] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def open_skeleton(
    folder: Path,
    dtype: torch.dtype | str,
    device: torch.device,
    stack: ExitStack,
    load: bool = True,
    output_layer: bool = True,
    input_embedding: bool = True,
) -> Skeleton:
    """Build ``folder``'s model without weights and (with ``load``) load everything outside its decoder
    blocks onto ``device``; without ``output_layer``, all but an output layer of its own (pruning never
    runs it; a tied one is the embedding and loads with it); without ``input_embedding``, all but the
    input embedding (``Skeleton.embedding_rows`` reads the rows a calibration set needs)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if compact.is_compact(folder):
        raise SparseGPTError(f"{folder} is a compact folder; streaming reads plain ones (sparsegpt unpack first)")
    source = stack.enter_context(WeightSource(folder))
    config = read_config(folder)
    dtype = config_dtype(config, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    prefer_eager_experts(model)
    source.attach(model)
    model.tie_weights()
    list_name, blocks = find_block_list(model)
    if not load:
        return Skeleton(model, list_name, blocks, source, dtype, device)
    inside = {id(module) for module in blocks.modules()}
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not output_layer and head is not None:
        inside.add(id(head))
    if not input_embedding:
        inside.add(id(embedding))
    for path, module in model.named_modules():
        if id(module) in inside:
            continue
        for key, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            name = f"{path}.{key}" if path else key
            if name in source:
                tensor = source.read(name).to(device=device, dtype=dtype)
                module._parameters[key] = nn.Parameter(tensor, requires_grad=False)
        for key, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    model.tie_weights()
    skipped = {id(param) for param in head.parameters()} if not output_layer and head is not None else set()
    skipped |= {id(param) for param in embedding.parameters()} if not input_embedding else set()
    missing = [
        name
        for name, param in model.named_parameters()
        if param.device.type == "meta" and not name.startswith(f"{list_name}.") and id(param) not in skipped
    ]
    if missing:
        raise SparseGPTError(f"{folder}: the weights lack tensor {missing[0]}")
    return Skeleton(model, list_name, blocks, source, dtype, device)
