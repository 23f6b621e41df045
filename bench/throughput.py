"""What this host's CPU does for the matrix products that dominate pruning: fp32 against bf16.

Prints the SIMD flags that matter and the median GFLOP/s of ``F.linear`` (and, in float32, of oneDNN's
product, ``linears.onednn_linear``) at the shapes of smollm2-135m's
MLP (2048×576 by 576×1536) and lm_head (2048×576 by 576×49152) on the current torch threads; then the
Hessians' Gram product XᵀX (4096 tokens, widths 576 and 1536; float32, and bf16 inputs summed in float32
by ``add_product``): the whole product's GFLOP/s and, for column blocks of 128-512, the time of the
upper block triangle (``add_block_triangle``) as a share of the whole product's (what ``TRIANGLE_BLOCKS``
is set by), for float32 that of MKL's symmetric rank-k update, and for both that of the native AVX-512
kernel's exact upper triangle (``_native_gram``, where the processor has it; ``add_gram`` takes the
faster of these two, as the host probe measured);
then the factorizations of a Hessian (widths 1536, 4096, 11008): the Cholesky factorization, the
triangular inverse by halves (``lower_triangular_inverse``) against LAPACK's triangular solve with the
identity, and the whole ``inverse_factor`` in both factorizations; seconds and useful GFLOP/s (n³/3 for
a factorization or a triangular inverse). The ``block`` section (not run by default) times one block
forward of smollm2-135m (block 3, 8 × 512 tokens of sotu:train) in float32 and under bf16 autocast, with
the elementwise steps by the fused kernels as a pass runs them and by torch's ops ("torch steps"), and
splits it by the profiler into matrix products, attention and everything else (norms, rotary embeddings,
activations, casts of the inputs, residual adds; each weight is cast once per context, as in a pass):
what bounds a forward pass's rate besides the matrix products. The ``attention`` section times causal
self-attention over 8 windows of 512 tokens at the head shapes of smollm2-135m, qwen2.5-coder-0.5b and
qwen2.5-coder-1.5b: torch's kernel on float32 and on bf16 inputs, and this package's native kernel
(``attention.causal_attention``, float32), in milliseconds and useful GFLOP/s (2 · 2 · heads · dim ·
length²/2 per window); then one generation step's attention (batch 1, one query per head over 512 cached
keys, in microseconds), where the native kernel also reads bf16 inputs as they are.

    python bench/throughput.py [--sections linear,gram,factorization,block,attention]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import median_seconds

from sparsegpt.host import attention_calls
from sparsegpt.linears import onednn_agrees, onednn_linear
from sparsegpt.solver.gram import _native_gram, _syrk, add_block_triangle, add_product, native_available
from sparsegpt.solver.sparsegpt import inverse_factor, lower_triangular_inverse

SHAPES = {"mlp": (2048, 576, 1536), "lm_head": (2048, 576, 49152)}


def gflops(dtype: torch.dtype, rows: int, inner: int, cols: int, linear: Any = F.linear, repeats: int = 5) -> float:
    """Median GFLOP/s of ``linear`` (``F.linear``, or oneDNN's float32 product) on random (rows, inner)
    inputs and a (cols, inner) weight."""
    inputs, weight = torch.randn(rows, inner, dtype=dtype), torch.randn(cols, inner, dtype=dtype)
    return 2 * rows * inner * cols / median_seconds(lambda: linear(inputs, weight), repeats) / 1e9


def gram_gflops(dtype: torch.dtype, tokens: int, width: int, repeats: int = 5) -> float:
    """Median GFLOP/s of the whole XᵀX of (tokens, width) ``dtype`` inputs into float32 (``add_product``)."""
    rows, gram = torch.randn(tokens, width).to(dtype), torch.zeros(width, width)
    return 2 * tokens * width * width / median_seconds(lambda: add_product(gram, rows, rows), repeats) / 1e9


def triangle_shares(dtype: torch.dtype, tokens: int, width: int, repeats: int = 9) -> dict[int | str, float]:
    """For column blocks of 128-512: the upper block triangle's time over the whole product's, calls
    interleaved; ``"rank_update"``: MKL's symmetric rank-k update's, where it exists for ``dtype``; and
    ``"native_triangle"``: the native AVX-512 kernel's, where the processor has it for ``dtype``."""
    rows, gram = torch.randn(tokens, width).to(dtype), torch.zeros(width, width)
    whole, shares = [], {}
    for block in (128, 192, 256, 384, 512):
        count = max(1, round(width / block))
        edges = [width * index // count for index in range(count + 1)]
        whole.append(median_seconds(lambda: add_product(gram, rows, rows), repeats))
        shares[block] = median_seconds(lambda edges=edges: add_block_triangle(gram, rows, edges), repeats)
    update = _syrk(dtype)
    if update is not None:
        whole.append(median_seconds(lambda: add_product(gram, rows, rows), repeats))
        shares["rank_update"] = median_seconds(lambda: update(gram, rows), repeats)
    if dtype in (torch.bfloat16, torch.float32) and native_available(dtype):
        whole.append(median_seconds(lambda: add_product(gram, rows, rows), repeats))
        shares["native_triangle"] = median_seconds(lambda: _native_gram(gram, rows), repeats)
    reference = statistics.median(whole)
    return {block: round(seconds / reference, 2) for block, seconds in shares.items()}


def factorization_timings(width: int, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Median seconds (and useful GFLOP/s) of the parts of factorizing a (width, width) Hessian."""
    inputs = torch.randn(2 * width, width) + torch.randn(2 * width, 1)  # correlated columns
    hessian = inputs.T @ inputs / inputs.shape[0]
    del inputs
    lower = torch.linalg.cholesky(hessian)
    identity = torch.eye(width)
    calls = {
        "cholesky": lambda: torch.linalg.cholesky_ex(hessian),
        "triangular_inverse_by_halves": lambda: lower_triangular_inverse(lower),
        "triangular_solve_with_identity": lambda: torch.linalg.solve_triangular(lower, identity, upper=False),
        "inverse_factor_reversed": lambda: inverse_factor(hessian, 0.01, "reversed"),
        "inverse_factor_inverse": lambda: inverse_factor(hessian, 0.01, "inverse"),
    }
    useful = width**3 / 3
    timings = {}
    for name, call in calls.items():
        seconds = median_seconds(call, repeats)
        timings[name] = {"seconds": round(seconds, 4)}
        if not name.startswith("inverse_factor"):
            timings[name]["gflops"] = round(useful / seconds / 1e9, 1)
    return timings


# torch's own products, and oneDNN's float32 one where host.float32_linears sends linear layers to it
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def block_forward_parts(repeats: int = 7) -> dict[str, dict[str, float]]:
    """Milliseconds of one block forward (median of ``repeats``) and its profiled parts, by precision."""
    import sparsegpt
    from sparsegpt import PruneConfig, data, pipeline
    from sparsegpt.api import calibration_windows
    from sparsegpt.models import find_blocks

    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
    windows = calibration_windows(model, tokenizer, data.load_text("sotu:train"), PruneConfig(seqlen=512))
    blocks = find_blocks(model)
    hidden, calls = pipeline.capture_block_inputs(model, blocks, [windows[:8]])
    block, states, call = blocks[3].module, hidden[0], calls[3][0]
    parts = {}
    variants = [
        (f"{name}{suffix}", precision, fused)
        for name, precision in (("float32", None), ("bfloat16", "bfloat16"))
        for suffix, fused in (("", True), (" torch steps", False))
    ]
    for name, precision, fused in variants:
        # one context for all calls, as in a pass of the pipeline (no gradients): autocast casts each
        # weight once, float32 linears go to the host's faster product, and the elementwise steps to the
        # fused kernels (or, for "torch steps", torch's own ops)
        module = block if fused else None
        with torch.no_grad(), pipeline.forward_precision(precision, torch.device("cpu"), module):
            milliseconds = 1e3 * median_seconds(lambda: call.run(block, states), repeats)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                for _ in range(repeats):
                    call.run(block, states)
        self_ms: dict[str, float] = {"matrix_products": 0.0, "attention": 0.0, "rest": 0.0}
        for event in profile.key_averages():
            kind = "matrix_products" if event.key in MATRIX_PRODUCTS else "rest"
            kind = "attention" if "scaled_dot_product" in event.key or "causal_attention" in event.key else kind
            self_ms[kind] += event.self_cpu_time_total / 1e3 / repeats
        profiled = sum(self_ms.values())
        # the profiled parts, scaled to the unprofiled median (the profiler's own overhead spread evenly)
        parts[name] = {"ms": round(milliseconds, 1)} | {
            kind: round(milliseconds * value / profiled, 1) for kind, value in self_ms.items()
        }
    return parts


# (heads, key/value heads, dim) of the models the benchmarks use
ATTENTION_SHAPES = {"smollm2-135m": (9, 3, 64), "qwen2.5-coder-0.5b": (14, 2, 64), "qwen2.5-coder-1.5b": (12, 2, 128)}


# host.attention_calls' names, as this benchmark prints them
ATTENTION_LABELS = {
    "float32": "torch_float32",
    "bfloat16": "torch_bfloat16",
    "native": "native_float32",
    "native_bfloat16": "native_bfloat16_inputs",
}


def attention_timings(
    batch: int = 8, length: int = 512, repeats: int = 7, step: bool = False
) -> dict[str, dict[str, Any]]:
    """Per model shape: median milliseconds and useful GFLOP/s of causal self-attention by torch (float32 and
    bf16 inputs) and by the native kernel (where the processor has it; ``host.attention_calls``), the calls
    taken in turn, one of each per round, after a warm-up call of each. ``step``: one generation step's
    attention over ``length`` cached keys instead (microseconds)."""
    results = {}
    for model, (heads, kv_heads, dim) in ATTENTION_SHAPES.items():
        calls = attention_calls((heads, kv_heads, length, dim), batch, step)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call, _ in calls.values():
            call()
        for _ in range(repeats):
            for name, (call, _) in calls.items():
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
        unit, scale = ("us", 1e6) if step else ("ms", 1e3)
        results[model] = {
            ATTENTION_LABELS[name]: {
                unit: round(scale * statistics.median(seconds), 1),
                "gflops": round(calls[name][1] / statistics.median(seconds) / 1e9, 1),
            }
            for name, seconds in times.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="linear,gram,factorization", help="which measurements, comma-separated")
    sections = parser.parse_args().sections.split(",")
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {flag: f" {flag} " in cpuinfo.replace("\n", " ") for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "flags": flags}
    for dtype in (torch.float32, torch.bfloat16) if "linear" in sections else ():
        result[str(dtype).removeprefix("torch.")] = {
            name: round(gflops(dtype, *shape), 1) for name, shape in SHAPES.items()
        }
    if "linear" in sections and onednn_agrees():
        result["float32_onednn"] = {
            name: round(gflops(torch.float32, *shape, onednn_linear), 1) for name, shape in SHAPES.items()
        }
    for dtype in (torch.float32, torch.bfloat16) if "gram" in sections else ():
        name = str(dtype).removeprefix("torch.")
        result[f"gram_{name}"] = {
            width: {
                "gflops": round(gram_gflops(dtype, 4096, width), 1),
                "triangle_share": triangle_shares(dtype, 4096, width),
            }
            for width in (576, 1536)
        }
    if "factorization" in sections:
        result["factorization"] = {width: factorization_timings(width) for width in (1536, 4096, 11008)}
    if "block" in sections:
        result["block_forward"] = block_forward_parts()
    if "attention" in sections:
        result["attention"] = attention_timings()
        result["attention_step"] = attention_timings(batch=1, repeats=101, step=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
