"""The machine this process runs on: which device to compute on, how fast it multiplies bf16 against
float32 (measured once per host and cached), how much memory is free, and the C allocator's settings that
the command line applies.

glibc's allocator hands tensors above a size threshold straight back to the kernel when they are freed,
and trims the heap as soon as its free top grows, so every forward pass of a calibration batch faults its
activations in again, page by page. On 2 cores that cost 10-20% of a block's forward time, all of it
kernel time (docs/RESULTS.md, "The allocator tuning the CLI applies"). Keeping freed memory in the process removes it. Threads other
than the main one get arenas of their own, whose heaps glibc unmaps as soon as they empty, whatever the
trim threshold: one arena for all threads keeps their temporaries warm too (the compact loader decodes on
worker threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsegpt.errors import SparseGPTError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
_NEVER_TRIM = 2**31 - 1


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (the accelerator when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparseGPTError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparseGPTError(f"device {name} asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise SparseGPTError(f"unsupported device {name!r} (use cpu, cuda, cuda:N or auto)")
    return device


@dataclass(frozen=True)
class MatmulRates:
    """A linear layer's speed on this host in GFLOP/s at the shape of a calibration forward's MLP
    (``PROBE_SHAPE``), with torch's current thread count: ``F.linear`` with float32 and with bfloat16
    operands; the split-bfloat16 product perplexity can score with (``gram.split_linear``: two bf16
    products summed in float32, counted as the one float32 product they stand for); the float32 product
    by oneDNN (``linears.onednn_linear``; 0 where it is missing or disagrees), which replaces torch's where
    it is faster (``fast_onednn_float32``); and by each of ``gram.BACKENDS`` (0 where it is missing) a
    bf16 × bf16 → float32 linear product, and a float32 Gram matrix of 2048 tokens (its upper triangle,
    counted as the whole product), which decide ``product_backend``. Beside them, causal self-attention at
    ``ATTENTION_PROBE`` (counted as its useful products, 2 · 2 · heads · dim · length²/2) by torch's kernel
    in float32 and in bf16 and by this package's native kernel (0 where it is missing), and the same for
    one generation step's attention (``attention_calls(step=True)``; the native kernel on float32 and on
    bf16 inputs), which decide ``native_attention_faster``."""

    float32: float
    bfloat16: float
    split_bfloat16: float
    mkl_mixed: float = 0.0
    native_mixed: float = 0.0
    onednn_float32: float = 0.0
    mkl_gram_float32: float = 0.0
    native_gram_float32: float = 0.0
    attention_float32: float = 0.0
    attention_bfloat16: float = 0.0
    attention_native: float = 0.0
    step_float32: float = 0.0
    step_bfloat16: float = 0.0
    step_native: float = 0.0
    step_native_bfloat16: float = 0.0

    @property
    def best_float32(self) -> float:
        """The float32 rate linear layers run at here (``float32_linears``)."""
        return self.onednn_float32 if self.onednn_faster else self.float32

    @property
    def onednn_faster(self) -> bool:
        return self.onednn_float32 >= ONEDNN_WORTH_IT * self.float32

    @property
    def bfloat16_speedup(self) -> float:
        return self.bfloat16 / self.best_float32

    @property
    def split_bfloat16_speedup(self) -> float:
        return self.split_bfloat16 / self.best_float32


# tokens × width → out features: smollm2-135m's up projection over one 512-token window; small enough that
# the probe takes well under a second even where bf16 is emulated (about 0.2 × float32's rate on AVX2)
PROBE_SHAPE = (512, 576, 1536)
# (heads, key/value heads, length, dim): smollm2-135m's attention over one 512-token window
ATTENTION_PROBE = (9, 3, 512, 64)
# below this speed-up over torch's attention, the native kernel is not worth the change of kernels
NATIVE_ATTENTION_WORTH_IT = 1.1
# bf16 forwards also pay for casts and for the parts autocast leaves in float32: below this speed-up of the
# products alone they are not worth it
BFLOAT16_WORTH_IT = 1.5
# below this speed-up over torch's float32 product, oneDNN's does not pay for the Python call around it
ONEDNN_WORTH_IT = 1.15
RATES_FILE = "host-rates.json"
RATE_NAMES = (
    "float32",
    "bfloat16",
    "split_bfloat16",
    "mkl_mixed",
    "native_mixed",
    "onednn_float32",
    "mkl_gram_float32",
    "native_gram_float32",
    "attention_float32",
    "attention_bfloat16",
    "attention_native",
    "step_float32",
    "step_bfloat16",
    "step_native",
    "step_native_bfloat16",
)


def fast_bfloat16(device: torch.device, cache: Path | None = None) -> bool:
    """Whether bf16 products on ``device`` are fast enough that bf16 forwards pay: on a GPU, native bf16
    support; on the CPU, a measured speed-up of at least ``BFLOAT16_WORTH_IT`` (``matmul_rates``), not the
    instruction-set flags, which promise the same on hosts whose libraries differ."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    return matmul_rates(cache).bfloat16_speedup >= BFLOAT16_WORTH_IT


