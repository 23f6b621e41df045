"""Where the model is walked: its decoder blocks, their linear weights, and what its config says.

Nothing here is specific to one architecture. Decoder blocks are the largest ``nn.ModuleList`` of
same-class modules; their prunable weights are every ``nn.Linear``, every GPT-2 style ``Conv1D`` (which
stores its weight transposed) and every expert of a fused mixture-of-experts bank (a 3-D parameter whose
slices are used as ``F.linear`` weights).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsegpt.errors import SparseGPTError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LinearWeight:
    """One prunable weight matrix, seen as (out_features, in_features) whatever its storage layout."""

    name: str
    parameter: nn.Parameter
    expert: int | None = None
    transposed: bool = False

    @property
    def stored(self) -> torch.Tensor:
        """The tensor the forward pass hands to ``F.linear`` (or to ``addmm`` when transposed)."""
        return self.parameter if self.expert is None else self.parameter[self.expert]

    def matrix(self) -> torch.Tensor:
        """The weight as (out, in), a view of the parameter."""
        return self.stored.T if self.transposed else self.stored

    def write(self, weight: torch.Tensor) -> None:
        """Store a new (out, in) weight in place, in the parameter's dtype."""
        with torch.no_grad():
            self.matrix().copy_(weight.to(self.parameter.dtype))

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        """Identifies the tensor inside a forward pass: its storage address and shape."""
        stored = self.stored
        return stored.data_ptr(), tuple(stored.shape)


