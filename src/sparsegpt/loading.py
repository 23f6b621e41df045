"""From what a user names (an alias, a GGUF file, a folder plain or compact, a Hub id) to a model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparsegpt import assets
from sparsegpt.errors import SparseGPTError
from sparsegpt.formats import adapter, compact
from sparsegpt.models import attach_low_rank, resolve_dtype

RUNTIMES = ("dense", "sparse")


def load_model(spec: str, dtype: str = "auto", runtime: str = "dense") -> tuple[nn.Module, object, str]:
    """Load a causal LM and its tokenizer from an alias, a GGUF file, a transformers folder or a hub id.

    ``runtime="sparse"`` (a folder or an alias only) runs pruned linears from their compact encoding.
    Returns (model in eval mode, tokenizer, a one-line description of where the weights came from).
    """
    torch_dtype = resolve_dtype(dtype)
    _check_runtime(runtime)
    if runtime == "sparse":
        folder = assets.model_folder(spec) if spec in assets.MODEL_ALIASES else Path(spec)
        if not (folder / "config.json").is_file():
            raise SparseGPTError(
                f"the sparse runtime runs a model folder (plain or compact) or an alias; {spec} is neither"
            )
        from sparsegpt.runtime.model import load_sparse

        model = with_low_rank(load_sparse(folder, torch_dtype), folder)
        return model, load_tokenizer(str(folder)), f"{spec} (sparse runtime)"
    if spec in assets.MODEL_ALIASES:
        folder = assets.model_folder(spec)
        model, tokenizer = _from_pretrained(str(folder), torch_dtype)
        return model, tokenizer, assets.MODEL_ALIASES[spec].description
    path = Path(spec)
    if path.suffix == ".gguf":
        model, tokenizer = _from_pretrained(str(assets.converted_gguf(path)), torch_dtype)
        return model, tokenizer, f"{path.name}, dequantized from GGUF"
    if path.exists() and not path.is_dir():
        raise SparseGPTError(f"{spec} is neither a model folder nor a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SparseGPTError(f"{spec} is not a transformers model folder (no config.json)")
        if compact.is_compact(path):
            model = with_low_rank(compact.load_compact(path, torch_dtype), path)
            return model, load_tokenizer(str(path)), f"{path} (compact)"
        model, tokenizer = _from_pretrained(str(path), torch_dtype)
        return with_low_rank(model, path), tokenizer, str(path)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        known = ", ".join(sorted(assets.MODEL_ALIASES))
        raise SparseGPTError(f"no model folder, GGUF file or alias named {spec!r} (aliases: {known})")
    model, tokenizer = _from_pretrained(spec, torch_dtype)
    return model, tokenizer, f"{spec} from the Hugging Face Hub"


def load_pretrained(path: str | Path, dtype: str = "auto", runtime: str = "dense") -> nn.Module:
    """A transformers causal LM from a folder, plain or compact (see docs/FORMAT.md), in one call.

    ``runtime="dense"`` decodes every weight into an ordinary model. A folder pruned with low-rank terms
    computes S + BA in those layers (its adapter is applied). ``runtime="sparse"`` keeps each pruned
    linear weight in its compact encoding inside a ``SparseLinear`` module (inference only): less memory,
    and faster decoding where memory bandwidth bounds it. A plain folder is encoded while it loads.
    """
    folder = Path(path)
    torch_dtype = resolve_dtype(dtype)
    _check_runtime(runtime)
    if not (folder / "config.json").is_file():
        raise SparseGPTError(f"{folder} is not a transformers model folder (no config.json)")
    if runtime == "sparse":
        from sparsegpt.runtime.model import load_sparse

        return with_low_rank(load_sparse(folder, torch_dtype), folder)
    if compact.is_compact(folder):
        return with_low_rank(compact.load_compact(folder, torch_dtype), folder)
    return with_low_rank(_from_pretrained(str(folder), torch_dtype, tokenizer=False)[0], folder)


def with_low_rank(model: nn.Module, folder: Path) -> nn.Module:
    """``model`` computing Sx + B(Ax) in every layer the low-rank adapter of ``folder`` names, if it has
    one (``formats.adapter``)."""
    if adapter.has_adapter(folder):
        attach_low_rank(model, adapter.read_adapter(folder))
    return model


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise SparseGPTError(f"unknown runtime {runtime!r}; choose {' or '.join(RUNTIMES)}")


def _from_pretrained(source: str, torch_dtype: torch.dtype | str, tokenizer: bool = True) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as error:
        raise SparseGPTError(f"cannot load model {source}: {_first_line(error)}") from error
    return model.eval(), load_tokenizer(source) if tokenizer else None


def load_tokenizer(source: str) -> object:
    """The tokenizer of a folder or Hub id."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise SparseGPTError(f"cannot load the tokenizer of {source}: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
