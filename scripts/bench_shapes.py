"""Measure how fast the ``shapes`` train split is drawn on one thread, including conversion to a tensor.

Prints a markdown table and writes it to ``benchmarks/shapes.md``. Run: ``python scripts/bench_shapes.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import PIL
import torch

from vlkd.data import build_dataset
from vlkd.files import atomic_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def images_per_second(size: int, count: int, repeats: int) -> float:
    """Images/s of drawing ``count`` consecutive train samples, best of ``repeats`` (least disturbed by other load)."""
    dataset = build_dataset(f"shapes:{size}", "train")
    dataset[0]  # first call pays one-off imports and caches
    best = float("inf")
    for repeat in range(repeats):
        start = time.perf_counter()
        for index in range(repeat * count, (repeat + 1) * count):
            dataset[index]
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--count", type=int, default=2000, help="images per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "shapes.md")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lines = [
        "# shapes: generation speed",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread",
        f"- Python {platform.python_version()}, Pillow {PIL.__version__}, torch {torch.__version__}",
        f"- command: `{' '.join(['python scripts/bench_shapes.py', *sys.argv[1:]])}`",
        f"- train split drawn on the fly (`dataset[i]`, PIL drawing + tensor in [-1, 1]); best of {args.repeats} x "
        f"{args.count} images",
        "",
        "| size | images/s (1 thread) | ms/image |",
        "|---:|---:|---:|",
    ]
    for size in args.sizes:
        rate = images_per_second(size, args.count, args.repeats)
        lines.append(f"| {size} | {rate:,.0f} | {1000 / rate:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with atomic_file(args.out, "w") as handle:
        handle.write(table)


if __name__ == "__main__":
    main()