def fast_split_bfloat16(device: torch.device, cache: Path | None = None) -> bool:
    """Whether split-bfloat16 products (``MatmulRates``) on ``device`` beat float32 by ``BFLOAT16_WORTH_IT``:
    measured on the CPU, where they exist (``gram.mixed_backends``, on ``product_backend``); never elsewhere."""
    from sparsegpt.solver.gram import native_mixed_gram

    if device.type != "cpu" or not native_mixed_gram(torch.bfloat16):
        return False
    return matmul_rates(cache).split_bfloat16_speedup >= BFLOAT16_WORTH_IT


def product_backend(dtype: torch.dtype, cache: Path | None = None) -> str:
    """Which of ``gram.BACKENDS`` multiplies ``dtype`` inputs into float32 on the CPU here, for Gram
    matrices and (bf16) the split-bfloat16 linears: "native" where the processor has those kernels and
    they measured faster than MKL's (``MatmulRates``), else "mkl" (measured only where both exist)."""
    from sparsegpt.solver.gram import mixed_backends, native_available

    if not native_available(dtype):
        return "mkl"
    rates = matmul_rates(cache)
    if dtype == torch.float32:
        return "native" if rates.native_gram_float32 > rates.mkl_gram_float32 else "mkl"
    if "mkl" not in mixed_backends(dtype):
        return "native"
    return "native" if rates.native_mixed > rates.mkl_mixed else "mkl"


def fast_onednn_float32(cache: Path | None = None) -> bool:
    """Whether oneDNN's float32 product measures faster on the CPU than torch's by ``ONEDNN_WORTH_IT``
    (``float32_linears`` then routes float32 linear layers to it)."""
    return matmul_rates(cache).onednn_faster


def float32_linears(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``linears.OneDnnLinears`` where ``device`` is the CPU and oneDNN's float32 product measures faster
    than torch's (``fast_onednn_float32``), else nothing."""
    from sparsegpt.linears import OneDnnLinears

    return OneDnnLinears() if device.type == "cpu" and fast_onednn_float32() else contextlib.nullcontext()


def native_attention_faster(device: torch.device, forward_dtype: str | None, step: bool = False) -> bool:
    """Whether ``device`` is the CPU and the native attention kernel measured faster by
    ``NATIVE_ATTENTION_WORTH_IT`` than torch's attention in the forward's precision (``forward_dtype``:
    "bfloat16" for bf16 inputs, None for float32; ``MatmulRates``): over whole windows, or with ``step``
    for a generation step's one query per head over its cache."""
    from sparsegpt.attention import native_available

    if device.type != "cpu" or forward_dtype not in (None, "bfloat16") or not native_available():
        return False
    rates, bf16 = matmul_rates(), forward_dtype == "bfloat16"
    if step:
        native, theirs = (
            (rates.step_native_bfloat16, rates.step_bfloat16) if bf16 else (rates.step_native, rates.step_float32)
        )
    else:
        native, theirs = rates.attention_native, rates.attention_bfloat16 if bf16 else rates.attention_float32
    return native >= NATIVE_ATTENTION_WORTH_IT * theirs


def native_attention(device: torch.device, forward_dtype: str | None) -> contextlib.AbstractContextManager[Any]:
    """``attention.NativeCausalAttention`` where ``native_attention_faster``, else nothing."""
    from sparsegpt.attention import NativeCausalAttention

    faster = native_attention_faster(device, forward_dtype)
    return NativeCausalAttention() if faster else contextlib.nullcontext()


def matmul_rates(cache: Path | None = None) -> MatmulRates:
    """This host's ``MatmulRates``, measured once per processor, torch version and thread count and kept
    in ``cache``/host-rates.json (by default the project's cache folder; where it cannot be written, each
    process measures anew)."""
    path = (cache if cache is not None else _cache_root()) / RATES_FILE
    key = host_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict):
        try:
            return MatmulRates(*(float(known[key][name]) for name in RATE_NAMES))
        except (KeyError, TypeError, ValueError):
            pass
    rates = measure_matmul_rates()
    log.info(
        "this host multiplies at %.0f GFLOP/s in float32 (%.0f by oneDNN), %.0f in bfloat16, %.0f split; bf16 "
        "into float32 %.0f by MKL, %.0f by the AVX512-BF16 kernels; attends at %.0f in float32, %.0f in bfloat16, "
        "%.0f by the native kernel; a generation step at %.1f, %.1f, %.1f (%.1f from bf16) (cached in %s)",
        rates.float32,
        rates.onednn_float32,
        rates.bfloat16,
        rates.split_bfloat16,
        rates.mkl_mixed,
        rates.native_mixed,
        rates.attention_float32,
        rates.attention_bfloat16,
        rates.attention_native,
        rates.step_float32,
        rates.step_bfloat16,
        rates.step_native,
        rates.step_native_bfloat16,
        path,
    )
    known[key] = {name: getattr(rates, name) for name in RATE_NAMES}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        partial.replace(path)
    except OSError as error:
        log.debug("host rates not cached (%s)", error)
    return rates


