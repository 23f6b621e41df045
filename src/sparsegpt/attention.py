"""Causal self-attention on the CPU by this package's AVX-512 kernel (_attention.c), where it measures
faster than torch's.

A calibration or evaluation forward attends over whole windows with a causal mask and no padding:
``F.scaled_dot_product_attention(q, k, v, is_causal=True)``; a generation step attends from its one new
token to every key in the cache (``is_causal=False``, no mask). torch's CPU kernel for it (flash attention)
multiplies its blocks by the BLAS, which on AMD EPYC runs float32 products at about half the rate AVX-512
reaches there; under bf16 autocast it rounds q, k and v to bf16 first and is slower still on hosts
without AMX. The native kernel keeps float32 throughout (each row's scores, an exact softmax, the
weighted sum of values) and runs about twice as fast as torch's on such a host (docs/RESULTS.md,
"Attention"). ``NativeCausalAttention`` sends those calls to it and leaves every other call to torch;
``native_attention_layers`` enters it around each attention layer's call alone (generation). Both are
used only where the host probe measured the kernel faster than torch's for the forward's precision
(``host.native_attention_faster``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _native() -> Any:
    """The kernel of _attention.c through ctypes, or None (the optional extension was not built, or this
    processor lacks AVX-512)."""
    try:  # by its full name: the package's __init__ may import this module
        extension = importlib.import_module("sparsegpt._attention")
    except ImportError:
        return None
    library = ctypes.CDLL(extension.__file__)
    integer, pointer = ctypes.c_int64, ctypes.c_void_p
    library.sgpt_attention_available.restype = ctypes.c_int32
    library.sgpt_attention_available.argtypes = []
    if not library.sgpt_attention_available():
        return None
    library.sgpt_causal_attention.restype = integer
    library.sgpt_causal_attention.argtypes = [pointer] * 4 + [integer] * 6 + [pointer] * 4
    library.sgpt_causal_attention.argtypes += [ctypes.c_float, ctypes.c_int32, ctypes.c_int32]
    return library


def native_available() -> bool:
    """Whether the native kernel runs on this processor (built, and AVX-512 present)."""
    return _native() is not None


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouped: bool) -> bool:
    """Whether ``causal_attention`` computes attention of these CPU tensors: 4-D (batch, heads, queries,
    dim) and (batch, key/value heads, keys, dim) in float32, bf16 or fp16, no more queries than keys,
    ``dim`` a multiple of 16, and the heads a multiple of the key/value heads (any multiple only when
    ``grouped``, torch's ``enable_gqa``)."""
    tensors = (q, k, v)
    if any(t.ndim != 4 or t.device.type != "cpu" or t.dtype not in _DTYPES for t in tensors):
        return False
    batch, heads, queries, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim or k.shape[2] < queries or dim % 16 != 0:
        return False
    kv_heads = k.shape[1]
    return kv_heads > 0 and heads % kv_heads == 0 and (grouped or heads == kv_heads)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ + causal mask) v in float32 by the native kernel (``takes`` must hold), the
    queries being the last positions of the keys' sequence: each attends to its own key and every earlier
    one. With as many queries as keys that is ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
    scale=scale, enable_gqa=True)``; with one query, the same without ``is_causal``. The result is
    float32, or the inputs' precision where q, k and v share one below float32; ``scale`` defaults to
    1/√dim."""
    library = _native()
    if library is None:
        raise RuntimeError("the native attention kernel is not available on this host")
    batch, heads, queries, dim = q.shape
    # float32 and bf16 are read as they are (bf16 widened exactly as the kernel packs them), float16 widened here
    widened = [t.float() if t.dtype == torch.float16 else t for t in (q, k, v)]
    q_in, k_in, v_in = (t if t.stride(-1) == 1 else t.contiguous() for t in widened)
    bf16 = sum(1 << place for place, t in enumerate((q_in, k_in, v_in)) if t.dtype == torch.bfloat16)
    # (batch, queries, heads, dim) underneath, as the projections that read it next want it
    out = torch.empty(batch, queries, heads, dim).transpose(1, 2)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q_in, k_in, v_in, out)]
    with torch.profiler.record_function("sparsegpt::causal_attention"):  # named in profiles, as torch's ops are
        status = library.sgpt_causal_attention(
            q_in.data_ptr(),
            k_in.data_ptr(),
            v_in.data_ptr(),
            out.data_ptr(),
            batch,
            heads,
            heads // k.shape[1],
            queries,
            k.shape[2],
            dim,
            *strides,
            1.0 / math.sqrt(dim) if scale is None else scale,
            bf16,
            torch.get_num_threads(),
        )
    if status != 0:
        raise RuntimeError(f"the native attention kernel failed with status {status}")
    shared = {q.dtype, k.dtype, v.dtype}
    return out.to(q.dtype) if len(shared) == 1 and q.dtype != torch.float32 else out


class NativeCausalAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` by ``causal_attention`` where the call is causal attention it
    takes (``takes``; no mask, no dropout, no gradient wanted): ``is_causal`` with as many queries as keys
    (``windows``), or one query attending to every key (a generation step, ``steps``); every other call
    goes to torch unchanged.
    Under autocast the inputs are not rounded to its precision: the attention runs in float32 and returns
    float32, which the next linear layer rounds as autocast does."""

    def __init__(self, windows: bool = True, steps: bool = True) -> None:
        super().__init__()
        self.windows, self.steps = windows, steps

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) >= 3:
            q, k, v = args[:3]
            names = ("attn_mask", "dropout_p", "is_causal")  # scale and enable_gqa: by keyword only
            options = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
            options.update(zip(names, args[3:]))
            options.update(kwargs)
            if (
                options["attn_mask"] is None
                and options["dropout_p"] == 0.0
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
                and takes(q, k, v, bool(options["enable_gqa"]))
                # torch's is_causal aligns its mask top-left, the kernel bottom-right: the same where lengths match
                and (
                    self.windows and q.shape[2] == k.shape[2]
                    if options["is_causal"]
                    else self.steps and q.shape[2] == 1
                )
            ):
                return causal_attention(q, k, v, options["scale"])
        return func(*args, **kwargs)


# transformers' attention interface: the names a model's layers attend by while ``native_attention_layers``
# holds begin so (then "_windows", "_steps" or both: the calls the kernel takes)
NATIVE_IMPLEMENTATION = "sparsegpt_native"


def _native_sdpa_forward(
    windows: bool,
    steps: bool,
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """transformers' SDPA attention of one layer, its ``F.scaled_dot_product_attention`` call by the native
    kernel where ``NativeCausalAttention(windows, steps)`` takes it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with NativeCausalAttention(windows, steps):
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


@contextlib.contextmanager
def native_attention_layers(model: Any, windows: bool = True, steps: bool = True) -> Iterator[None]:
    """Within: the attention layers of ``model`` (a transformers model that attends by SDPA) attend as SDPA
    does, with ``NativeCausalAttention(windows, steps)`` entered around each layer's attention alone. A
    mode around the whole forward would see every operation of it: a generation step's thousands of small
    ones cost more in that mode's Python than the kernel saves. Other models are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # registered under this package's name, beside transformers' own (its documented extension point)
    name = f"{NATIVE_IMPLEMENTATION}{'_windows' if windows else ''}{'_steps' if steps else ''}"
    AttentionInterface.register(name, functools.partial(_native_sdpa_forward, windows, steps))
    AttentionMaskInterface.register(name, sdpa_mask)  # the masks SDPA gets
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
