"""A model bigger than we would like to hold: prune and evaluate it streamed, and measure peak memory.

    python bench/streaming.py [--root /tmp/sparsegpt-synthetic] [--check-in-memory]

Writes a synthetic Llama (random fp32 weights, default 32 blocks of hidden 2560 and MLP width 4096:
7.4 GB of safetensors, one shard per block) unless it is there already, then in fresh processes:
SparseGPT 50% streamed over random calibration tokens, and the streamed perplexity of the output. Each
child's peak resident memory comes from the kernel (``common.run_with_peak_rss``), so it includes the
interpreter, torch and transformers. ``--check-in-memory`` also loads the whole output and scores the same
windows the usual way (needs memory for the whole model). Prints one JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import run_with_peak_rss

VOCAB = 1024


def make_model(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """The synthetic checkpoint, written one block at a time; returns the bytes of its weight files."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "model.safetensors.index.json").is_file():
        return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    heads = hidden // 128
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        dtype="float32",
    )
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    total = layers + 1
    weight_map = {}

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    for index in range(layers):
        prefix = f"model.layers.{index}"
        tensors = {
            f"{prefix}.input_layernorm.weight": torch.ones(hidden),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{prefix}.mlp.down_proj.weight": normal(hidden, intermediate, std=intermediate**-0.5),
        }
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{name}.weight"] = normal(hidden, hidden, std=hidden**-0.5)
        for name in ("gate_proj", "up_proj"):
            tensors[f"{prefix}.mlp.{name}.weight"] = normal(intermediate, hidden, std=hidden**-0.5)
        shard = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    tensors = {
        "model.embed_tokens.weight": normal(VOCAB, hidden, std=hidden**-0.5),
        "model.norm.weight": torch.ones(hidden),
    }
    save_file(tensors, str(folder / shard))
    weight_map.update(dict.fromkeys(tensors, shard))
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return size


def windows(count: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def child(args: argparse.Namespace) -> None:
    """One measured step, in its own process; prints one JSON line."""
    from sparsegpt import PruneConfig
    from sparsegpt.host import return_freed_memory
    from sparsegpt.streaming import driver as streamed

    return_freed_memory()  # what the command line does for streamed runs
    started = time.perf_counter()
    if args.child == "prune":
        config = PruneConfig(sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen, batch_size=4)
        calibration = windows(args.nsamples, args.seqlen, seed=1)
        run = streamed.prune_streamed(args.model, args.out, config, calibration, overwrite=True, progress=True)
        result = {"sparsity": run.report["sparsity"], "layers": len(run.layers)}
    elif args.child == "eval":
        scored = windows(args.eval_windows, args.seqlen, seed=2)
        result = {"ppl": streamed.perplexity_streamed(args.out, scored, progress=True)}
    else:
        from sparsegpt import load_pretrained
        from sparsegpt.perplexity import perplexity

        scored = windows(args.eval_windows, args.seqlen, seed=2)
        result = {"ppl": perplexity(load_pretrained(args.out), scored, progress=True)}
    print(json.dumps(result | {"seconds": time.perf_counter() - started}))


def measured(args: argparse.Namespace, step: str) -> dict:
    command = [sys.executable, __file__, "--child", step, "--root", str(args.root)]
    command += [
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--eval-windows",
        str(args.eval_windows),
    ]
    output, peak = run_with_peak_rss(command)  # this parent holds torch and no model: the peak is the child's
    return json.loads(output.strip().splitlines()[-1]) | {"peak_rss_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/sparsegpt-synthetic"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--check-in-memory", action="store_true")
    parser.add_argument("--child", choices=["prune", "eval", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model, args.out = args.root / "model", args.root / "pruned"
    if args.child:
        child(args)
        return
    size = make_model(args.model, args.layers, args.hidden, args.intermediate)
    print(json.dumps({"model_bytes": size, "model_gib": size / 2**30}), flush=True)
    for step in ["prune", "eval"] + (["memory"] if args.check_in_memory else []):
        row = measured(args, step)
        row["peak_share_of_model"] = row["peak_rss_bytes"] / size
        print(json.dumps({"step": step} | row), flush=True)


if __name__ == "__main__":
    main()
