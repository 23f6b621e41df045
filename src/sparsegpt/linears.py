"""Float32 linear layers on the CPU by oneDNN, where it measures faster than torch's own product.

torch multiplies float32 linear layers on the CPU with MKL's sgemm, and MKL picks its code by the
processor's vendor: on AMD EPYC it runs at under half the rate that oneDNN, also inside torch's library
(it runs torch's bf16 products), reaches with AVX-512 on the same host (149 against 377 GFLOP/s at
smollm2-135m's MLP shape, 2 threads; docs/RESULTS.md, "Host matrix-multiply rates"). Both sum float32
products in float32, in different orders. torch has no setting that sends float32 products to oneDNN
without lowering their precision, so ``OneDnnLinears`` sends ``F.linear`` there itself, through the op
torch's compiler emits for it (``torch.ops.mkldnn._linear_pointwise``). The host probe checks that op
against ``F.linear`` and measures both (``host.MatmulRates``); ``host.float32_linears`` applies it only
where it is the faster.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(inputs, weight, bias)`` for float32 CPU tensors by oneDNN's product (inference only)."""
    return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), weight.contiguous(), bias, "none", [], "")


def onednn_agrees() -> bool:
    """Whether ``onednn_linear`` exists in this torch and gives ``F.linear``'s result to float32 rounding, on
    a small odd-sized case."""
    generator = torch.Generator().manual_seed(0)
    inputs, weight = torch.randn(3, 37, 21, generator=generator), torch.randn(45, 21, generator=generator)
    bias = torch.randn(45, generator=generator)
    try:
        with torch.no_grad():
            result = onednn_linear(inputs, weight, bias)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    expected = F.linear(inputs.double(), weight.double(), bias.double())
    return result.shape == expected.shape and bool(torch.allclose(result.double(), expected, rtol=1e-5, atol=1e-5))


def float32_linear_call(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
    """(inputs, weight, bias) where a TorchFunctionMode sees ``F.linear`` of float32 CPU inputs and a 2-D
    float32 CPU weight (given by position), else None: the calls this package's modes may take over."""
    if func is not F.linear or len(args) < 2:
        return None
    inputs, weight = args[0], args[1]
    if not (
        inputs.dtype == weight.dtype == torch.float32
        and inputs.device.type == weight.device.type == "cpu"
        and weight.ndim == 2
    ):
        return None
    return inputs, weight, args[2] if len(args) > 2 else kwargs.get("bias")


class OneDnnLinears(TorchFunctionMode):
    """``F.linear`` of float32 CPU inputs and weights by ``onednn_linear`` while no gradient is wanted;
    every other call goes to torch unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        call = float32_linear_call(func, args, kwargs)
        if call is not None:
            inputs, weight, bias = call
            if (
                inputs.ndim >= 2
                and inputs.numel() > 0
                and (bias is None or bias.dtype == torch.float32)
                and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad))
            ):
                return onednn_linear(inputs, weight, bias)
        return func(*args, **kwargs)


class SharedInputCasts(TorchFunctionMode):
    """Under autocast, ``F.linear`` of one float32 input tensor by several layers in a row (q, k and v; gate
    and up) rounds that input to the autocast precision once, where autocast rounds it again for every
    layer. The products are the same (autocast rounds it the same way); only the copies are saved. Every
    other call goes to torch unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (input, its version, rounded)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and args and isinstance(args[0], torch.Tensor):
            args = (self.cast(args[0]), *args[1:])
        return func(*args, **kwargs)

    def cast(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` rounded to the autocast precision of its device when autocast is on there and it is a
        float32 tensor, the rounding of the previous call's tensor when it is that tensor unchanged; else
        ``inputs`` itself."""
        device = inputs.device.type
        if inputs.dtype != torch.float32 or not torch.is_autocast_enabled(device):
            return inputs
        last = self._last
        if last is None or last[0] is not inputs or last[1] != inputs._version:
            last = (inputs, inputs._version, inputs.to(torch.get_autocast_dtype(device)))
            self._last = last
        return last[2]