@dataclass
class Block:
    """A decoder block and its prunable weights, in module order."""

    name: str
    module: nn.Module
    weights: list[LinearWeight]


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the ``nn.ModuleList`` of same-class modules holding most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None or best[0] == 0:
        raise SparseGPTError("the model has no list of decoder blocks, so nothing can be pruned")
    return best[1], best[2]


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder blocks (``find_block_list``), or None where it has none."""
    try:
        return find_block_list(model)[1]
    except SparseGPTError:
        return None


def find_weights(block: nn.Module, prefix: str) -> list[LinearWeight]:
    """Every prunable weight inside ``block``, named by its full module path."""
    from transformers.pytorch_utils import Conv1D

    weights: list[LinearWeight] = []
    for name, module in block.named_modules():
        path = f"{prefix}.{name}" if name else prefix
        if isinstance(module, nn.Linear):
            weights.append(LinearWeight(path, module.weight))
        elif isinstance(module, Conv1D):
            weights.append(LinearWeight(path, module.weight, transposed=True))
        else:
            for param_name, param in module.named_parameters(recurse=False):
                if param.ndim == 3:
                    weights.extend(
                        LinearWeight(f"{path}.{param_name}.{expert}", param, expert=expert)
                        for expert in range(param.shape[0])
                    )
    return weights


def find_blocks(model: nn.Module) -> list[Block]:
    """The decoder blocks of ``model`` with their prunable weights. Embeddings and lm_head are outside."""
    list_name, blocks = find_block_list(model)
    found = [
        Block(f"{list_name}.{i}", block, find_weights(block, f"{list_name}.{i}")) for i, block in enumerate(blocks)
    ]
    if not any(block.weights for block in found):
        raise SparseGPTError("the model's decoder blocks contain no linear layers to prune")
    return found


class CheckpointNames:
    """A checkpoint's tensor keys as ``model`` names its tensors, by transformers' own load-time conversions:
    renamed keys (GPT-NeoX's ``embed_out`` is its ``lm_head``) map one to one, and ``key`` maps back;
    keys that are merged on load (per-expert MoE weights fused into one bank, as ``save_pretrained``
    writes them apart) form a group whose targets ``convert`` makes from the members' tensors. Every key
    maps to itself where transformers has no conversions."""

    def __init__(self, model: nn.Module, keys: Iterable[str]) -> None:
        self._model = model
        self._keys: dict[str, str] = {}  # model name -> checkpoint key, for one-to-one tensors
        self._names: dict[str, str] = {}  # checkpoint key -> model name, for one-to-one tensors
        self._groups: dict[str, tuple[list[tuple[str, str]], Any]] = {}  # first target: members, converter
        self._group_of: dict[str, str] = {}  # model name -> its group's first target
        self._member_of: dict[str, str] = {}  # checkpoint key -> its group's first target
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                dot_natural_key,
                rename_source_key,
            )
        except ImportError:  # a transformers without load-time conversions
            self._names = {key: key for key in keys}
            self._keys = dict(self._names)
            return
        transforms = get_model_conversion_mapping(model)
        renamings = [item for item in transforms if isinstance(item, WeightRenaming)]
        converters = [item for item in transforms if isinstance(item, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        for key in sorted(keys, key=dot_natural_key):  # experts in their numeric order
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if pattern is None:
                self._keys[renamed], self._names[key] = key, renamed
                continue
            group = self._groups.setdefault(renamed, ([], by_pattern[pattern]))
            group[0].append((key, pattern))
            self._member_of[key] = renamed
            template = by_pattern[pattern].target_patterns
            for target in template:
                self._group_of[renamed.replace(template[0], target)] = renamed

    def name(self, key: str) -> str | None:
        """The model's name for checkpoint ``key``, or None where ``key`` is a member of a group."""
        return self._names.get(key)

    def key(self, name: str) -> str:
        """The checkpoint key of the model's tensor ``name`` (itself for tensors made by a conversion)."""
        return self._keys.get(name, name)

    def group(self, name: str) -> str | None:
        """The group (named by its first target) that makes the model's tensor ``name``, if any."""
        return self._group_of.get(name)

    def group_of_key(self, key: str) -> str | None:
        """The group checkpoint ``key`` is a member of, if any."""
        return self._member_of.get(key)

    def members(self, group: str) -> list[str]:
        """The checkpoint keys ``group`` is made of, in order."""
        return [key for key, _ in self._groups[group][0]]

    def __contains__(self, name: str) -> bool:
        """Whether the checkpoint holds the model's tensor ``name`` (itself or the members of its group)."""
        return name in self._group_of or self.key(name) in self._names

    def convert(self, group: str, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tensors ``group`` makes, from its members (``read(key)`` gives each one's tensor)."""
        from copy import deepcopy

        members, converter = self._groups[group]
        mapping = deepcopy(converter)
        for key, pattern in members:
            mapping.add_tensor(group, key, pattern, read(key))
        realized = mapping.convert(group, model=self._model, config=self._model.config)
        return {target: tensor[0] if isinstance(tensor, list) else tensor for target, tensor in realized.items()}


def prefer_eager_experts(model: nn.Module) -> None:
    """Make fused mixture-of-experts layers run their per-expert ``F.linear`` loop, which hooks can see."""
    if hasattr(model, "set_experts_implementation") and getattr(model, "_can_set_experts_implementation", None):
        try:
            if model._can_set_experts_implementation():
                model.set_experts_implementation("eager")
        except (ValueError, AttributeError) as error:
            log.debug("could not switch experts implementation: %s", error)


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model whose parameters hold NaN or Inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise SparseGPTError(f"the model's weight {name} contains NaN or Inf")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config admits, when it says."""
    return config_context_length(model.config)


def config_context_length(config: Any) -> int | None:
    """The longest sequence a transformers config admits, when it says."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(config, "text_config", None)
    return getattr(text_config, "max_position_embeddings", None) if text_config is not None else None


def read_config(folder: Path) -> Any:
    """The transformers config of a model folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as error:
        raise SparseGPTError(f"cannot read the config of {folder}: {error}") from None


def config_dtype(config: Any, dtype: torch.dtype | str) -> torch.dtype:
    """``dtype``, or for ``auto`` the one the config names (float32 when it names none)."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    assert isinstance(dtype, torch.dtype)
    return dtype


def resolve_dtype(name: str) -> torch.dtype | str:
    """``auto`` (the checkpoint's own dtype) or one of float32, bfloat16, float16."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise SparseGPTError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return DTYPES[name]


class _LowRankTerm:
    """A forward hook that adds B(Ax) to a linear module's output: the served form Sx + B(Ax)."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor) -> None:
        self.b, self.a = b, a

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inputs = args[0]  # under autocast the products run in its precision, as the layer's own does
        low = torch.nn.functional.linear(inputs, self.a.to(inputs.device, inputs.dtype))
        return output + torch.nn.functional.linear(low, self.b.to(inputs.device, inputs.dtype)).to(output.dtype)


def attach_low_rank(
    root: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = ""
) -> list[Any]:
    """Make every layer named in ``factors`` ({name: (B (out, r), A (r, in))}) compute Sx + B(Ax), by a
    forward hook; returns the hooks' handles. ``root`` is the module whose path is ``prefix`` in those
    names ("" for the whole model)."""
    handles = []
    try:
        for name, (b, a) in factors.items():
            path = name[len(prefix) + 1 :] if prefix else name
            try:
                module = root.get_submodule(path) if path else root
            except AttributeError:
                raise SparseGPTError(f"the low-rank term of {name} names a layer the model does not have") from None
            handles.append(module.register_forward_hook(_LowRankTerm(b, a)))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@contextlib.contextmanager
def low_rank_hooks(
    root: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str = ""
) -> Iterator[None]:
    """``attach_low_rank`` for the duration of the context."""
    handles = attach_low_rank(root, factors, prefix)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
