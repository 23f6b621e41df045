"""Peer run: prune a model with llmcompressor's SparseGPT (or Wanda) for comparison.

Runs in its own virtualenv (llmcompressor 0.14 pins its own torch and transformers; ``common.PEER_VENV``
makes it), so it must not import the ``sparsegpt`` package. It loads a plain transformers folder in fp32
on CPU, calibrates on exactly the given token windows (no shuffling, no tokenization), prunes every Linear
inside the decoder blocks with ``SparseGPTModifier`` (``--method wanda``: ``WandaPruningModifier``) at the
library's defaults (block size, dampening),
and saves a plain dense transformers folder. Its JSON holds the pruning time and the process's own peak
memory.

Usage::

    python bench/peer_llmcompressor.py --model DIR --calib-tokens FILE.pt \
        --out DIR [--sparsity 0.5] [--pattern 2:4] [--method sparsegpt|wanda] [--json FILE]

``FILE.pt`` holds an int64 tensor of shape (nsamples, seqlen) saved with
``torch.save``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import own_peak_rss_gib
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    default_data_collator,
)


class _NoProcessor:
    """Stand-in processor for folders without a tokenizer.

    ``oneshot`` insists on a processor whenever a dataset is given, even though
    an already tokenized dataset never reaches it. Only a non-string object
    skips its auto-loading; we save the model ourselves, so this is never used.
    """


def load_windows(path: Path) -> torch.Tensor:
    """Load the (nsamples, seqlen) int64 calibration windows saved with torch.save."""
    tokens = torch.load(path, map_location="cpu")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D tensor, got {type(tokens)}")
    return tokens.to(torch.int64)


def windows_loader(tokens: torch.Tensor) -> DataLoader:
    """Serve the windows one per batch, in file order, with a full attention mask.

    Handing oneshot a Dataset instead would route it through its
    LengthAwareSampler, whose unstable argsort permutes equal-length windows
    (only float rounding in the Hessian sums would change, but order is cheap
    to keep). A DataLoader is used as is.
    """
    dataset = Dataset.from_dict(
        {
            "input_ids": tokens.tolist(),
            "attention_mask": torch.ones_like(tokens).tolist(),
        }
    )
    return DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=default_data_collator)


def pruned_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """Return the Linear layers the modifier prunes: all but the lm_head."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def zero_share(linears: dict[str, torch.nn.Linear]) -> float:
    """Share of exactly-zero weights across the given Linear layers."""
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    return zeros / total if total else 0.0


def versions() -> dict[str, str]:
    """Versions of the packages that decide the peer's numbers."""
    names = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    found = {name: importlib.metadata.version(name) for name in names}
    found["python"] = sys.version.split()[0]
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prune ``args.model`` with llmcompressor's SparseGPT or Wanda and save it dense."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    torch.set_num_threads(args.threads)
    tokens = load_windows(args.calib_tokens)
    nsamples, seqlen = tokens.shape

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError, TypeError):
        tokenizer = None

    modifier_class = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = modifier_class(
        sparsity=args.sparsity,
        mask_structure=args.pattern,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer if tokenizer is not None else _NoProcessor(),
        recipe=modifier,
        dataset=windows_loader(tokens),
        # No-ops for a DataLoader; stated so the run reads like its recipe.
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
    )
    prune_seconds = time.perf_counter() - start
    peak_rss_gib = own_peak_rss_gib()

    # oneshot wraps model.save_pretrained to add a compressed-tensors config;
    # call the plain transformers method so any loader can read the folder.
    args.out.mkdir(parents=True, exist_ok=True)
    PreTrainedModel.save_pretrained(model, args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)

    return {
        "prune_seconds": round(prune_seconds, 3),
        "peak_rss_gib": round(peak_rss_gib, 3),
        "sparsity": zero_share(pruned_linears(model)),
        "versions": versions(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="transformers folder")
    parser.add_argument("--calib-tokens", type=Path, required=True, help="(nsamples, seqlen) int64 .pt")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="0:0", help='"N:M" semi-structured, "0:0" unstructured')
    parser.add_argument("--method", default="sparsegpt", choices=("sparsegpt", "wanda"))
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
