"""A transformers model whose pruned linear layers run from their compact encoding.

The model is built without memory for its parameters; each stored tensor is then read once: a pruned
linear weight (a ``bitmask``, ``nm`` or ``full`` entry of a compact folder, or a weight a plain folder's
tensor encodes to) becomes a ``SparseLinear`` holding its encoding, every other tensor is loaded densely.
No dense copy of a pruned weight exists at any moment when loading a compact folder; loading a plain one
holds one dense tensor at a time, while it is encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import compact
from sparsegpt.formats.shards import read_header, read_tensor
from sparsegpt.host import trim_freed_memory
from sparsegpt.models import CheckpointNames, config_dtype, read_config
from sparsegpt.runtime.kernels import KINDS
from sparsegpt.runtime.linear import PackedWeight, Scratch, SparseLinear

log = logging.getLogger(__name__)

SPARSE_ENCODINGS = ("bitmask", "nm", "full")

Entry = tuple[str, dict[str, Any], Callable[[str], torch.Tensor]]


def load_sparse(folder: Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """The model of a compact or plain pruned folder with its pruned linears as ``SparseLinear``.

    ``dtype`` is that of the dense parameters and of the activations; sparse weights keep their stored
    values (bf16 values run with float32 activations as they are, exactly).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = read_config(folder)
    dtype = config_dtype(config, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if compact.is_compact(folder):
        manifest = compact.read_manifest(folder)
        keys, entries = list(manifest["tensors"]), compact.manifest_entries(folder, manifest)
    else:
        keys = [key for path in compact.dense_files(folder) for key in read_header(path)[1]]
        entries = _plain_entries(folder)
    names = CheckpointNames(model, keys)
    sparse, scratch = 0, Scratch()
    members: dict[str, torch.Tensor] = {}  # of a group transformers merges on load (experts into a bank)
    for key, entry, read in entries:
        name = names.name(key)
        if name is not None:
            sparse += _load_entry(model, name, compact.read_stored(key, entry, read), dtype, scratch)
            continue
        members[key] = compact.decode_stored(compact.read_stored(key, entry, read))
        group = names.group_of_key(key)
        assert group is not None
        if all(member in members for member in names.members(group)):
            for target, tensor in names.convert(group, members.pop).items():
                _put_dense(model, target, tensor, dtype)
    model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise SparseGPTError(f"{folder} lacks tensor {missing[0]} (and {len(missing) - 1} more)")
    if sparse == 0:
        log.warning("%s holds no pruned linear weights: the model runs densely", folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    trim_freed_memory()
    return model.eval()


def sparse_modules(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """The model's sparse linear modules, by name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseLinear)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take: dense parameters and buffers (each storage once) plus every sparse
    module's encoding."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total + sum(module.weight_packed.nbytes for _, module in sparse_modules(model))


def _plain_entries(folder: Path) -> Iterator[Entry]:
    """A plain folder's tensors encoded one at a time, as ``pack`` would store them."""
    patterns = compact.nm_patterns(folder)
    quant = compact.read_quant_sidecar(folder)
    for path in compact.dense_files(folder):
        start, header = read_header(path)
        for name, info in header.items():
            entry, parts = compact.encode_tensor(
                name, read_tensor(path, start, name, info), quant.pop(name, None), patterns
            )
            yield name, entry, parts.__getitem__


def _load_entry(model: nn.Module, name: str, stored: compact.StoredTensor, dtype: torch.dtype, scratch: Scratch) -> int:
    """Put one stored tensor into ``model`` as its tensor ``name``; 1 where it became a sparse module, else 0."""
    from transformers.pytorch_utils import Conv1D

    owner_name, _, attribute = name.rpartition(".")
    owner = _owner(model, name)
    linear = (isinstance(owner, nn.Linear) and not stored.transposed) or (
        isinstance(owner, Conv1D) and stored.transposed
    )
    if attribute == "weight" and linear and stored.encoding in SPARSE_ENCODINGS and stored.dtype in KINDS:
        packed = PackedWeight.from_stored(stored)
        if (packed.rows, packed.cols) != (owner.weight.shape[0], owner.weight.shape[1])[
            :: -1 if stored.transposed else 1
        ]:
            raise SparseGPTError(
                f"{name}: shape {list(stored.shape)} does not match the model's {list(owner.weight.shape)}"
            )
        parent_name, _, child = owner_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, SparseLinear(packed, getattr(owner, "bias", None), scratch))
        return 1
    if stored.encoding == "plain":
        assert stored.values is not None
        _put_dense(model, name, stored.values, dtype)
    else:  # a sparse tensor the runtime has no module for (an expert bank, a float64 weight): dense
        _put_dense(model, name, compact.decode_stored(stored), dtype)
    return 0


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the model's tensor ``name``."""
    try:
        return model.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        raise SparseGPTError(f"{name}: the folder holds a tensor the model does not have") from None


def _put_dense(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Make ``tensor`` the model's parameter or buffer ``name`` (floating point ones in ``dtype``)."""
    owner, attribute = _owner(model, name), name.rpartition(".")[2]
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attribute in owner._parameters:
        expected = owner._parameters[attribute]
        if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
            raise SparseGPTError(
                f"{name}: shape {list(tensor.shape)} does not match the model's {list(expected.shape)}"
            )
        # requires_grad as transformers leaves it: with False, torch multiplies a bf16 lm_head by a sliced
        # input through a path that copies the whole weight first, every call
        owner._parameters[attribute] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif attribute in owner._buffers:
        owner._buffers[attribute] = tensor
    else:
        raise SparseGPTError(f"{name}: the folder holds a tensor the model does not have")
