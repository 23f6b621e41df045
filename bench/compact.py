"""Issue 3's figures: stored sizes of the compact format, joint sparse + quantized perplexity, load times.

smollm2-135m is pruned (and quantized) in fp32 on 128 windows of 512 tokens from sotu:train (seed 0), then
held in bf16 (``--dtype``), saved as a plain folder, packed, and unpacked again (checked bit for bit).
Sizes are those of the decoder's linear weights as stored; the whole folder's size is reported too.
Perplexity is measured on the model loaded from the compact folder (upcast to fp32, which keeps every
bf16 value) over the first ``--eval-windows`` 512-token windows of sotu:test.

    python bench/compact.py --out bench-out/compact [--configs dense,50,2:4,50+4b,3b,2:4+4b] [--eval-windows 64]

Prints one JSON line per configuration and a Markdown table; writes OUT/compact.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import sparsegpt
from sparsegpt import PruneConfig, data
from sparsegpt.api import calibration_windows, quant_specs
from sparsegpt.formats.compact import same_bits, write_quant_sidecar
from sparsegpt.host import keep_freed_memory
from sparsegpt.models import find_blocks
from sparsegpt.perplexity import perplexity
from sparsegpt.pipeline import prune_model
from sparsegpt.report import versions
from sparsegpt.solver import NMPattern

SEQLEN = 512
CONFIGS = {
    "dense": None,
    "50": PruneConfig(sparsity=0.5),
    "2:4": PruneConfig(pattern=NMPattern(2, 4)),
    "50+4b": PruneConfig(sparsity=0.5, bits=4, group_size=128),
    "3b": PruneConfig(sparsity=0.0, bits=3, group_size=128),
    "4b": PruneConfig(sparsity=0.0, bits=4, group_size=128),
    "2:4+4b": PruneConfig(pattern=NMPattern(2, 4), bits=4, group_size=128),
}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def decoder_linear_names(model: torch.nn.Module) -> set[str]:
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(weight.parameter)] for block in find_blocks(model) for weight in block.weights}


def load_seconds(folder: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sparsegpt.load_pretrained(folder)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", default="dense,50,2:4,50+4b,3b,2:4+4b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--load-repeats", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the folders written")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    held = getattr(torch, args.dtype)

    model, tokenizer, source = sparsegpt.load_model("smollm2-135m")
    linear = decoder_linear_names(model)
    dense_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calibration = calibration_windows(model, tokenizer, data.load_text("sotu:train"), PruneConfig(seqlen=SEQLEN))
    test = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), SEQLEN, args.eval_windows)
    dense_linear_bytes = sum(dense_state[name].numel() for name in linear) * held.itemsize

    rows = []
    for label in args.configs.split(","):
        config = CONFIGS[label]
        model.load_state_dict(dense_state)
        seconds = 0.0
        records = []
        if config is not None:
            config = replace(config, seqlen=SEQLEN)
            started = time.perf_counter()
            records = prune_model(model, config, calibration)
            seconds = time.perf_counter() - started
        plain, packed, back = (args.out / f"{label.replace(':', '-')}-{kind}" for kind in ("plain", "compact", "back"))
        for folder in (plain, packed, back):
            shutil.rmtree(folder, ignore_errors=True)
        model.to(held).save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        if config is not None and config.bits:
            write_quant_sidecar(plain, quant_specs(model, records, config))
        model.float()
        manifest = sparsegpt.pack_folder(plain, packed)
        sparsegpt.unpack_folder(packed, back)
        reference, restored = sparsegpt.load_pretrained(plain), sparsegpt.load_pretrained(back)
        exact = all(same_bits(value, restored.state_dict()[key]) for key, value in reference.state_dict().items())
        stored = sum(manifest["tensors"][name]["bytes"] for name in linear)
        loaded = sparsegpt.load_pretrained(packed, dtype="float32")
        row = {
            "config": label,
            "prune_seconds": round(seconds, 1),
            "linear_bytes": stored,
            "linear_ratio": stored / dense_linear_bytes,
            "folder_bytes": folder_bytes(packed),
            "plain_folder_bytes": folder_bytes(plain),
            "bit_exact_round_trip": exact,
            "ppl": perplexity(loaded, test),
        }
        if args.load_repeats:
            row["load_seconds_plain"] = load_seconds(plain, args.load_repeats)
            row["load_seconds_compact"] = load_seconds(packed, args.load_repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            for folder in (plain, packed, back):
                shutil.rmtree(folder, ignore_errors=True)

    result = {
        "model": source,
        "held_in": args.dtype,
        "dense_linear_bytes": dense_linear_bytes,
        "eval_windows": test.shape[0],
        "rows": rows,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": versions(),
    }
    (args.out / "compact.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n| config | linear bytes | × dense {args.dtype} | folder MB | ppl ({test.shape[0]} windows) | load s compact / plain |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        load = f"{row['load_seconds_compact']:.3f} / {row['load_seconds_plain']:.3f}" if args.load_repeats else "-"
        print(
            f"| {row['config']} | {row['linear_bytes']:,} | {row['linear_ratio']:.3f} | "
            f"{row['folder_bytes'] / 1e6:.1f} | {row['ppl']:.2f} | {load} |"
        )


if __name__ == "__main__":
    main()
