"""The elementwise steps of a transformer block's CPU forward by this package's fused AVX-512 kernels
(_elementwise.c): a gated MLP's SiLU and gating product, RMSNorm, and rotary position embeddings.

torch runs each of these as a chain of ops, every one a pass over the activations (RMSNorm alone is a
square, a mean, a reciprocal square root and two products); on a two-core host they took about a fifth of
a block's bf16 forward over calibration windows (docs/RESULTS.md, "Where a block forward and a Hessian spend
their time"). Each kernel makes one pass and rounds where torch's ops round, so its results are torch's:
rotary embeddings bit for bit, RMSNorm up to the order its mean sums in, the SiLU gating up to its
exponential (about one float32 ulp before the product is rounded).

``fused_block_steps(module)`` routes them for the forwards inside it, generically over architectures:

- RMSNorm modules (a class named ``…RMSNorm`` with a 1-D ``weight`` and ``variance_epsilon`` or ``eps``);
- gated MLPs (``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``) compute
  ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``, each projection still called as a module, so that
  hooks on it run as before;
- the ``apply_rotary_pos_emb`` function of the modeling module an attention layer's class comes from.

A step is replaced only where a probe on small random inputs gives the original's result, so a class with
the same names that computes something else (Gemma's ``1 + weight`` norm, a GELU MLP, interleaved rotary
embeddings) keeps its own code. Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_ROTARY = "apply_rotary_pos_emb"  # the name transformers' modeling modules give the function


@functools.cache
def _native() -> Any:
    """The kernels of _elementwise.c through ctypes, or None (the optional extension was not built, or this
    processor lacks AVX-512 F/BW/VL)."""
    try:  # by its full name: the package's __init__ may import this module
        extension = importlib.import_module("sparsegpt._elementwise")
    except ImportError:
        return None
    library = ctypes.CDLL(extension.__file__)
    integer, pointer, kind = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
    library.sgpt_elementwise_available.restype = kind
    library.sgpt_elementwise_available.argtypes = []
    if not library.sgpt_elementwise_available():
        return None
    library.sgpt_silu_mul.restype = integer
    library.sgpt_silu_mul.argtypes = [pointer] * 3 + [integer, kind, kind]
    library.sgpt_rms_norm.restype = integer
    library.sgpt_rms_norm.argtypes = [pointer] * 3 + [integer, integer, ctypes.c_float, kind, kind]
    library.sgpt_rotary.restype = integer
    library.sgpt_rotary.argtypes = [pointer, pointer, kind, pointer, pointer, pointer, kind, pointer, kind]
    library.sgpt_rotary.argtypes += [integer] * 4 + [kind]
    return library


def native_available() -> bool:
    """Whether the fused kernels run on this processor (built, and AVX-512 F/BW/VL present)."""
    return _native() is not None


def _plain(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one kernel dtype that no gradient is wanted for."""
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and t.dtype in _KINDS and not (grad and t.requires_grad) for t in tensors)


# below this many values a kernel runs on one thread: a generation step's few thousand are done before
# another thread would have started
_PARALLEL_VALUES = 1 << 15


def _threads(tensor: torch.Tensor) -> int:
    return torch.get_num_threads() if tensor.numel() >= _PARALLEL_VALUES else 1