def measure_matmul_rates(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = 5) -> MatmulRates:
    """The ``MatmulRates`` at ``shape`` (tokens, width, out features): for each, the best of ``repeats``
    calls after two warm-up calls (the best, as the machine's rate, not its noise), the calls taken in
    turn round by round, so that a slow spell of a shared host falls on every rate alike rather than on
    the one measured then (the choices compare rates). The split product counts on the faster mixed
    backend."""
    from sparsegpt.linears import onednn_agrees, onednn_linear
    from sparsegpt.solver import gram

    tokens, width, features = shape
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(tokens, width, generator=generator)
    weight = torch.randn(features, width, generator=generator)
    rows, weight16, out = inputs.bfloat16(), weight.bfloat16(), torch.empty(tokens, features)
    flops = 2.0 * tokens * width * features
    linear = torch.nn.functional.linear
    calls: dict[str, tuple[Callable[[], Any], float]] = {
        "float32": (lambda: linear(inputs, weight), flops),
        "bfloat16": (lambda: linear(rows, weight16), flops),
    }
    if onednn_agrees():
        calls["onednn_float32"] = (lambda: onednn_linear(inputs, weight), flops)
    backends = gram.mixed_backends(torch.bfloat16)
    for name in backends:
        prepared = gram.mixed_weight(weight16, name)
        calls[f"{name}_mixed"] = (lambda prepared=prepared: gram.mixed_linear(out, rows, prepared), flops)
    for name in backends or ("mkl",):  # (without a mixed product the split widens to float32)
        parts = gram.split_bfloat16(weight, name)
        calls[f"split_{name}"] = (lambda parts=parts: gram.split_linear(inputs, *parts), flops)
    # the Gram products of 2048 tokens at the same width
    tall, square = torch.cat([inputs] * 4), torch.zeros(width, width)
    for name in gram.BACKENDS if gram.native_available(torch.float32) else ():
        gram_flops = 2.0 * tall.shape[0] * width * width
        calls[f"{name}_gram_float32"] = (lambda name=name: gram.add_gram(square, tall, backend=name), gram_flops)
    calls.update({f"attention_{name}": call for name, call in attention_calls().items()})
    calls.update({f"step_{name}": call for name, call in attention_calls(step=True).items()})
    rates = best_rates(calls, repeats)
    mixed = max(backends or ("mkl",), key=lambda name: rates.get(f"{name}_mixed", 0.0))
    return MatmulRates(
        rates["float32"],
        rates["bfloat16"],
        rates[f"split_{mixed}"],
        mkl_mixed=rates.get("mkl_mixed", 0.0),
        native_mixed=rates.get("native_mixed", 0.0),
        onednn_float32=rates.get("onednn_float32", 0.0),
        mkl_gram_float32=rates.get("mkl_gram_float32", 0.0),
        native_gram_float32=rates.get("native_gram_float32", 0.0),
        attention_float32=rates["attention_float32"],
        attention_bfloat16=rates["attention_bfloat16"],
        attention_native=rates.get("attention_native", 0.0),
        step_float32=rates["step_float32"],
        step_bfloat16=rates["step_bfloat16"],
        step_native=rates.get("step_native", 0.0),
        step_native_bfloat16=rates.get("step_native_bfloat16", 0.0),
    )


