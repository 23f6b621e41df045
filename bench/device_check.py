"""The accelerator checks of issue 4 (and issue 6's GPU timing), in one short invocation for a lent GPU.

1. The same SparseGPT run (smollm2-135m, fp32 with fp32 forwards, CALIB × 512 sotu:train windows, seed
   0) on cpu and on cuda, 50% and 2:4: the share of identical mask entries, the largest weight
   difference, and both sotu:test perplexities (the acceptance: same masks, perplexity within 0.5%).
2. The streamed run on cuda against the in-memory cuda run (bitwise equality expected).
3. Timing on cuda: pruning smollm2-135m with 128 × 2048 windows (defaults otherwise: bf16 forwards at
   50%), and the GPU's measured matrix-multiply rates (fp32 and bf16, 8192³) to set the time against.

    python bench/device_check.py --out DIR [--calib 128] [--eval-windows 64] [--skip-cpu] [--sections compare,...]

Every section is written to DIR/device_check.json as soon as it finishes, so a failure or a timeout
keeps what came before it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sparsegpt
from sparsegpt import Evaluation, PruneConfig
from sparsegpt.report import versions
from sparsegpt.solver import NMPattern


def matmul_rate(dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """Mean TFLOP/s of a size³ matrix product on cuda, after three warm-ups."""
    left, right = (torch.randn(size, size, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        left @ right
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        left @ right
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def pruned(config: PruneConfig, device: str, evaluation: Evaluation) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune the default model on ``device``; its weights (on cpu) and a summary."""
    if device == "cuda":
        torch.cuda.synchronize()
    result = sparsegpt.prune("smollm2-135m", config, "sotu:train", [evaluation], "float32", device=device)
    state = {name: tensor.detach().cpu() for name, tensor in result.model.state_dict().items()}
    summary = {"prune_seconds": result.prune_seconds, "ppl": result.ppl, "sparsity": result.sparsity}
    return state, summary


def agreement(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How far two pruned state dicts are apart: mask entries and weights of the 2-D weights."""
    same = total = 0
    worst_layer, worst_share, largest = None, 1.0, 0.0
    for name, tensor in first.items():
        if tensor.ndim != 2 or "embed" in name or "lm_head" in name:
            continue
        other = second[name]
        equal = int(((tensor == 0) == (other == 0)).sum())
        same, total = same + equal, total + tensor.numel()
        if equal / tensor.numel() < worst_share:
            worst_layer, worst_share = name, equal / tensor.numel()
        largest = max(largest, float((tensor.double() - other.double()).abs().max()))
    return {
        "identical_mask_share": same / total,
        "worst_layer": worst_layer,
        "worst_layer_share": worst_share,
        "largest_weight_difference": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--long-seqlen", type=int, default=2048)
    parser.add_argument("--sections", default="matmul,compare,streamed,long", help="which sections to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": versions(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    evaluation = Evaluation("sotu:test", 512, args.eval_windows)

    chosen = set(args.sections.split(","))

    def section(name: str, work: Callable[[], Any]) -> None:
        if name.split("_")[0] not in chosen:
            return
        started = time.perf_counter()
        try:
            report[name] = work()
        except Exception:  # keep going: the other sections are still worth their device time
            report[name] = {"error": traceback.format_exc()}
        report.setdefault("section_seconds", {})[name] = time.perf_counter() - started
        (args.out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(name, json.dumps(report[name], default=str)[:2000], flush=True)

    section("matmul_tflops", lambda: {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)})
    cuda_states: dict[str, dict[str, torch.Tensor]] = {}
    for label, pattern in (("50%", None), ("2:4", NMPattern(2, 4))):
        config = PruneConfig(nsamples=args.calib, seqlen=512, pattern=pattern, forward_dtype="none")

        def compare(config: PruneConfig = config, label: str = label) -> dict[str, Any]:
            cuda_state, on_cuda = pruned(config, "cuda", evaluation)
            cuda_states[label] = cuda_state
            if args.skip_cpu:
                return {"cuda": on_cuda}
            cpu_state, on_cpu = pruned(config, "cpu", evaluation)
            (ppl_cpu,), (ppl_cuda,) = on_cpu["ppl"].values(), on_cuda["ppl"].values()
            return {
                "cpu": on_cpu,
                "cuda": on_cuda,
                "ppl_relative_difference": abs(ppl_cuda - ppl_cpu) / ppl_cpu,
                **agreement(cpu_state, cuda_state),
            }

        section(f"compare_{label}", compare)

    def streamed() -> dict[str, Any]:
        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "pruned"
            config = PruneConfig(nsamples=args.calib, seqlen=512, forward_dtype="none")
            started = time.perf_counter()
            run = sparsegpt.prune_streamed("smollm2-135m", out, config, "sotu:train", [evaluation], device="cuda")
            seconds = time.perf_counter() - started
            state: dict[str, torch.Tensor] = {}
            for file in sorted(out.glob("*.safetensors")):
                state.update(load_file(file))
        reference = cuda_states["50%"]
        differing = [
            name for name, tensor in state.items() if name in reference and not torch.equal(tensor, reference[name])
        ]
        return {
            "seconds": seconds,
            "ppl": run.report["ppl"],
            "tensors": len(state),
            "differing_from_in_memory": differing,
        }

    section("streamed_cuda", streamed)

    def long_windows() -> dict[str, Any]:
        config = PruneConfig(nsamples=128, seqlen=args.long_seqlen)
        result = sparsegpt.prune("smollm2-135m", config, "sotu:train", [evaluation], device="cuda")
        return {"prune_seconds": result.prune_seconds, "ppl": result.ppl, "seqlen": result.config.seqlen}

    section("long_128x2048", long_windows)


if __name__ == "__main__":
    main()