def _check(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"the fused {name} kernel failed with status {status}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``: by the fused kernel for CPU tensors of one shape and dtype (float32 or
    bfloat16), by torch otherwise."""
    library = _native()
    if library is None or gate.shape != up.shape or gate.dtype != up.dtype or not _plain(gate, up):
        return F.silu(gate) * up
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    with torch.profiler.record_function("sparsegpt::silu_mul"):  # named in profiles, as torch's ops are
        status = library.sgpt_silu_mul(
            gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), _KINDS[gate.dtype], _threads(gate)
        )
    _check(status, "silu_mul")
    return out


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm (Llama's), the reference the kernel follows."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dimension, computed in float32 and rounded back to
    x's dtype before the weight multiplies it (transformers' RMSNorm): by the fused kernel where x and the
    weight share a dtype (float32 or bfloat16) on the CPU, by torch otherwise."""
    library = _native()
    if library is None or x.dtype != weight.dtype or weight.shape != x.shape[-1:] or not _plain(x, weight):
        return _rms_norm_torch(x, weight, eps)
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    width = x.shape[-1]
    with torch.profiler.record_function("sparsegpt::rms_norm"):
        status = library.sgpt_rms_norm(
            x.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            x.numel() // width if width else 0,
            width,
            eps,
            _KINDS[x.dtype],
            _threads(x),
        )
    _check(status, "rms_norm")
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (batch, heads, positions, dim) and cos, sin (batch or 1, positions, dim) of one dtype, last dimensions
    contiguous, dim even."""
    if x.ndim != 4 or cos.ndim != 3 or cos.shape != sin.shape or cos.dtype != sin.dtype or not _plain(x, cos, sin):
        return False
    batch, _, positions, dim = x.shape
    return (
        dim % 2 == 0
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (positions, dim)
        and all(t.stride(-1) == 1 for t in (x, cos, sin))
        and cos.stride() == sin.stride()
    )


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (batch, heads, positions, dim) and cos, sin (batch or 1,
    positions, dim), rotate_half(x) the halves of x's last dimension swapped, the new first one negated: by
    the fused kernel where ``_rotary_takes`` holds, by torch otherwise (cos and sin then broadcast as
    given after a dimension is added at 1)."""
    library = _native()
    if library is None or not _rotary_takes(x, cos, sin):
        return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)
    out_dtype = torch.promote_types(x.dtype, cos.dtype)
    batch, heads, positions, dim = x.shape
    out = torch.empty((batch, heads, positions, dim), dtype=out_dtype)
    x_strides = (ctypes.c_int64 * 3)(*x.stride()[:3])
    table_strides = (ctypes.c_int64 * 2)(cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
    with torch.profiler.record_function("sparsegpt::rotary"):
        status = library.sgpt_rotary(
            x.data_ptr(),
            x_strides,
            _KINDS[x.dtype],
            cos.data_ptr(),
            sin.data_ptr(),
            table_strides,
            _KINDS[cos.dtype],
            out.data_ptr(),
            _KINDS[out_dtype],
            batch,
            heads,
            positions,
            dim,
            _threads(x),
        )
    _check(status, "rotary")
    return out


def _fused_rotary(original: Callable[..., Any]) -> Callable[..., Any]:
    """A drop-in for transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)``: both by
    ``rotary`` where the kernel takes them, ``original`` otherwise."""

    @functools.wraps(original)
    def apply(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1:
            return original(q, k, cos, sin, *args, **kwargs)
        if not (_rotary_takes(q, cos, sin) and _rotary_takes(k, cos, sin)):
            return original(q, k, cos, sin)
        return rotary(q, cos, sin), rotary(k, cos, sin)

    return apply


# --- probes: a replacement is taken only where it gives the original's result on small random inputs ---


def _same(a: Any, b: Any, exact: bool) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y, exact) for x, y in zip(a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if exact:
        return torch.equal(a, b)
    # rounding of a sum order or an exponential, and bf16's one ulp where that tips a rounding
    tolerance = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
    return torch.allclose(a.float(), b.float(), rtol=tolerance, atol=tolerance)


def _norm_epsilon(module: nn.Module) -> float | None:
    """The epsilon of an RMSNorm-like module (a class named ``…RMSNorm`` with a 1-D weight), or None."""
    weight = getattr(module, "weight", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _norm_probe(module: nn.Module, eps: float) -> bool:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, module.weight.shape[0], generator=generator, dtype=module.weight.dtype)
    try:
        with torch.no_grad():
            return _same(type(module).forward(module, x), rms_norm(x, module.weight, eps), exact=False)
    except Exception:  # a forward of another signature: not an RMSNorm this kernel computes
        return False


def _gated_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _mlp_probe(module: nn.Module) -> bool:
    """Whether ``module``'s forward is ``down_proj(silu(gate_proj(x)) * up_proj(x))``: its class's forward run
    on a stand-in that shares its attributes but has small random projections (none of the model's weights,
    no hooks), against that formula."""
    stand_in = copy.copy(module)
    stand_in._modules = OrderedDict(module._modules)  # the stand-in's own, so that the model's stay
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for name, shape in (("gate_proj", (16, 8)), ("up_proj", (16, 8)), ("down_proj", (8, 16))):
                projection = nn.Linear(shape[1], shape[0], bias=False)
                projection.weight.copy_(torch.randn(shape, generator=generator))
                setattr(stand_in, name, projection)
            x = torch.randn(4, 8, generator=generator)
            expected = stand_in.down_proj(silu_mul(stand_in.gate_proj(x), stand_in.up_proj(x)))
            return _same(type(module).forward(stand_in, x), expected, exact=False)
    except Exception:  # a forward that needs more of its instance, or of other shapes: not taken
        return False


def _fused_mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.down_proj(silu_mul(module.gate_proj(x), module.up_proj(x)))


def _fused_norm_forward(module: nn.Module, eps: float, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, module.weight, eps)


def _rotary_probe(original: Callable[..., Any]) -> bool:
    """Whether ``_fused_rotary(original)`` gives ``original``'s results bit for bit, on inputs as attention
    layers pass them (q and k transposed views of a projection's output; cos and sin as computed for the
    positions) in float32, bfloat16 and mixed."""
    generator = torch.Generator().manual_seed(0)
    fused = _fused_rotary(original)
    try:
        with torch.no_grad():
            for x_dtype, table_dtype in (
                (torch.float32, torch.float32),
                (torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16),
            ):
                q = torch.randn(2, 5, 3 * 32, generator=generator, dtype=x_dtype).view(2, 5, 3, 32).transpose(1, 2)
                k = torch.randn(2, 5, 32, generator=generator, dtype=x_dtype).view(2, 5, 1, 32).transpose(1, 2)
                cos, sin = (torch.randn(2, 5, 32, generator=generator, dtype=table_dtype) for _ in range(2))
                if not _same(fused(q, k, cos, sin), original(q, k, cos, sin), exact=True):
                    return False
        return True
    except Exception:  # another signature: not taken
        return False


@contextlib.contextmanager
def fused_block_steps(module: nn.Module) -> Iterator[int]:
    """Within: the RMSNorms, gated SiLU MLPs and rotary embeddings inside ``module`` (a block, or a whole
    model) computed by the fused kernels, where each one's probe agrees (see the module's docstring);
    yields how many steps were replaced (0 where the kernels are not available). Put back on exit."""
    if _native() is None:
        yield 0
        return
    restore: list[Callable[[], None]] = []
    rotaries: dict[str, Any] = {}
    try:
        with torch.autocast("cpu", enabled=False):  # the probes compute in their own dtypes
            _replace_steps(module, restore, rotaries)
        yield len(restore)
    finally:
        for undo in reversed(restore):
            undo()


def fused_steps_on(device: torch.device, module: nn.Module | None) -> contextlib.AbstractContextManager[Any]:
    """``fused_block_steps(module)`` for forwards on the CPU; nothing for another device or no module."""
    return fused_block_steps(module) if module is not None and device.type == "cpu" else contextlib.nullcontext()


def _replace_steps(module: nn.Module, restore: list[Callable[[], None]], rotaries: dict[str, Any]) -> None:
    """The replacements of ``fused_block_steps``, each with its undoing appended to ``restore``."""
    for sub in module.modules():
        eps = _norm_epsilon(sub)
        if eps is not None and "forward" not in sub.__dict__ and _norm_probe(sub, eps):
            sub.forward = functools.partial(_fused_norm_forward, sub, eps)
            restore.append(functools.partial(sub.__dict__.pop, "forward"))
        elif _gated_mlp(sub) and "forward" not in sub.__dict__ and _mlp_probe(sub):
            sub.forward = functools.partial(_fused_mlp_forward, sub)
            restore.append(functools.partial(sub.__dict__.pop, "forward"))
        home = sys.modules.get(type(sub).__module__)
        original = getattr(home, _ROTARY, None)
        if (
            home is not None
            and original is not None
            and home.__name__ not in rotaries
            and not getattr(original, "_sparsegpt_fused", False)
        ):
            rotaries[home.__name__] = original
            if _rotary_probe(original):
                replacement = _fused_rotary(original)
                replacement._sparsegpt_fused = True  # type: ignore[attr-defined]
                setattr(home, _ROTARY, replacement)
                restore.append(functools.partial(setattr, home, _ROTARY, original))
