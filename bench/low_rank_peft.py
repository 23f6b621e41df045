"""A pruned model with low-rank terms, saved, then scored three ways: through PEFT in plain transformers
(``PeftModel.from_pretrained`` on the folder's ``low_rank_adapter/``), through our loader, and through our
loader from the compact form with the sparse runtime. The three perplexities should agree to float32
rounding.

    python bench/low_rank_peft.py --pattern 2:4 --rank 16 --rounds 0 --nsamples 8 --eval-windows 16 --out /tmp/lr-peft

smollm2-135m, NSAMPLES × 512 sotu:train windows (seed 0), perplexity in float32 on 512-token windows of
sotu:test; prints JSON and a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import sparsegpt
from sparsegpt import NMPattern, PruneConfig, data
from sparsegpt.formats.adapter import ADAPTER_FOLDER
from sparsegpt.perplexity import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="2:4", help="N:M, or none for 50%% unstructured")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("/tmp/low-rank-peft"))
    args = parser.parse_args()

    pattern = None if args.pattern == "none" else NMPattern.parse(args.pattern)
    config = PruneConfig(
        sparsity=0.5, pattern=pattern, nsamples=args.nsamples, low_rank=args.rank, low_rank_rounds=args.rounds
    )
    result = sparsegpt.prune("smollm2-135m", config, calibration="sotu:train")
    plain, packed = args.out / "plain", args.out / "compact"
    args.out.mkdir(parents=True, exist_ok=True)
    result.save(plain, overwrite=True)
    result.save(packed, overwrite=True, compact_format=True)
    tokenizer = result.tokenizer
    windows = data.evaluation_windows(data.tokenize(data.load_text("sotu:test"), tokenizer), 512, args.eval_windows)
    del result

    scores = {}
    base = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    scores["peft on plain transformers"] = perplexity(
        PeftModel.from_pretrained(base, plain / ADAPTER_FOLDER).eval(), windows
    )
    del base
    scores["sparsegpt.load_pretrained"] = perplexity(sparsegpt.load_pretrained(plain, dtype="float32"), windows)
    sparse = sparsegpt.load_pretrained(packed, dtype="float32", runtime="sparse")
    scores["sparsegpt.load_pretrained, compact, sparse runtime"] = perplexity(sparse, windows)
    reference = scores["peft on plain transformers"]
    rows = [{"loader": name, "ppl": ppl, "vs_peft": ppl / reference - 1} for name, ppl in scores.items()]
    print(json.dumps({"pattern": args.pattern, "rank": args.rank, "rounds": args.rounds, "rows": rows}, indent=1))
    print("| loader | sotu:test ppl | vs PEFT |\n|---|---|---|")
    for row in rows:
        print(f"| {row['loader']} | {row['ppl']:.4f} | {100 * row['vs_peft']:+.4f}% |")


if __name__ == "__main__":
    main()
