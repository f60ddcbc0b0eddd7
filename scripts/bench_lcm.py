"""Peak memory of LCM against LCM-LoRA training on the same teacher and batch.

Prints a markdown table and writes it (atomically) to benchmarks/lcm.md.

    python scripts/bench_lcm.py                                # the shipped recipes and t2i-shapes teacher
    python scripts/bench_lcm.py --teacher FOLDER --steps 3 --batch-size 4 --out /tmp/lcm.md   # another teacher

Each configuration is ``vlkd distill`` of its recipe (``pipelines/lcm-shapes.yaml``, ``pipelines/lcm-lora-shapes.yaml``)
for ``--steps`` optimizer steps at ``--batch-size`` (default: the recipe's), evaluation off, in a process of its own;
its peak resident memory is the kernel's high-water mark of that process's memory after ``exec`` (``VmHWM`` of
``/proc/self/status``, read as the process exits; ``ru_maxrss`` would also count the parent's pages that the forked
child held before ``exec``, so a large parent such as pytest would set every figure). A third
process only imports what ``vlkd distill`` imports: its peak is the runtime's share (Python, torch, diffusers,
transformers, peft), which is not training memory. "Training memory" is a run's peak minus that, i.e. teacher,
student, target, optimizer state, gradients, activations and the cached encoder rows of the pool: what GPU
allocators report as allocated memory, where the runtime is not counted either.

The recipes cache the pool's VAE posteriors and text states (``method.cache``). An unmeasured process fills that
cache first (one optimizer step of the LCM recipe), so both measured runs read the same rows: the run that filled
it would otherwise also hold the encoders' batches and the rows being assembled, and look worse for it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlkd.files import atomic_file

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "lcm.md"
RECIPES = {"lcm": REPO / "pipelines" / "lcm-shapes.yaml", "lcm-lora": REPO / "pipelines" / "lcm-lora-shapes.yaml"}
# What `vlkd distill` of an LCM recipe imports before it loads anything.
RUNTIME_IMPORTS = ("torch,diffusers,transformers,peft,accelerate,vlkd.cli,vlkd.train,vlkd.diffusion.lcm_runner,"
                   "vlkd.diffusion.text_teacher,vlkd.data")
LIMIT = 0.6  # the bar: LoRA's training memory at most 60% of full LCM's


# Run in the measured process: at exit, write its own peak resident memory (kB) to the file named in the environment;
# then either run the module named next (`-m MODULE ARGS...`) or only import the modules listed (`--imports A,B`).
_REPORT_PEAK = """
import atexit, importlib, os, re, runpy, sys
def report():
    status = open('/proc/self/status').read()
    open(os.environ['VLKD_PEAK_FILE'], 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status)[1])
atexit.register(report)
if sys.argv[1] == '--imports':
    for name in sys.argv[2].split(','):
        importlib.import_module(name)
else:
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


def peak_rss_mib(arguments: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``python -m MODULE ARGS...`` (``arguments = ["-m", MODULE, *ARGS]``) or only import modules
    (``["--imports", "A,B"]``) to completion; its peak resident memory in MiB and its wall seconds."""
    # stderr goes to a file, not a pipe: nobody reads a pipe while the child runs, so a run whose progress bars
    # filled the pipe's 64 KiB buffer would block on its next write and never exit.
    with tempfile.TemporaryFile() as stderr, tempfile.TemporaryDirectory() as folder:
        peak_file = Path(folder) / "peak"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _REPORT_PEAK, *arguments], cwd=REPO,
                              env={**env, "VLKD_PEAK_FILE": str(peak_file)}, stdout=subprocess.DEVNULL, stderr=stderr)
        seconds = time.perf_counter() - started
        if done.returncode != 0 or not peak_file.is_file():
            stderr.seek(0)
            error = stderr.read().decode(errors="replace").strip().splitlines()
            raise SystemExit(f"python {' '.join(arguments)} failed: {error[-1] if error else 'no message'}")
        return int(peak_file.read_text()) / 1024, seconds


def distill_command(name: str, out: Path, overrides: list[str]) -> list[str]:
    """``vlkd distill`` of the named recipe into ``out`` with ``--set`` overrides."""
    command = ["-m", "vlkd", "distill", str(RECIPES[name]), "--out", str(out)]
    return command + [part for value in overrides for part in ("--set", value)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="teacher folder (default: each recipe's own)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, help="batch size of each run (default: each recipe's own)")
    parser.add_argument("--pool-size", type=int, help="training pool, cached (default: each recipe's own)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runtime, _ = peak_rss_mib(["--imports", RUNTIME_IMPORTS], env)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        common = [f"method.cache_dir={Path(work) / 'cache'}", "eval.enabled=false"]
        common += [f"teacher={args.teacher}"] if args.teacher else []
        common += [f"method.pool_size={args.pool_size}"] if args.pool_size else []
        # The cache key holds neither the pipeline nor the batch size: this one step fills it for both runs.
        peak_rss_mib(distill_command("lcm", Path(work) / "fill-cache",
                                     [*common, "train.steps=1", "train.checkpoint_every=1"]), env)
        for name in RECIPES:
            overrides = [*common, f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}"]
            overrides += [f"train.batch_size={args.batch_size}"] if args.batch_size else []
            peak, seconds = peak_rss_mib(distill_command(name, Path(work) / name, overrides), env)
            rows[name] = {"peak": peak, "training": peak - runtime, "seconds": seconds}
            print(f"{name}: peak {peak:,.0f} MiB, {seconds:.0f} s", flush=True)

    if rows["lcm"]["training"] <= 0:
        raise SystemExit(f"the LCM run peaked at {rows['lcm']['peak']:,.0f} MiB, no more than the runtime alone "
                         f"({runtime:,.0f} MiB): nothing to compare; use a larger teacher or batch")
    ratio = rows["lcm-lora"]["training"] / rows["lcm"]["training"]
    teacher = args.teacher or "each recipe's teacher"
    batch = f"batch {args.batch_size}" if args.batch_size else "each recipe's batch size"
    pool = f"a pool of {args.pool_size:,}" if args.pool_size else "each recipe's pool"
    command_line = sys.argv[1:] if argv is None else argv
    lines = [
        "# LCM against LCM-LoRA: training memory",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `{' '.join(['python scripts/bench_lcm.py', *command_line])}`",
        (f"- teacher: {teacher}; {args.steps} optimizer steps at {batch}, {pool} read from a cache filled "
         "beforehand by another process, evaluation off"),
        f"- runtime alone (imports, nothing loaded): {runtime:,.0f} MiB peak",
        "",
        "| pipeline | peak resident MiB | training MiB (peak - runtime) | wall s (load, steps, export) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['peak']:,.0f} | {row['training']:,.0f} | {row['seconds']:.0f} |")
    lines += ["", f"- LCM-LoRA training memory is {ratio:.2f} of full LCM's (bar: at most {LIMIT:g}): "
                  f"**{'yes' if ratio <= LIMIT else 'no'}**"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
