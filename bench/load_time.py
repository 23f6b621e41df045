"""Load time of a compact folder against its plain twin, alternating, medians of ``--repeats`` runs each.

    python bench/load_time.py PLAIN COMPACT [--repeats 9]
    python bench/load_time.py --build DIR [--repeats 9]
    python bench/load_time.py PLAIN COMPACT --per-tensor NAME [--repeats 30]   # ns per weight, per decoder

``--build DIR`` first makes the four pairs that docs/RESULTS.md ("Compact size and load time") times, from
the default model in bf16 (no calibration): every decoder linear weight 50% magnitude-pruned per row
(DIR/sparse), the same with the kept weights rounded to a 4-bit asymmetric grid in groups of 128
(DIR/quant), and both again with 2:4 magnitude masks (DIR/2-4, DIR/2-4+quant); each as a plain folder and
its compact twin. Decoding time depends on the layout, not on the values.

Both are loaded with ``sparsegpt.load_pretrained`` in their stored dtype, in this process, after the
allocator tuning that the CLI applies. ``--no-native`` and ``--portable`` time the fallbacks.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

import sparsegpt
from sparsegpt.assets import model_folder
from sparsegpt.formats import compact as compact_format
from sparsegpt.formats.compact import QuantSpec, write_quant_sidecar
from sparsegpt.host import keep_freed_memory
from sparsegpt.loading import load_pretrained
from sparsegpt.models import find_blocks
from sparsegpt.solver.masks import lowest_k_per_row, n_of_m
from sparsegpt.solver.quant import QuantGrid, dequantize, fit_grid, group_views, quantize


def build(root: Path) -> list[tuple[Path, Path]]:
    """The (plain, compact) pairs described above, under ``root``."""
    grid = QuantGrid(4, 128)
    pairs = []
    for kind in ("sparse", "quant", "2:4", "2:4+quant"):
        model = load_pretrained(model_folder("smollm2-135m"), dtype="bfloat16")
        specs = {}
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        for block in find_blocks(model):
            for weight in block.weights:
                matrix = weight.matrix().float()
                if kind.startswith("2:4"):
                    matrix[n_of_m(matrix.abs(), 2, 4)] = 0.0
                else:
                    matrix[lowest_k_per_row(matrix.abs(), 0.5)] = 0.0
                if kind.endswith("quant"):
                    kept = matrix != 0
                    groups = grid.groups(matrix.shape[1])
                    scales, zeros = torch.empty(matrix.shape[0], groups), torch.empty(matrix.shape[0], groups)
                    for view, which in group_views(matrix, grid.group(matrix.shape[1])):
                        for k in range(view.shape[1]):
                            scale, zero = fit_grid(view[:, k], grid)
                            codes = quantize(view[:, k], scale[:, None], zero[:, None], grid.max_code)
                            view[:, k] = dequantize(codes, scale[:, None], zero[:, None])
                            scales[:, which.start + k], zeros[:, which.start + k] = scale, zero
                    matrix = matrix.to(torch.bfloat16).float() * kept  # pruned weights stay exactly zero
                    specs[names[id(weight.parameter)]] = QuantSpec(
                        grid, scales.half(), zeros.to(torch.uint8), weight.transposed
                    )
                weight.write(matrix)
        plain, compact = root / kind.replace(":", "-") / "plain", root / kind.replace(":", "-") / "compact"
        model.save_pretrained(plain)
        write_quant_sidecar(plain, specs)
        sparsegpt.pack_folder(plain, compact, overwrite=True)
        pairs.append((plain, compact))
    return pairs


def per_tensor(folder: Path, name: str, repeats: int) -> None:
    """Median time per weight to decode one tensor from its (already read) parts, by each decoder."""
    torch.set_num_threads(1)
    manifest = compact_format.read_manifest(folder)
    entries = compact_format.manifest_entries(folder, manifest)
    entry, read = next((entry, read) for key, entry, read in entries if key == name)
    parts = {key: read(key) for key in entry["crc32"]}
    out = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    row = {"tensor": name, "encoding": entry["encoding"], "quantized": "quant" in entry}
    for decoder, options in {"vector": {}, "portable": {"vector": False}, "python": {"native": False}}.items():
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            compact_format.decode_tensor(name, entry, parts.__getitem__, out=out, **options)
            seconds.append(time.perf_counter() - started)
        row[f"{decoder}_ns_per_weight"] = round(statistics.median(seconds) / out.numel() * 1e9, 3)
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plain", type=Path, nargs="?")
    parser.add_argument("compact", type=Path, nargs="?")
    parser.add_argument("--build", type=Path, metavar="DIR", help="make the four pairs under DIR, then time them")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--no-native", action="store_true", help="decode with the numpy/torch reader, as without a C compiler"
    )
    parser.add_argument(
        "--portable", action="store_true", help="native kernel without its AVX-512 loops, as on other processors"
    )
    parser.add_argument(
        "--per-tensor",
        metavar="NAME",
        help="instead: decode this tensor of COMPACT with each decoder on one thread (ns per weight)",
    )
    args = parser.parse_args()
    if args.per_tensor:
        if not args.compact:
            parser.error("--per-tensor needs PLAIN and COMPACT")
        per_tensor(args.compact, args.per_tensor, args.repeats)
        return
    if args.portable:
        compact_format.decode_tensor = functools.partial(compact_format.decode_tensor, vector=False)
    if args.no_native:
        compact_format._kernel = lambda: None  # what decode_tensor consults
    if args.build:
        pairs = build(args.build)
    elif args.plain and args.compact:
        pairs = [(args.plain, args.compact)]
    else:
        parser.error("give PLAIN and COMPACT, or --build DIR")
    keep_freed_memory()
    for plain_folder, compact_folder in pairs:
        times: dict[Path, list[float]] = {plain_folder: [], compact_folder: []}
        for _ in range(args.repeats):
            for folder in times:
                started = time.perf_counter()
                sparsegpt.load_pretrained(folder)
                times[folder].append(time.perf_counter() - started)
        plain, compact = (statistics.median(times[folder]) for folder in (plain_folder, compact_folder))
        row = {"compact": str(compact_folder), "plain_seconds": round(plain, 3), "compact_seconds": round(compact, 3)}
        row["native_decoding"] = compact_format.native_decoding()
        print(json.dumps(row | {"ratio": round(compact / plain, 2)}))


if __name__ == "__main__":
    main()
