"""Issue 6 experiment: fp32-accurate calibration forwards from bf16 products ("split bf16")?

Each float32 linear ``x·Wᵀ`` is computed as ``xh·Whᵀ + xh·Wlᵀ + xl·Whᵀ``, where ``xh = bf16(x)`` and
``xl = bf16(x − xh)`` (likewise for W): three bf16 products summed in float32 by MKL's
``cblas_gemm_bf16bf16f32`` (the routine ``sparsegpt.solver.gram`` uses), about 16 significant bits instead
of bf16's 8 (a block's output is about 1e-5 from float64 against float32's 1e-6 and bf16's 1e-2).
Everything else (attention, norms, Hessians from the float32 inputs) stays float32. The question is
whether that makes a 2:4 run, whose default forwards are float32, fast enough to matter.

    python bench/split_bf16_forwards.py [--seed 0] [--errors-only]

First the precision of each way on real inputs (8 windows of the calibration sample): one block's output
(block 3) from float32, split-bf16 and bf16 (autocast) forwards, relative to float64; and Gram matrices
XᵀX of block 5's q_proj and down_proj inputs (32 windows, dense model) summed from float32 inputs, from
split inputs (hiᵀhi + hiᵀlo + loᵀhi) and from bf16 inputs, relative to float64. Then (unless
``--errors-only``) prunes smollm2-135m (128 × 512 windows of sotu:train, 2:4) twice in this process,
float32 forwards and split-bf16 linears, and prints each run's pruning time and sotu:test perplexity
(64 windows). All as JSON lines. Needs the MKL routine (torch's CPU build on x86).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import sparsegpt
from sparsegpt import PruneConfig, data, pipeline
from sparsegpt.api import calibration_windows
from sparsegpt.evaluate import perplexity
from sparsegpt.models import find_blocks
from sparsegpt.solver import NMPattern
from sparsegpt.solver.gram import _NO_TRANSPOSE, _ROW_MAJOR, _TRANSPOSE, _routine, add_gram, add_product, mirror_gram


def split(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in bf16 with hi + lo ≈ ``tensor`` to about 16 significant bits."""
    high = tensor.to(torch.bfloat16)
    return high, torch.sub(tensor, high).to(torch.bfloat16)


