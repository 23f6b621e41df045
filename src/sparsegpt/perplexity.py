"""Perplexity, the paper's protocol: consecutive non-overlapping windows, mean NLL over predicted tokens.

A float32 model's products can run faster than float32 where the host has fast bf16 arithmetic:

- "split-bfloat16": each linear layer's inputs are rounded to bf16, its float32 weight is split exactly
  enough into two bf16 parts (w = hi + lo, about 16 significant bits), and both products are summed in
  float32 by MKL's bf16 × bf16 → float32 routine. Only the activations lose precision, once per layer.
- "bfloat16": the whole forward under bf16 autocast (weights and activations rounded, outputs in bf16),
  the output layer in float32.

The log-softmax is float32 either way. On the models measured, split-bfloat16 moved perplexity by less
than 0.1%, bfloat16 by up to 0.21% on freshly pruned float32 models (docs/RESULTS.md, "Evaluation
precision"); "auto" picks split-bfloat16 where the host runs it fast enough, else the model's own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from sparsegpt.errors import SparseGPTError
from sparsegpt.fused import fused_steps_on
from sparsegpt.host import fast_split_bfloat16, native_attention, product_backend
from sparsegpt.linears import float32_linear_call
from sparsegpt.models import decoder_blocks
from sparsegpt.pipeline import forward_precision
from sparsegpt.solver.gram import MixedWeight, native_mixed_gram, split_bfloat16, split_linear

EVAL_PRECISIONS = ("auto", "model", "split-bfloat16", "bfloat16")


def check_eval_precision(precision: str) -> None:
    """Raise a one-line ``SparseGPTError`` unless ``precision`` is one of ``EVAL_PRECISIONS``."""
    if precision not in EVAL_PRECISIONS:
        raise SparseGPTError(f"unknown evaluation precision {precision!r}; choose one of {', '.join(EVAL_PRECISIONS)}")


def resolve_eval_precision(precision: str, model: nn.Module) -> str | None:
    """How ``model`` is scored: "split-bfloat16" or "bfloat16" (see the module's docstring), or None for
    its own precision.

    "auto" is split-bfloat16 for a float32 model on a CPU whose mixed bf16 product measures fast
    (``host.fast_split_bfloat16``), the model's own precision otherwise; "model" is always the model's own."""
    check_eval_precision(precision)
    parameter = next(model.parameters())
    if precision == "auto":
        fast = parameter.dtype == torch.float32 and fast_split_bfloat16(parameter.device)
        return "split-bfloat16" if fast else None
    if precision == "split-bfloat16" and (parameter.device.type != "cpu" or not native_mixed_gram(torch.bfloat16)):
        raise SparseGPTError(
            "split-bfloat16 scoring needs the CPU and a bf16 product into float32 (MKL's in torch's library, "
            "or this package's AVX512-BF16 kernels)"
        )
    return None if precision == "model" else precision


class SplitBfloat16Linears(TorchFunctionMode):
    """``F.linear`` of float32 inputs and float32 weight parameters as two products of bf16 operands summed
    in float32 (``gram.split_linear``): the inputs rounded to bf16 once, the weight split into
    hi = bf16(w) and lo = bf16(w − hi). Each weight's parts are made once (and again if the weight changes in
    place); other calls, and weights that are not parameters (a reused scratch buffer), go to torch
    unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[int, tuple[nn.Parameter, int, MixedWeight, MixedWeight]] = {}
        self.backend = product_backend(torch.bfloat16)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        call = float32_linear_call(func, args, kwargs)
        if call is not None and isinstance(call[1], nn.Parameter):
            return self.linear(*call)
        return func(*args, **kwargs)

    def linear(self, inputs: torch.Tensor, weight: nn.Parameter, bias: torch.Tensor | None) -> torch.Tensor:
        known = self.parts.get(id(weight))
        if known is None or known[1] != weight._version:  # (the id is unique: ``parts`` holds the weight)
            known = (weight, weight._version, *split_bfloat16(weight.detach(), self.backend))
            self.parts[id(weight)] = known
        return split_linear(inputs, known[2], known[3], bias)


@contextlib.contextmanager
def scoring_precision(model: nn.Module, precision: str | None) -> Iterator[None]:
    """Score ``model`` as ``precision`` says: None (its own precision) and "bfloat16" as a pruning pass
    runs its forwards (``pipeline.forward_precision``: float32 linear layers by the host's faster product,
    or bf16 autocast; causal attention by the native kernel where it measured faster; the decoder
    blocks' elementwise steps by the fused kernels), "bfloat16" with its output layer in float32 on
    float32 inputs; "split-bfloat16" splits the linear products (``SplitBfloat16Linears``), attention and
    the elementwise steps as for float32."""
    device = next(model.parameters()).device
    blocks = decoder_blocks(model)  # their elementwise steps fused, as a streamed evaluation's are
    if precision == "split-bfloat16":
        with fused_steps_on(device, blocks), SplitBfloat16Linears(), native_attention(device, None):
            yield
        return
    if precision is None:
        with forward_precision(None, device, blocks):
            yield
        return
    head = model.get_output_embeddings()
    if head is None:
        raise SparseGPTError(f"{type(model).__name__} has no output layer to score in float32")
    original, own = head.forward, "forward" in vars(head)  # accelerate's hooks set an instance forward

    def head_in_float32(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=False):
            return original(hidden.float())

    head.forward = head_in_float32
    try:
        with forward_precision(precision, device, blocks):
            yield
    finally:
        if own:
            head.forward = original
        else:
            del head.forward  # the class's forward again


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    precision: str | None = None,
) -> torch.Tensor:
    """Summed negative log-likelihood of every token after the first, per window: shape (windows,), fp64.

    Logits are scored in fp32 whatever dtype the model runs in; ``precision``: see ``scoring_precision``.
    """
    model.eval()
    device = next(model.parameters()).device
    sums = []
    with scoring_precision(model, precision):
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


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
    precision: str | None = None,
) -> float:
    """exp(mean negative log-likelihood) of every token after the first in each window (windows, seqlen);
    ``precision``: None (the model's own) or a resolved ``resolve_eval_precision``."""
    return perplexity_of(window_nll(model, windows, batch_size, progress, precision), windows)
