"""Peak memory of tokenizing a calibration text whole and in pieces (``data.tokenize``), and that both give
the same ids.

    python bench/tokenize_memory.py [--model qwen2.5-coder-0.5b] [--source sotu:train]

Each way runs in a fresh process that loads the tokenizer, reads the text, and reports its own peak
resident memory (VmHWM) before and after tokenizing. Prints one JSON line per way.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import hashlib, json, sys
import torch
from common import own_peak_rss_gib
from sparsegpt import assets, data
from sparsegpt.loading import load_tokenizer
model, source, way = sys.argv[1:4]
tokenizer = load_tokenizer(str(assets.model_folder(model)))
text = data.load_text(source, data.CALIBRATION)
before = own_peak_rss_gib()
if way == "whole":
    ids = torch.tensor(tokenizer(text.content, return_attention_mask=False, verbose=False)["input_ids"])
else:
    ids = data.tokenize(text, tokenizer)
digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
print(json.dumps({"way": way, "tokens": ids.numel(), "ids_sha256": digest,
                  "peak_gib_before": before, "peak_gib_after": own_peak_rss_gib()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--source", default="sotu:train")
    args = parser.parse_args()
    for way in ("whole", "pieces"):
        command = [sys.executable, "-c", CHILD, args.model, args.source, way]
        print(subprocess.run(command, check=True, capture_output=True, text=True, cwd=sys.path[0]).stdout.strip())


if __name__ == "__main__":
    main()
