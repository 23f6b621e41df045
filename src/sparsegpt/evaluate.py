"""Perplexity, the paper's protocol: consecutive non-overlapping windows, mean NLL over predicted tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsegpt.errors import SparseGPTError


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean negative log-likelihood) of every token after the first in each window (windows, seqlen).

    Logits are scored in fp32 whatever dtype the model runs in.
    """
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    if not math.isfinite(total_nll):
        raise SparseGPTError("the model produced NaN or Inf logits during evaluation")
    return math.exp(total_nll / total_tokens)
