"""A GGUF model converted tensor by tensor, then pruned streamed: peak resident memory of each step against
the model's size in bf16.

    python bench/gguf_stream.py [--model qwen2.5-coder-1.5b] [--nsamples 32] [--work /tmp/gguf-stream]

In fresh processes (peak memory from the kernel, interpreter and libraries included):

1. ``convert``: the alias's GGUF file into a transformers folder (``sparsegpt.gguf.convert_gguf``);
2. ``prune --stream``: SparseGPT 50% of that folder, one block at a time, calibration activations offloaded
   to files (``--offload-dir``), ``--nsamples`` windows of 512 tokens of sotu:train; its ``--dry-run`` plan
   is printed first.

Prints one JSON line per step: seconds, peak bytes, and that peak as a share of the bf16 size (2 bytes per
parameter of the converted folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import run_with_peak_rss

CONVERT = """
import sys
from pathlib import Path
from sparsegpt import assets, gguf
gguf.convert_gguf(assets.alias_gguf(sys.argv[1]), Path(sys.argv[2]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-stream"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    folder = args.work / "converted"
    started = time.perf_counter()
    _, peak = run_with_peak_rss([sys.executable, "-c", CONVERT, args.model, str(folder)])
    seconds = time.perf_counter() - started
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    bf16_bytes = index["metadata"]["total_size"] // 2  # float32 on disk
    step = {"step": "convert", "seconds": seconds, "peak_bytes": peak, "bf16_bytes": bf16_bytes}
    print(json.dumps({**step, "share_of_bf16": peak / bf16_bytes}), flush=True)
    prune = [sys.executable, "-m", "sparsegpt", "-q", "prune", str(folder), "-o", str(args.work / "pruned")]
    prune += ["--stream", "--offload-dir", str(args.work / "offload"), "--nsamples", str(args.nsamples)]
    prune += ["--seqlen", "512", "--calib", "sotu:train"]
    plan, _ = run_with_peak_rss([*prune, "--dry-run"])
    print(plan, flush=True)
    started = time.perf_counter()
    _, peak = run_with_peak_rss(prune)
    seconds = time.perf_counter() - started
    step = {"step": "prune --stream", "nsamples": args.nsamples, "seconds": seconds, "peak_bytes": peak}
    print(json.dumps({**step, "bf16_bytes": bf16_bytes, "share_of_bf16": peak / bf16_bytes}), flush=True)


if __name__ == "__main__":
    main()
