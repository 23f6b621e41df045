"""Perplexity, the paper's protocol: consecutive non-overlapping windows, mean NLL over predicted tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsegpt.errors import SparseGPTError


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Summed negative log-likelihood of every token after the first, per window: shape (windows,), fp64.

    Logits are scored in fp32 whatever dtype the model runs in.
    """
    model.eval()
    device = next(model.parameters()).device
    sums = []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        sums.extend(nll_of_logits(model(input_ids=batch, use_cache=False).logits, batch))
    return torch.cat(sums)


def nll_of_logits(logits: torch.Tensor, batch: torch.Tensor) -> list[torch.Tensor]:
    """Summed NLL of every token after the first, per window of ``batch``, as one-element fp64 tensors."""
    sums = []
    # One window at a time: a smaller log-softmax temporary (cheaper on CPU than one call per batch).
    for window_logits, window in zip(logits, batch):
        nll = F.cross_entropy(window_logits[:-1].float(), window[1:], reduction="none")
        sums.append(nll.double().sum().reshape(1).cpu())
    return sums


def perplexity_of(sums: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean NLL) from per-window NLL sums of ``windows`` (windows, seqlen)."""
    total_nll = float(sums.sum())
    if not math.isfinite(total_nll):
        raise SparseGPTError("the model produced NaN or Inf logits during evaluation")
    return math.exp(total_nll / (windows.shape[0] * (windows.shape[1] - 1)))


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of every token after the first in each window (windows, seqlen)."""
    return perplexity_of(window_nll(model, windows, batch_size, progress), windows)
