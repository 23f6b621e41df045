"""GGUF checkpoints: dequantized into a plain transformers model by transformers' own GGUF loader."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparsegpt.errors import SparseGPTError


def load_gguf(path: Path) -> tuple[nn.Module, object]:
    """Dequantize a GGUF checkpoint into a plain fp32 transformers model (one that can be saved).

    transformers marks a GGUF-loaded model as quantized and refuses to save it, so the weights are copied
    into a model built from the same config without the quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SparseGPTError(f"cannot read GGUF file {path}: {str(error).splitlines()[0]}") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = path.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    return plain.eval(), tokenizer
