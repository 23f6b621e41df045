"""The low-rank terms of a pruned model as a PEFT LoRA adapter (docs/FORMAT.md, "Low-rank terms").

A layer pruned with a low-rank term computes Sx + B(Ax): S is the pruned weight in the model's own
checkpoint, B and A are stored as LoRA's ``lora_B`` (out, r) and ``lora_A`` (r, in) with scaling 1
(``lora_alpha`` = r) and no dropout, in the subfolder ``ADAPTER_FOLDER``. A subfolder, because
transformers treats a model folder that holds an ``adapter_config.json`` as an adapter and loads the base
model it names instead. ``PeftModel.from_pretrained(model, folder / ADAPTER_FOLDER)`` applies it, as do
LoRA-serving stacks; this project applies it with forward hooks (``models.attach_low_rank``), which also
work on the sparse runtime's modules, which PEFT does not know.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from sparsegpt.errors import SparseGPTError
from sparsegpt.formats.atomic import write_json_atomically

ADAPTER_FOLDER = "low_rank_adapter"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's key prefix: the PeftModel wrapper, then the wrapped model


def has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_FOLDER / CONFIG_NAME).is_file()


def write_adapter(
    folder: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    transposed: bool = False,
) -> None:
    """Write ``factors`` ({module name: (B (out, r), A (r, in))}) as a LoRA adapter into
    ``folder / ADAPTER_FOLDER``, in ``dtype``; ``transposed``: the layers are GPT-2 style ``Conv1D``s
    (PEFT's ``fan_in_fan_out``). Nothing is written when ``factors`` is empty."""
    from safetensors.torch import save_file

    if not factors:
        return
    ranks = {name: a.shape[0] for name, (_, a) in factors.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: value for name, value in ranks.items() if value != rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,  # the base model is the folder above
        "r": rank,
        "lora_alpha": rank,  # scaling = alpha / r = 1: the factors are stored as they are added
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": transposed,
        "inference_mode": True,
    }
    target = folder / ADAPTER_FOLDER
    target.mkdir(exist_ok=True)
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    write_json_atomically(target / CONFIG_NAME, config)


def read_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The factors {module name: (B, A)} of the adapter in ``folder / ADAPTER_FOLDER`` (checked: scaling
    1, both factors of every layer, matching ranks)."""
    from safetensors.torch import load_file

    target = folder / ADAPTER_FOLDER
    try:
        config: dict[str, Any] = json.loads((target / CONFIG_NAME).read_text())
        tensors = load_file(str(target / WEIGHTS_NAME))
    except (OSError, ValueError) as error:
        raise SparseGPTError(f"{target}: unreadable low-rank adapter ({error})") from None
    if config.get("peft_type") != "LORA":
        raise SparseGPTError(f"{target}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        rank = config.get("rank_pattern", {}).get(name, config.get("r"))
        alpha = config.get("alpha_pattern", {}).get(name, config.get("lora_alpha"))
        if b is None or b.shape[1] != a.shape[0] or a.shape[0] != rank:
            raise SparseGPTError(f"{target}: the factors of {name} do not match (rank {rank})")
        if alpha != rank:
            raise SparseGPTError(f"{target}: {name} has LoRA scaling {alpha}/{rank}; this reader applies scaling 1")
        factors[name] = (b, a)
    return factors