class SplitBF16Linears(TorchFunctionMode):
    """Float32 ``F.linear`` calls computed from three bf16 products (weights split once per pass; an
    input read by several layers, q/k/v or gate/up, split once)."""

    def __init__(self) -> None:
        super().__init__()
        self.routine = _routine(torch.bfloat16)
        if self.routine is None:
            raise SystemExit("no cblas_gemm_bf16bf16f32 in torch's CPU library")
        self.weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if inputs.dtype == weight.dtype == torch.float32 and inputs.device.type == "cpu":
                return self.linear(inputs, weight, bias)
        return func(*args, **kwargs)

    def linear(self, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        key = (weight.data_ptr(), tuple(weight.shape))
        if key not in self.weights:
            self.weights[key] = split(weight.detach().contiguous())
        weight_high, weight_low = self.weights[key]
        if self.last is None or self.last[0] is not inputs:
            self.last = (inputs, split(inputs.reshape(-1, inputs.shape[-1]).contiguous()))
        high, low = self.last[1]
        (rows, inner), outputs = high.shape, weight.shape[0]
        out = torch.empty(rows, outputs)
        for left, right, beta in ((high, weight_high, 0.0), (high, weight_low, 1.0), (low, weight_high, 1.0)):
            self.routine(
                _ROW_MAJOR, _NO_TRANSPOSE, _TRANSPOSE, rows, outputs, inner, 1.0,
                left.data_ptr(), left.stride(0), right.data_ptr(), right.stride(0), beta, out.data_ptr(), outputs,
            )  # fmt: skip
        if bias is not None:
            out += bias
        return out.view(*inputs.shape[:-1], outputs)


def use_split_linears() -> None:
    """Run the pipeline's block forwards (observing and advancing) under ``SplitBF16Linears``, entered
    before the pipeline's own contexts, so that the input observer still sees each linear's input first."""
    observe, advance = pipeline.observe_block, pipeline.advance_block

    def observe_block(*args: Any, **kwargs: Any) -> Any:
        with SplitBF16Linears():
            return observe(*args, **kwargs)

    def advance_block(*args: Any, **kwargs: Any) -> Any:
        with SplitBF16Linears():
            return advance(*args, **kwargs)

    pipeline.observe_block, pipeline.advance_block = observe_block, advance_block


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def split_gram(rows: torch.Tensor) -> torch.Tensor:
    """XᵀX ≈ hiᵀhi + hiᵀlo + (hiᵀlo)ᵀ from the bf16 splits of ``rows``, summed in float32."""
    high, low = split(rows)
    gram, cross = torch.zeros(rows.shape[1], rows.shape[1]), torch.zeros(rows.shape[1], rows.shape[1])
    add_product(gram, high, high)
    add_product(cross, high, low)
    return gram.add_(cross).add_(cross.T)


def bf16_gram(rows: torch.Tensor) -> torch.Tensor:
    """XᵀX of the bf16-rounded ``rows`` as the pipeline sums it under bf16 forwards."""
    gram, edges = torch.zeros(rows.shape[1], rows.shape[1]), [0, rows.shape[1]]
    add_gram(gram, rows.to(torch.bfloat16), edges)
    return mirror_gram(gram, edges)


@torch.no_grad()
def precision_errors(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, Any]:
    """Block-output and Gram-matrix errors of the three ways against float64 (see the module's doc)."""
    blocks = find_blocks(model)
    hidden, calls = pipeline.capture_block_inputs(model, blocks, list(windows[:32].split(8)))
    block, states, call = blocks[3].module, hidden[0], calls[3][0]
    reference = call.run(copy.deepcopy(block).double(), states.double()).double()
    ways = {"float32": contextlib.nullcontext, "split-bf16": SplitBF16Linears}
    ways["bf16"] = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    outputs = {}
    for name, way in ways.items():
        with way():
            outputs[name] = relative_error(call.run(block, states), reference)
    inputs: dict[str, list[torch.Tensor]] = {"q_proj": [], "down_proj": []}
    layers = blocks[5].module
    hooks = [
        module.register_forward_pre_hook(lambda _, args, name=name: inputs[name].append(args[0].flatten(0, -2)))
        for name, module in (("q_proj", layers.self_attn.q_proj), ("down_proj", layers.mlp.down_proj))
    ]
    for index in range(5):
        pipeline.advance_block(blocks[index], hidden, calls[index])
    for states, call in zip(hidden, calls[5]):
        call.run(layers, states)
    for hook in hooks:
        hook.remove()
    grams = {}
    for name, batches in inputs.items():
        rows = torch.cat(batches)
        reference = rows.double().T @ rows.double()
        whole = torch.zeros(rows.shape[1], rows.shape[1])
        for batch in batches:
            whole.addmm_(batch.T, batch)
        grams[name] = {
            "tokens": rows.shape[0],
            "float32": relative_error(whole, reference),
            "split-bf16": relative_error(split_gram(rows), reference),
            "bf16": relative_error(bf16_gram(rows), reference),
        }
    return {"block_output_error": outputs, "gram_error": grams}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--errors-only", action="store_true", help="only the precision section")
    args = parser.parse_args()
    model, tokenizer, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
    windows = calibration_windows(
        model, tokenizer, data.load_text("sotu:train"), PruneConfig(seqlen=512, seed=args.seed)
    )
    print(json.dumps(precision_errors(model, windows)), flush=True)
    if args.errors_only:
        return
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), 512, 64)
    config = PruneConfig(nsamples=windows.shape[0], seqlen=512, pattern=NMPattern(2, 4), forward_dtype="none")
    for variant in ("fp32", "split-bf16"):
        if variant == "split-bf16":
            use_split_linears()
        model, _, _ = sparsegpt.load_model("smollm2-135m", dtype="float32")
        started = time.perf_counter()
        pipeline.prune_model(model, config, windows)
        seconds = time.perf_counter() - started
        print(
            json.dumps(
                {"variant": variant, "seed": args.seed, "prune_seconds": seconds, "ppl": perplexity(model, test)}
            )
        )


if __name__ == "__main__":
    main()