def best_rates(calls: dict[str, tuple[Callable[[], Any], float]], repeats: int) -> dict[str, float]:
    """GFLOP/s of each named (call, flops): its fastest of ``repeats`` rounds, every call once per round,
    after two warm-up calls of each."""
    best = dict.fromkeys(calls, math.inf)
    with torch.no_grad():
        for call, _ in calls.values():
            call()
            call()
        for _ in range(repeats):
            for name, (call, _) in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: flops / best[name] / 1e9 for name, (_, flops) in calls.items()}


def attention_calls(
    shape: tuple[int, int, int, int] = ATTENTION_PROBE, batch: int = 1, step: bool = False
) -> dict[str, tuple[Callable[[], Any], float]]:
    """Causal self-attention of ``batch`` windows at ``shape`` (heads, key/value heads, length, dim) by torch
    in float32 ("float32") and in bf16 ("bfloat16"), and by the native kernel ("native", where it runs
    here), each with its useful products' flops (2 · 2 · heads · dim · length²/2 per window). q, k and v
    are what attention layers hand over: (batch, heads, length, dim) views of (batch, length, heads, dim).
    ``step``: a generation step instead, one query per head over ``length`` cached keys (2 · 2 · heads ·
    dim · length flops)."""
    from sparsegpt.attention import causal_attention, native_available

    heads, kv_heads, length, dim = shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, 1 if step and count == heads else length, count, dim, generator=generator).transpose(1, 2)
        for count in (heads, kv_heads, kv_heads)
    )
    half = [t.bfloat16() for t in (q, k, v)]
    flops = 4.0 * batch * heads * dim * length * (1 if step else length / 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = {
        "float32": (lambda: sdpa(q, k, v, is_causal=not step, enable_gqa=True), flops),
        "bfloat16": (lambda: sdpa(*half, is_causal=not step, enable_gqa=True), flops),
    }
    if native_available():
        calls["native"] = (lambda: causal_attention(q, k, v), flops)
        if step:  # a bf16 model's cache, read as it is
            calls["native_bfloat16"] = (lambda: causal_attention(*half), flops)
    return calls


def host_key() -> str:
    """What a matrix product's speed depends on: the processor (its name and flags), torch's version and
    its thread count."""
    fields: dict[str, str] = {}
    try:  # Linux: the first processor's entry (x86 names "flags", ARM "Features")
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            fields.setdefault(field.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{name} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _cache_root() -> Path:
    from sparsegpt.assets import cache_root  # the project's one cache folder

    return cache_root()


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def return_freed_memory() -> bool:
    """The opposite trade, for runs that are about peak memory (streaming): every allocation of 1 MiB or
    more gets pages of its own, handed back to the system the moment it is freed, and the heap is
    trimmed eagerly. glibc's default raises its threshold after the first large free, after which freed
    tensors linger in a heap that fragments, and a run's peak grows with it. Returns False (and does nothing) where the C library is not glibc."""
    return _mallopt(((_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 1 << 20), (_M_TOP_PAD, 0)))


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap, never trim it, and serve all threads from
    one arena. Returns False (and does nothing) where the C library is not glibc."""
    return _mallopt(
        (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
            (_M_TRIM_THRESHOLD, _NEVER_TRIM),
            (_M_TOP_PAD, 256 << 20),
            (_M_ARENA_MAX, 1),
        )
    )


def trim_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc's malloc_trim): after a load whose
    temporaries were freed between the tensors that stay, so that they do not count as resident. Returns
    False (and does nothing) where the C library is not glibc."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def _libc_function(name: str) -> Any:
    """A function of the C library, or None where it has none by that name (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        log.debug("no %s in the C library; allocator left as it is", name)
        return None


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(option, value) == 1 for option, value in settings)
