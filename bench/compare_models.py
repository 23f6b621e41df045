"""Two pruned checkpoints of the same model, layer by layer: how far apart two implementations end.

For every 2-D weight inside the model's repeated blocks (``layers.N.``) present in both folders'
safetensors: each side's share of zeros, the share of entries whose pruned/kept state agrees, and the
relative difference ‖a − b‖ / ‖b‖. Prints one JSON line per weight and a Markdown table of the blocks
asked for (``--blocks``, default the first three, the middle and the last).

    python bench/compare_models.py OURS_FOLDER PEER_FOLDER [--blocks 0,1,2,15,29]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def block_of(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--blocks", default=None, help="comma-separated block indices for the table")
    args = parser.parse_args()
    first, second = load_folder(args.first), load_folder(args.second)
    names = [name for name in first if "layers." in name and first[name].dim() == 2 and name in second]
    names.sort(key=lambda name: (block_of(name), name))
    last = max(block_of(name) for name in names)
    shown = {int(text) for text in args.blocks.split(",")} if args.blocks else {0, 1, 2, last // 2, last}
    rows = []
    for name in names:
        a, b = first[name].float(), second[name].float()
        row = {
            "weight": name,
            "zeros_first": float((a == 0).float().mean()),
            "zeros_second": float((b == 0).float().mean()),
            "mask_agreement": float(((a == 0) == (b == 0)).float().mean()),
            "relative_difference": float((a - b).norm() / b.norm()),
        }
        print(json.dumps(row))
        if block_of(name) in shown:
            rows.append(row)
    print("\n| weight | zeros | mask agreement | relative difference |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['weight']} | {row['zeros_first']:.4f} / {row['zeros_second']:.4f} | {row['mask_agreement']:.4f} "
            f"| {row['relative_difference']:.2e} |"
        )


if __name__ == "__main__":
    main()
