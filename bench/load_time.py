"""Load time of a compact folder against its plain twin, alternating, medians of ``--repeats`` runs each.

    python bench/load_time.py PLAIN COMPACT [--repeats 9]

Both are loaded with ``sparsegpt.load_pretrained`` in their stored dtype, in this process, after the
allocator tuning that the CLI applies.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import sparsegpt
from sparsegpt.runtime import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plain", type=Path)
    parser.add_argument("compact", type=Path)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    keep_freed_memory()
    times: dict[str, list[float]] = {"plain": [], "compact": []}
    for _ in range(args.repeats):
        for kind in times:
            started = time.perf_counter()
            sparsegpt.load_pretrained(getattr(args, kind))
            times[kind].append(time.perf_counter() - started)
    plain, compact = (statistics.median(times[kind]) for kind in ("plain", "compact"))
    print(json.dumps({"plain_seconds": plain, "compact_seconds": compact, "ratio": compact / plain}))


if __name__ == "__main__":
    main()
