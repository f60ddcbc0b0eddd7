"""Peak memory of LCM against LCM-LoRA training on the same teacher and batch.

Prints a markdown table and writes it (atomically) to benchmarks/lcm.md.

    python scripts/bench_lcm.py                                # both cases below
    python scripts/bench_lcm.py --teacher FOLDER --steps 3 --batch-size 4 --out /tmp/lcm.md   # another teacher

By default it measures two teachers. (1) The shipped t2i-shapes teacher at the recipes' batch of 64: its UNet has
3.1M parameters (12.5 MB), so activations dominate and LoRA, whose adapters add activations of their own, saves
nothing. (2) A teacher with Stable Diffusion 1.5's UNet and text-encoder architecture (the configs of
``runwayml/stable-diffusion-v1-5``, the UNet at half its channel widths so that full LCM's six copies of it fit in this
machine's memory: 220M parameters) with random weights, on the shipped teacher's VAE and tokenizer, at batch 8: there,
as on any SD-sized model, the student, its gradients, Adam's two moments and the EMA target dominate, and LoRA keeps
only the frozen UNet and the adapters. Random weights do not change memory.

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

from vlkd.bench import script_command
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
        done = subprocess.run([sys.executable, "-c", _REPORT_PEAK, *arguments], check=False, cwd=REPO,
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


def save_sd15_architecture_teacher(folder: Path, width: float = 0.5) -> tuple[Path, int]:
    """A StableDiffusionPipeline folder with SD 1.5's UNet (channel widths scaled by ``width``) and text encoder
    architectures, random weights, and the shipped t2i-shapes teacher's VAE (32x32 images, 16x16x4 latents),
    tokenizer and scheduler; and its UNet's parameter count."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shipped = REPO / "assets" / "teachers" / "t2i-shapes"
    vae = AutoencoderKL.from_pretrained(shipped / "vae")
    torch.manual_seed(0)
    # runwayml/stable-diffusion-v1-5 unet/config.json, except the widths and sample_size (the shipped VAE's latents).
    unet = UNet2DConditionModel(
        sample_size=vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1), in_channels=4,
        out_channels=4, layers_per_block=2,
        block_out_channels=tuple(int(c * width) for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
    tokenizer = CLIPTokenizer.from_pretrained(shipped / "tokenizer")
    # Its text_encoder/config.json (CLIP ViT-L/14's text tower); the special tokens are the shipped tokenizer's.
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler.from_pretrained(shipped / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder, sum(parameter.numel() for parameter in unet.parameters())


def measure(teacher: Path | None, steps: int, batch_size: int | None, pool_size: int | None, work: Path,
            env: dict[str, str], runtime: float) -> dict[str, dict[str, float]]:
    """Peak and training memory (MiB) and wall seconds of each recipe's run on one teacher, same batch and pool."""
    common = [f"method.cache_dir={work / 'cache'}", "eval.enabled=false"]
    common += [f"teacher={teacher}"] if teacher else []
    common += [f"method.pool_size={pool_size}"] if pool_size else []
    # The cache key holds neither the pipeline nor the batch size: this one step fills it for both runs.
    peak_rss_mib(distill_command("lcm", work / "fill-cache", [*common, "train.steps=1", "train.checkpoint_every=1"]),
                 env)
    rows = {}
    for name in RECIPES:
        overrides = [*common, f"train.steps={steps}", f"train.checkpoint_every={steps}"]
        overrides += [f"train.batch_size={batch_size}"] if batch_size else []
        peak, seconds = peak_rss_mib(distill_command(name, work / name, overrides), env)
        rows[name] = {"peak": peak, "training": peak - runtime, "seconds": seconds}
        print(f"{name}: peak {peak:,.0f} MiB, {seconds:.0f} s", flush=True)
    if rows["lcm"]["training"] <= 0:
        raise SystemExit(f"the LCM run peaked at {rows['lcm']['peak']:,.0f} MiB, no more than the runtime alone "
                         f"({runtime:,.0f} MiB): nothing to compare; use a larger teacher or batch")
    return rows


def table(title: str, rows: dict[str, dict[str, float]], setting: str) -> list[str]:
    """One case's markdown section: the rows and the ratio against the bar."""
    ratio = rows["lcm-lora"]["training"] / rows["lcm"]["training"]
    lines = [f"## {title}", "", f"- {setting}", "",
             "| pipeline | peak resident MiB | training MiB (peak - runtime) | wall s (load, steps, export) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['peak']:,.0f} | {row['training']:,.0f} | {row['seconds']:.0f} |"
              for name, row in rows.items()]
    return lines + ["", (f"- LCM-LoRA training memory is {ratio:.2f} of full LCM's (bar: at most {LIMIT:g}): "
                        f"**{'yes' if ratio <= LIMIT else 'no'}**"), ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="measure this teacher folder only (default: the two cases)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, help="batch size of each run (default: each recipe's own)")
    parser.add_argument("--pool-size", type=int, help="training pool, cached (default: each recipe's own)")
    parser.add_argument("--sd-steps", type=int, default=3, help="optimizer steps per run, SD-1.5-architecture case")
    parser.add_argument("--sd-batch-size", type=int, default=8, help="batch size, SD-1.5-architecture case")
    parser.add_argument("--sd-width", type=float, default=0.5, help="UNet channel widths, a fraction of SD 1.5's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runtime, _ = peak_rss_mib(["--imports", RUNTIME_IMPORTS], env)
    batch = f"batch {args.batch_size}" if args.batch_size else "each recipe's batch size"
    pool = f"a pool of {args.pool_size:,}" if args.pool_size else "each recipe's pool"
    read = "read from a cache filled beforehand by another process, evaluation off"
    sections = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        rows = measure(args.teacher, args.steps, args.batch_size, args.pool_size, work / "first", env, runtime)
        name = args.teacher or "the shipped t2i-shapes teacher"
        sections += table(f"Teacher: {name}", rows, f"{args.steps} optimizer steps at {batch}, {pool} {read}")
        if args.teacher is None:
            sd_pool = 32 * args.sd_batch_size
            teacher, parameters = save_sd15_architecture_teacher(work / "sd15-architecture", args.sd_width)
            rows = measure(teacher, args.sd_steps, args.sd_batch_size, sd_pool, work / "sd", env, runtime)
            sections += table(f"Teacher: Stable Diffusion 1.5 architecture, {args.sd_width:g}x its widths "
                              f"({parameters / 1e6:.0f}M-parameter UNet, random weights)", rows,
                              f"{args.sd_steps} optimizer steps at batch {args.sd_batch_size}, a pool of {sd_pool:,} "
                              f"{read}")

    lines = [
        "# LCM against LCM-LoRA: training memory",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `{script_command('bench_lcm.py', argv)}`",
        f"- runtime alone (imports, nothing loaded): {runtime:,.0f} MiB peak",
        "",
        *sections,
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out, "w") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
