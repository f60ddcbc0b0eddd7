"""CLIP distillation on shapes at an equal wall-clock budget per run: vlkd's losses, open_clip_train, the teacher.

Prints a markdown table and writes it (atomically) to benchmarks/clip.md.

    python scripts/bench_clip.py --minutes 5      # about 70 minutes on 2 free CPU cores
    python scripts/bench_clip.py --minutes 0.2 --num-test 200 --threads 1 --pool-size 512 \\
        --only teacher scratch open_clip recipe+inherit cache --out /tmp/clip-bench-smoke.md   # smoke, ~2 minutes

The recipe is ``pipelines/clip-shapes-fd.yaml``: the shipped teacher (``assets/teachers/clip-shapes``), a ViT student
of width 64 x 3 blocks (patch 4, 32x32 px) that keeps the teacher's text tower locked. Every training row trains
that student on the same pool of ``--pool-size`` shapes train images and (reduced) captions, at the recipe's
optimiser settings and batch size, on the CPU:
(a) teacher: the shipped teacher itself, zero-shot.
(b) scratch: the contrastive loss alone, no teacher outputs at all (random image tower; the locked text tower is the
    recipe's, so the student reads its captions as every row does); through ``vlkd.train.fit`` directly, because
    the pipeline always runs or caches the teacher.
(c) open_clip: open_clip's own trainer, ``python -m open_clip_train.main`` with ``--distill-model`` (contrastive +
    its DistillClipLoss KL, the teacher run every step): the pool written as PNG files and a tab-separated CSV
    (``filepath``, ``title``); the student as an open_clip ``local-dir:`` folder holding its config, the word-level
    tokenizer files and its initial weights (the same random image tower as (b), the teacher's text tower, locked
    with ``--lock-text``); the teacher as ``local-dir:`` too. Its last checkpoint is written back into an open_clip
    folder and measured like every other row.
(d) vlkd: each loss alone (fd on images, icl, affinity_kl) and the recipe's combination, each with and without
    weight inheritance, through vlkd's own pipeline (``load_recipe`` + ``get_pipeline(...).run``) with ``--set``
    overrides, the teacher cached once per pool.
Each is measured on its exported folder: zero-shot top-1 (``vlkd.eval.zeroshot.zero_shot``, the dataset's own
templates) on ``--num-test`` test images per task, image-tower parameters, and image-encoding latency at batch 64
(``vlkd.eval.speed.image_encoder_latency``). Separately, the recipe's epoch times with and without the teacher cache.

Equal budgets are a fixed number of optimizer steps per run, computed from a timing of that configuration, so every
run completes its LR schedule and is reproducible from its step count: a calibration run of ``CALIBRATION_STEPS``
steps gives seconds per step (the mean over all steps but the first and the last) and the first step's extra cost;
steps = (budget - one-off costs - first-step extra) / seconds per step. One-off costs charged to a run are what a run
on its own would pay before its steps: drawing the pool (vlkd draws shapes on the fly) and, for cached rows, the
teacher's pass over the pool that fills the cache. The cached rows share one cache on disk, each charged the pass.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlkd.files import atomic_file

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "benchmarks" / "clip.md"
RECIPE = REPO / "pipelines" / "clip-shapes-fd.yaml"
TEACHER_DIR = REPO / "assets" / "teachers" / "clip-shapes"
TASKS = ("shape", "color", "shape_color")
CALIBRATION_STEPS = 10
LATENCY_BATCH = 64
EVAL_BATCH = 500
# (d): the loss sets, as --set values (the recipe's own weights); None keeps the recipe's combination.
VLKD_LOSSES = {"fd": "{fd: {weight: 2000, text: false}}", "icl": "{icl: 1}", "affinity_kl": "{affinity_kl: 1}",
               "recipe": None}
VLKD_ROWS = [f"{losses}{'+inherit' if inherit else ''}" for losses in VLKD_LOSSES for inherit in (False, True)]
ROWS = ["teacher", "scratch", "open_clip", *VLKD_ROWS]
SECTIONS = [*ROWS, "cache"]
MARGIN_POINTS = 2.0
TEACHER_FRACTION = 0.95


def log(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench_clip] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One line of the table; None where a column does not apply or was not measured."""

    name: str
    label: str
    steps: int | None = None
    minutes: float | None = None
    top1: dict[str, float] = field(default_factory=dict)
    parameters: int | None = None
    latency_ms: float | None = None
    how: str = ""
    failure: str | None = None
    step_s: tuple[float, float] | None = None  # seconds per step: calibrated, and as the run went


@dataclass
class Calibration:
    """Seconds per step of a configuration, the first step's extra seconds, and the one-off seconds it is charged."""

    step_s: float
    first_extra_s: float
    charged_s: float

    def steps(self, budget_s: float) -> int:
        """Optimizer steps that fill ``budget_s`` (at least 1)."""
        return max(1, math.floor((budget_s - self.charged_s - self.first_extra_s) / self.step_s))


def calibration(step_seconds: list[float], charged_s: float) -> Calibration:
    """From per-step durations: the mean of the middle steps (the first pays set-up and warm-up, the last the final
    checkpoint), and what the first and last cost beyond that."""
    middle = step_seconds[1:-1] or step_seconds
    step_s = statistics.fmean(middle)
    extra = max(0.0, step_seconds[0] - step_s) + max(0.0, step_seconds[-1] - step_s)
    return Calibration(step_s, extra, charged_s)


# ------------------------------------------------------------------------------------------------ vlkd training


def recipe_for(overrides: list[str]) -> Any:
    """The shapes recipe with ``--set`` style overrides."""
    from vlkd.recipes import load_recipe

    return load_recipe(RECIPE, overrides)


def budget_overrides(steps: int, warmup_fraction: float) -> list[str]:
    """Step count and the recipe's warm-up share of it."""
    return [f"train.steps={steps}", f"train.warmup_steps={round(steps * warmup_fraction)}"]


def make_pool(recipe: Any, teacher: Any) -> tuple[Any, Any]:
    """The recipe's fixed training pool (nothing drawn yet) and the collate the runner would build for it."""
    from vlkd.clip.data import CaptionPool, ClipCollate
    from vlkd.data import build_dataset

    dataset = build_dataset(recipe.data, "train", seed=recipe.train.seed)
    pool = CaptionPool(dataset, recipe.method.pool_size, reduce_captions=recipe.method.reduce_captions)
    return pool, ClipCollate(teacher.tokenizer)  # locked text: student and teacher read the teacher's tokenizer


def cache_key_parts(recipe: Any, teacher: Any, pool: Any) -> dict:
    """What vlkd.clip.runner.run keys its teacher cache by, so the pipeline rows read the cache filled here."""
    return {"teacher": teacher.identity, "data": recipe.data, "split": "train", "seed": recipe.train.seed,
            "preprocess": teacher.preprocess_cfg, "tokenizer": teacher.tokenizer.identity,
            "reduce_captions": recipe.method.reduce_captions, "pool_size": len(pool)}


def fit_student(recipe: Any, teacher: Any, pool: Any, collate: Any, run_dir: Path, *, cache: Any = None,
                live_teacher: bool = False) -> tuple[Any, list[float]]:
    """Build the recipe's student as the runner does and train it with ``vlkd.train.fit``; teacher outputs come
    from ``cache``, from the teacher every step (``live_teacher``), or not at all. Returns the trained student and
    each step's duration in seconds (the first includes fit's set-up)."""
    from vlkd.clip.inherit import inherit_weights
    from vlkd.clip.losses import ClipLossMethod
    from vlkd.clip.models import build_student
    from vlkd.clip.runner import build_losses
    from vlkd.train import fit, seed_everything

    seed_everything(recipe.train.seed)  # the runner seeds here too: the same initial student in every row
    student = build_student(recipe.student, teacher, recipe.method.text_mode)
    if recipe.method.inherit:
        inherit_weights(student, teacher)
    method = ClipLossMethod(build_losses(recipe.method.losses), cache=cache,
                            shared_text=recipe.method.text_mode == "locked")
    ends: list[float] = []
    started = time.perf_counter()
    result = fit(method, student, pool, recipe.train, run_dir, teacher=teacher if live_teacher else None,
                 collate_fn=collate, callbacks=[lambda state: ends.append(time.perf_counter() - started)],
                 desc=run_dir.name)
    durations = [end - previous for previous, end in zip([0.0, *ends], ends)]
    return result.final_model().eval(), durations


@dataclass
class SharedPool:
    """The teacher, the drawn pool every training row uses, and the teacher cache of it."""

    teacher: Any
    pool: Any
    collate: Any
    draw_s: float
    cache: Any = None
    cache_folder: Path | None = None
    teacher_pass_s: float = 0.0


@dataclass
class Bench:
    """What every training row shares: the budget, the recipe overrides, the pool, the measurement, a work folder."""

    budget_s: float
    base: list[str]  # --set overrides common to every vlkd row
    warmup_fraction: float  # the recipe's warm-up steps / steps, kept at every step count
    shared: SharedPool
    measure: Measure
    workdir: Path
    threads: int

    def recipe(self, extra: list[str], steps: int | None = None) -> Any:
        """The recipe with the shared and ``extra`` overrides, at ``steps`` (with its warm-up) when given."""
        return recipe_for([*self.base, *extra, *(budget_overrides(steps, self.warmup_fraction) if steps else [])])


def prepare_pool(recipe: Any, workdir: Path, with_cache: bool) -> SharedPool:
    """Load the teacher, draw the pool (timed), and fill the teacher cache of it (timed, the teacher's pass only)."""
    from vlkd.clip.cache import cache_key, teacher_cache
    from vlkd.clip.models import load_teacher

    teacher = load_teacher(recipe.teacher)
    pool, collate = make_pool(recipe, teacher)
    started = time.perf_counter()
    for index in range(len(pool)):
        pool[index]  # drawn once and kept in memory (CaptionPool), as a run's first epoch would
    shared = SharedPool(teacher, pool, collate, draw_s=time.perf_counter() - started)
    log(f"pool of {len(pool)} drawn in {shared.draw_s:.1f} s")
    if with_cache:
        parts = cache_key_parts(recipe, teacher, pool)
        started = time.perf_counter()
        shared.cache = teacher_cache(workdir / "cache", parts, teacher, pool, collate,
                                     batch_size=recipe.train.batch_size)
        shared.teacher_pass_s = time.perf_counter() - started
        shared.cache_folder = workdir / "cache" / cache_key(parts)
        log(f"teacher cache filled in {shared.teacher_pass_s:.1f} s")
    return shared


def scratch_row(bench: Bench) -> Row:
    """(b): contrastive loss only, no teacher outputs, random image tower; through vlkd.train.fit."""
    from vlkd.clip.export import export_student

    shared = bench.shared
    overrides = ["method.losses={contrastive: 1}", "method.inherit=false", "method.cache=false"]
    _, durations = fit_student(bench.recipe(overrides, CALIBRATION_STEPS), shared.teacher, shared.pool,
                               shared.collate, bench.workdir / "calibrate-scratch")
    timing = calibration(durations, charged_s=shared.draw_s)  # a run on its own draws the pool first
    steps = timing.steps(bench.budget_s)
    log(f"scratch: {timing.step_s:.3f} s/step -> {steps} steps")
    student, durations = fit_student(bench.recipe(overrides, steps), shared.teacher, shared.pool, shared.collate,
                                     bench.workdir / "run-scratch")
    row = bench.measure("scratch", "(b) scratch: contrastive only, no teacher",
                        export_student(student, bench.workdir / "scratch"))
    row.steps, row.minutes = steps, (sum(durations) + shared.draw_s) / 60
    row.step_s = (timing.step_s, sum(durations) / steps)
    row.how = ("`vlkd.train.fit` with `ClipLossMethod([contrastive])`, no teacher and no cache (the pipeline would "
               "run or cache the teacher), the student built and seeded as the runner builds it, exported with "
               "`vlkd.clip.export.export_student`; " + overrides_text([*overrides, *budget_overrides(
                   steps, bench.warmup_fraction)]))
    return row


def vlkd_row(bench: Bench, name: str, budget_s: float | None = None, label: str | None = None) -> Row:
    """(d): one loss set, with or without inheritance, through the clip-distill pipeline reading the shared cache."""
    from vlkd.recipes import get_pipeline

    shared = bench.shared
    losses, _, inherit = name.partition("+")
    overrides = [f"method.inherit={'true' if inherit else 'false'}"]
    if VLKD_LOSSES[losses] is not None:
        overrides.append(f"method.losses={VLKD_LOSSES[losses]}")
    # Timed with fit directly (the pipeline's own fit call on the same cache), step by step.
    _, durations = fit_student(bench.recipe(overrides, CALIBRATION_STEPS), shared.teacher, shared.pool,
                               shared.collate, bench.workdir / f"calibrate-{name}-{label is not None}",
                               cache=shared.cache)
    # Charged: drawing the pool and the teacher's pass that fills the cache, as a run on its own would pay.
    timing = calibration(durations, charged_s=shared.draw_s + shared.teacher_pass_s)
    steps = timing.steps(budget_s or bench.budget_s)
    log(f"{name}: {timing.step_s:.3f} s/step -> {steps} steps")
    recipe = bench.recipe(overrides, steps)
    out = bench.workdir / f"{name}{'-half' if label else ''}"
    folder = get_pipeline(recipe.pipeline).run(recipe, out, overwrite=True)
    info = json.loads((folder / "vlkd.json").read_text())
    if Path(info["cache"]["folder"]).resolve() != shared.cache_folder.resolve():
        raise SystemExit(f"{name}: the pipeline keyed its teacher cache differently from this script "
                         f"({info['cache']['folder']}); update cache_key_parts to match vlkd.clip.runner")
    losses_text = {"recipe": "fd (images) + icl + affinity_kl", "fd": "fd (images)"}.get(losses, losses)
    row = bench.measure(name, label or f"(d) {losses_text}{', inherited' if inherit else ''}", folder)
    # The pipeline draws the pool during its first epoch (inside training_seconds); the cache it read was filled
    # once here, so that pass is added.
    row.steps, row.minutes = info["steps"], (info["training_seconds"] + shared.teacher_pass_s) / 60
    row.step_s = (timing.step_s, info["training_seconds"] / info["steps"])
    row.how = "`vlkd distill pipelines/clip-shapes-fd.yaml` with " + overrides_text(
        [*overrides, *budget_overrides(steps, bench.warmup_fraction)])
    return row


def overrides_text(overrides: list[str]) -> str:
    """A row's own ``--set`` overrides (the shared ones are listed once in the report)."""
    return " ".join(f"`--set {shlex.quote(item)}`" for item in overrides)


# ------------------------------------------------------------------------------------------- open_clip_train


def write_csv_dataset(pool: Any, folder: Path, rows: int) -> Path:
    """The pool as PNG files (the exact uint8 pixels vlkd trains on) and open_clip's CSV format (tab-separated
    ``filepath``, ``title``) with ``rows`` lines, cycling through the pool."""
    from torchvision.transforms.functional import to_pil_image

    images = folder / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        for index in range(len(pool)):
            pixels = pool[index]["pixel_values"].add(1.0).mul(127.5).round().to(torch.uint8)
            to_pil_image(pixels).save(images / f"{index:06d}.png")
    captions = [pool[index]["caption"] for index in range(len(pool))]
    path = folder / f"train-{rows}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for line in range(rows):
            index = line % len(pool)
            writer.writerow([str(images / f"{index:06d}.png"), captions[index]])
    return path


@dataclass
class OpenClipRun:
    """One open_clip_train process: exit status, its per-step times (from its own log), checkpoint, error."""

    returncode: int
    step_seconds: list[float]
    checkpoint: Path
    error: str
    command: list[str]


def run_open_clip_train(recipe: Any, init: Path, data: Path, logs: Path, name: str, steps: int,
                        warmup_fraction: float, threads: int) -> OpenClipRun:
    """``python -m open_clip_train.main``: distil the teacher into the ``local-dir:`` student at the recipe's optimiser
    settings, one epoch over ``data`` (which holds exactly ``steps`` batches), on the CPU, logging every step."""
    train = recipe.train
    command = [
        sys.executable, "-m", "open_clip_train.main",
        "--model", f"local-dir:{init}",
        "--distill-model", f"local-dir:{TEACHER_DIR}",
        # open_clip_train distils only when both are given; for a local-dir: model it ignores the value and loads
        # the folder's own weights.
        "--distill-pretrained", str(TEACHER_DIR / "open_clip_model.safetensors"),
        "--train-data", str(data), "--dataset-type", "csv",  # tab-separated: its default --csv-separator
        "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--batch-size", str(train.batch_size), "--epochs", "1",
        "--lr", str(train.lr), "--beta1", str(train.adam_betas[0]), "--beta2", str(train.adam_betas[1]),
        "--eps", "1e-8",  # torch's AdamW default, which vlkd's loop uses
        "--wd", str(train.weight_decay), "--warmup", str(round(steps * warmup_fraction)), "--lr-scheduler", "cosine",
        "--grad-clip-norm", str(train.max_grad_norm),
        # open_clip's CLIP.lock_text_tower accepts only freeze_layer_norm=True; the flag's default is False.
        "--lock-text", "--lock-text-freeze-layer-norm",
        # The whole 32 px image, as vlkd trains on it: RandomResizedCrop at scale 1 always falls back to the full
        # image, where the default (0.9, 1) would crop away part of a caption's "at the top left".
        "--aug-cfg", "scale=(1.0,1.0)",
        "--device", "cpu", "--precision", "fp32", "--workers", "0", "--seed", str(train.seed),
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # a failure is a row
    log_file = logs / name / "out.log"
    text = log_file.read_text() if log_file.is_file() else ""
    step_seconds = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", text)]
    error_lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [line for line in error_lines if re.search(r"Error|error:|assert", line)]
    error = (errors or error_lines or ["(no output)"])[-1].strip()
    return OpenClipRun(done.returncode, step_seconds, logs / name / "checkpoints" / "epoch_1.pt", error, command)


def open_clip_row(bench: Bench) -> Row:
    """(c): open_clip_train's distillation at the same budget; a failure is reported as the row, not a number."""
    import open_clip

    from vlkd.clip.export import save_open_clip
    from vlkd.clip.models import build_student
    from vlkd.train import seed_everything

    recipe, shared, workdir = bench.recipe([]), bench.shared, bench.workdir
    label = "(c) open_clip_train --distill-model (contrastive + KL)"
    folder = workdir / "open_clip"
    init = folder / "student-init"
    init.mkdir(parents=True)
    seed_everything(recipe.train.seed)  # the same initial student as (b) and the vlkd rows without inheritance
    student = build_student(recipe.student, shared.teacher, recipe.method.text_mode)
    save_open_clip(init, student.clip, student.model_cfg, student.preprocess_cfg, student.tokenizer)

    batch = recipe.train.batch_size
    probe = run_open_clip_train(recipe, init, write_csv_dataset(shared.pool, folder, CALIBRATION_STEPS * batch),
                                folder / "logs", "calibration", CALIBRATION_STEPS, bench.warmup_fraction,
                                bench.threads)
    if probe.returncode != 0 or len(probe.step_seconds) < 2:
        return Row("open_clip", label, how=command_text(probe.command, workdir),
                   failure=f"open_clip_train did not run (exit {probe.returncode}): {probe.error}")
    timing = calibration(probe.step_seconds, charged_s=0.0)
    steps = timing.steps(bench.budget_s)
    log(f"open_clip: {timing.step_s:.3f} s/step -> {steps} steps")
    run = run_open_clip_train(recipe, init, write_csv_dataset(shared.pool, folder, steps * batch), folder / "logs",
                              "run", steps, bench.warmup_fraction, bench.threads)
    if run.returncode != 0 or not run.checkpoint.is_file():
        return Row("open_clip", label, how=command_text(run.command, workdir),
                   failure=f"open_clip_train failed (exit {run.returncode}): {run.error}")
    model = open_clip.create_model(f"local-dir:{init}")
    open_clip.load_checkpoint(model, str(run.checkpoint))  # strict: every tensor of the student
    trained = folder / "student"
    trained.mkdir()
    save_open_clip(trained, model, student.model_cfg, student.preprocess_cfg, student.tokenizer)
    row = bench.measure("open_clip", label, trained)
    row.steps, row.minutes = len(run.step_seconds), sum(run.step_seconds) / 60
    row.step_s = (timing.step_s, sum(run.step_seconds) / len(run.step_seconds))
    row.how = (command_text(run.command, workdir) + " (`$WORK`: a temporary folder holding the student's initial "
               "`local-dir:` folder, the PNG files and the CSV), then `open_clip.load_checkpoint` of its "
               "`epoch_1.pt` into that student, saved as an open_clip folder")
    return row


def command_text(command: list[str], workdir: Path) -> str:
    """A command as markdown code, with the temporary folder and the checkout shown as short names."""
    text = shlex.join(["python", *command[1:]]).replace(str(workdir), "$WORK").replace(f"{REPO}/", "")
    return f"`{text}`"


# ------------------------------------------------------------------------------------------------- measuring


@dataclass
class Measure:
    """What every row is measured on: zero-shot tasks, test images per task, the dataset."""

    tasks: tuple[str, ...]
    num_test: int | None
    data: str

    def __call__(self, name: str, label: str, model: Path) -> Row:
        """Zero-shot top-1 per task, image-tower parameters and image-encoding latency of an open_clip folder."""
        from vlkd.clip.models import image_tower_parameters
        from vlkd.eval.speed import image_encoder_latency
        from vlkd.eval.zeroshot import load_clip, zero_shot

        clip = load_clip(str(model), device="cpu")
        top1 = {task: zero_shot(clip, f"{self.data}:{task}@test", num=self.num_test, batch_size=EVAL_BATCH)["top1"]
                for task in self.tasks}
        latency = image_encoder_latency(clip, batch_size=LATENCY_BATCH)
        log(f"{name}: top-1 " + ", ".join(f"{task} {100 * value:.1f}%" for task, value in top1.items()))
        return Row(name, label, top1=top1, parameters=image_tower_parameters(clip.model),
                   latency_ms=1000 * latency["median_s"])


def cache_epochs(base: list[str], warmup_fraction: float, teacher: Any, workdir: Path, epochs: int) -> dict:
    """Epoch times of the recipe (fd + icl + affinity_kl, inherited) over a fresh pool, with the teacher cache (the
    first epoch includes drawing the pool and filling the cache) and without it (the teacher runs every step)."""
    from vlkd.clip.cache import teacher_cache

    shipped = recipe_for(base)
    per_epoch = shipped.method.pool_size // shipped.train.batch_size  # the pool is a whole number of batches
    recipe = recipe_for([*base, *budget_overrides(epochs * per_epoch, warmup_fraction)])
    results = {}
    for cached in (True, False):
        pool, collate = make_pool(recipe, teacher)  # fresh: the first epoch draws it, as a new run's would
        fill_s, cache = 0.0, None
        if cached:
            started = time.perf_counter()
            cache = teacher_cache(workdir / "cache-timing", cache_key_parts(recipe, teacher, pool), teacher, pool,
                                  collate, batch_size=recipe.train.batch_size)
            fill_s = time.perf_counter() - started
        _, durations = fit_student(recipe, teacher, pool, collate, workdir / f"epochs-{'cached' if cached else 'live'}",
                                   cache=cache, live_teacher=not cached)
        times = [sum(durations[e * per_epoch:(e + 1) * per_epoch]) for e in range(epochs)]
        times[0] += fill_s
        results["cached" if cached else "uncached"] = {"epochs": times, "fill_s": fill_s}
        log(f"epochs {'with' if cached else 'without'} the cache: " + ", ".join(f"{t:.1f} s" for t in times))
    results["steps_per_epoch"] = per_epoch
    return results


# ---------------------------------------------------------------------------------------------------- report


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[Row], tasks: tuple[str, ...]) -> str:
    """The markdown table; '-' where a column does not apply."""
    def cell(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    header = ["configuration", "steps trained", "wall-clock minutes", *(f"top-1 {task} %" for task in tasks),
              "image-tower parameters", "image-encoding ms (batch 64)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        label = row.label if row.failure is None else f"{row.label}: **{row.failure}**"
        cells = [label, cell(row.steps, ","), cell(row.minutes, ".2f"),
                 *(cell(100 * row.top1[task] if task in row.top1 else None, ".1f") for task in tasks),
                 cell(row.parameters, ","), cell(row.latency_ms, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_vlkd_row(rows: list[Row]) -> Row | None:
    """The vlkd row (d) with the highest shape_color top-1, if any was measured."""
    scored = [row for row in rows if row.name in VLKD_ROWS and "shape_color" in row.top1]
    return max(scored, key=lambda row: row.top1["shape_color"]) if scored else None


def acceptance(rows: dict[str, Row], cache: dict | None, half: Row | None) -> list[str]:
    """The acceptance statements, each decided from the measured numbers (or 'not measured')."""
    def top1(name: str) -> float | None:
        row = rows.get(name)
        return None if row is None or "shape_color" not in row.top1 else 100 * row.top1["shape_color"]

    lines = []
    best_row = best_vlkd_row(list(rows.values()))
    best = None if best_row is None else top1(best_row.name)
    teacher, scratch, open_clip = top1("teacher"), top1("scratch"), top1("open_clip")
    if best_row is not None:
        lines.append(f"- best vlkd configuration: {best_row.label}, shape_color {best:.1f}%.")
    if best is None or teacher is None:
        lines.append("- keeps >= 95% of the teacher's shape_color top-1: not measured (needs the teacher and a vlkd row)")
    else:
        kept = best / teacher
        lines.append(f"- keeps >= 95% of the teacher's shape_color top-1: **{'yes' if kept >= TEACHER_FRACTION else 'no'}** "
                     f"({best:.1f}% / {teacher:.1f}% = {100 * kept:.1f}%)")
    for name, other, label in (("(b)", scratch, "scratch"), ("(c)", open_clip, "open_clip_train")):
        if best is None or other is None:
            failed = rows.get("open_clip" if name == "(c)" else "scratch")
            why = f" ({failed.failure})" if failed is not None and failed.failure else ""
            lines.append(f"- beats {name} {label} by >= {MARGIN_POINTS:g} points on shape_color: not measured{why}")
            continue
        margin = best - other
        verdict = "yes" if margin >= MARGIN_POINTS else "no"
        text = (f"- beats {name} {label} by >= {MARGIN_POINTS:g} points on shape_color: **{verdict}** "
                f"({best:.1f}% vs {other:.1f}%, {margin:+.1f} points)")
        if name == "(c)" and margin < MARGIN_POINTS:
            if half is not None and "shape_color" in half.top1:
                reached = 100 * half.top1["shape_color"] >= other
                text += (f"; at half the budget it {'reaches' if reached else 'does not reach'} (c)'s accuracy: "
                         f"**{'yes' if reached else 'no'}** ({100 * half.top1['shape_color']:.1f}% in "
                         f"{half.minutes:.2f} min)")
            else:
                text += "; the half-budget run was not made"
        lines.append(text)
    if cache is None:
        lines.append("- cached epochs after the first take <= half the first: not measured")
    else:
        first, later = cache["cached"]["epochs"][0], cache["cached"]["epochs"][1:]
        if not later:
            lines.append("- cached epochs after the first take <= half the first: not measured (one epoch)")
        else:
            ok = max(later) <= first / 2
            lines.append(f"- cached epochs after the first take <= half the first: **{'yes' if ok else 'no'}** "
                         f"(first {first:.1f} s, later at most {max(later):.1f} s = {100 * max(later) / first:.0f}%)")
    return lines


def row_note(row: Row) -> str:
    """A row's line under "How each row was produced"."""
    timing = "" if row.step_s is None else (f" Timing: {row.step_s[0]:.2f} s/step calibrated, {row.step_s[1]:.2f} "
                                            "s/step over the run.")
    return f"- {row.label}: {row.how}.{timing}"


def report(args: argparse.Namespace, rows: list[Row], half: Row | None, cache: dict | None, shared: SharedPool | None,
           base: list[str], loads: tuple[float, float], seconds: float, recipe: Any, workdir: Path) -> str:
    """The markdown page: header, table, how each row was made, cache timings, acceptance."""
    import open_clip
    import transformers

    command = " ".join(["python", "scripts/bench_clip.py", *map(shlex.quote, sys.argv[1:])])
    num_test = args.num_test or 2000  # the whole shapes test split
    shown = rows + ([half] if half is not None else [])
    lines = [
        "# CLIP distillation on shapes at an equal wall-clock budget (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}; 1-minute load average "
        f"{loads[0]:.1f} before the run and {loads[1]:.1f} at its end (its own threads included)",
        f"- torch {torch.__version__}, open_clip {open_clip.__version__} (open_clip_train from open_clip_torch "
        f"{importlib.metadata.version('open_clip_torch')}), transformers {transformers.__version__}, Python "
        f"{platform.python_version()}",
        f"- command: `{command}` ({seconds / 60:.1f} minutes in all)",
        f"- recipe: `pipelines/clip-shapes-fd.yaml` (teacher `local-dir:assets/teachers/clip-shapes`; student ViT "
        f"width 64 x 3 blocks, patch 4, 32x32, locked text tower); batch {recipe.train.batch_size}, lr "
        f"{recipe.train.lr:g} cosine with {100 * args.warmup_fraction:.0f}% warm-up, AdamW betas "
        f"{tuple(recipe.train.adam_betas)}, weight decay {recipe.train.weight_decay:g}, gradient clip "
        f"{recipe.train.max_grad_norm:g}; every row trains on the same pool of {recipe.method.pool_size:,} shapes "
        "train images with the recipe's reduced captions",
        f"- budget: {args.minutes:g} minutes per training row, as a fixed number of optimizer steps computed from a "
        f"{CALIBRATION_STEPS}-step timing of each configuration (seconds per step = the mean of its middle steps); "
        "steps = (budget - one-off costs - first-step extra) / seconds per step, so each run completes its LR "
        "schedule and can be rerun with the same step count. Wall-clock minutes = the training loop as measured "
        "(vlkd: `fit`; open_clip: the sum of its logged per-step `Batch (t)`) plus the charged one-off costs; model "
        "loading, process start, export and evaluation are not counted for any row",
    ]
    if shared is not None:
        fill = "" if shared.cache is None else (
            f"; the teacher's pass over the pool that fills the cache, {shared.teacher_pass_s:.1f} s, charged to every "
            "cached row (they share one cache on disk, but each pays as if it filled its own)")
        lines.append(f"- one-off costs: drawing the pool, {shared.draw_s:.1f} s, charged to (b) and the vlkd rows (the "
                     f"pipeline rows draw it inside their first epoch, so it is in their measured time){fill}; (c) "
                     "pays none: its PNG files were written before (not timed), and its teacher runs inside every step")
    lines += [
        f"- zero-shot: top-1 on the first {num_test:,} `{recipe.data}` test images per task, the dataset's own "
        f"templates (`vlkd.eval.zeroshot.zero_shot`; at {num_test:,} images a top-1 near 90% has a standard error of "
        f"{100 * math.sqrt(0.9 * 0.1 / num_test):.1f} points); image encoding: median of 10 forward passes at "
        "batch 64 on the CPU (`vlkd.eval.speed.image_encoder_latency`), every model loaded with "
        "`vlkd.eval.zeroshot.load_clip` from its exported open_clip folder",
        "",
        table(shown, tuple(args.tasks)),
        "",
        "## How each row was produced",
        "",
        *([f"Shared `--set` overrides of the vlkd rows: {overrides_text(base)}".replace(str(workdir), "$WORK")
           .replace(f"{REPO}/", ""), ""] if any(row.name in VLKD_ROWS or row.name == "scratch" for row in shown)
          else []),
        *(row_note(row) for row in shown if row.how),
        *(["- (c) trains with open_clip's own loop and attention and its AdamW (no weight decay on gains, biases "
           "and the logit scale); its contrastive term counts identical captions in a batch as negatives, where "
           "vlkd's losses count them as matches. The vlkd rows train with vlkd's attention kernels (`auto`)."]
          if any(row.name == "open_clip" for row in shown) else []),
    ]
    if cache is not None:
        cached, live = cache["cached"]["epochs"], cache["uncached"]["epochs"]
        lines += [
            "",
            "## Teacher cache: epoch times of the recipe",
            "",
            f"The recipe (fd + icl + affinity_kl, inherited) through `vlkd.train.fit` for {len(cached)} epochs of "
            f"{cache['steps_per_epoch']} steps over a freshly drawn pool of {recipe.method.pool_size:,}, timed per "
            "step. Cached: the first epoch includes drawing the pool and the teacher's pass that fills the cache "
            f"({cache['cached']['fill_s']:.1f} s); later epochs read the cache. Without the cache the teacher runs "
            "every step and the first epoch draws the pool.",
            "",
            "| method.cache | " + " | ".join(f"epoch {e + 1} s" for e in range(len(cached))) + " |",
            "|---|" + "---:|" * len(cached),
            "| true | " + " | ".join(f"{t:.1f}" for t in cached) + " |",
            "| false | " + " | ".join(f"{t:.1f}" for t in live) + " |",
        ]
    row_map = {row.name: row for row in rows}
    lines += ["", "## Acceptance", "", *acceptance(row_map, cache, half), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget per training row (default: 5)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--num-test", type=int, default=None, help="test images per task (default: all 2,000)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help=f"rows (and 'cache', the epoch timings) to run; default all: {' '.join(SECTIONS)}")
    parser.add_argument("--pool-size", type=int, default=16384,
                        help="training pool (default 16,384: the recipe's 32,768 would spend a third of a 5-minute "
                             "CPU budget on the teacher's pass that fills the cache)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (256)")
    parser.add_argument("--cache-epochs", type=int, default=3, help="epochs timed with and without the cache")
    parser.add_argument("--out", default=str(OUTPUT))
    args = parser.parse_args()
    selected = args.only or SECTIONS
    out = Path(args.out).resolve()

    torch.set_num_threads(args.threads)
    shipped = recipe_for([])
    args.warmup_fraction = shipped.train.warmup_steps / shipped.train.steps
    batch = args.batch_size or shipped.train.batch_size
    if args.pool_size < batch or args.pool_size % batch:
        parser.error(f"--pool-size must be a positive multiple of the batch size ({batch}), so that epochs are whole "
                     "steps")
    measure = Measure(tuple(args.tasks), args.num_test, shipped.data)
    started, load_start = time.perf_counter(), os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="vlkd-bench-clip-") as temporary:
        workdir = Path(temporary)
        base = [f"teacher=local-dir:{TEACHER_DIR}", f"method.pool_size={args.pool_size}",
                f"train.batch_size={batch}", f"method.cache_dir={workdir / 'cache'}", "eval.enabled=false"]
        recipe = recipe_for(base)
        rows: list[Row] = []
        if "teacher" in selected:
            rows.append(measure("teacher", "(a) teacher (shipped), zero-shot", TEACHER_DIR))
            rows[-1].how = "`assets/teachers/clip-shapes` as shipped"
        training = [name for name in ROWS[1:] if name in selected]
        shared, half = None, None
        if training:
            shared = prepare_pool(recipe, workdir, with_cache=any(name in VLKD_ROWS for name in training))
            bench = Bench(60 * args.minutes, base, args.warmup_fraction, shared, measure, workdir, args.threads)
            for name in training:
                log(f"{name}: calibrating and training ({args.minutes:g} min budget)")
                row = (scratch_row(bench) if name == "scratch" else open_clip_row(bench) if name == "open_clip"
                       else vlkd_row(bench, name))
                rows.append(row)
            best, open_clip = best_vlkd_row(rows), next((row for row in rows if row.name == "open_clip"), None)
            # "Reaches (c)'s accuracy in half the time" matters only when the best vlkd row does not beat (c) by the
            # margin; then that configuration runs again at half the budget.
            if best is not None and open_clip is not None and "shape_color" in open_clip.top1 and \
                    100 * (best.top1["shape_color"] - open_clip.top1["shape_color"]) < MARGIN_POINTS:
                log(f"{best.name}: again at half the budget")
                half = vlkd_row(bench, best.name, bench.budget_s / 2, label=f"{best.label}, half the budget")

        cache = None
        if "cache" in selected:
            if shared is not None:
                teacher = shared.teacher
            else:
                from vlkd.clip.models import load_teacher

                teacher = load_teacher(recipe.teacher)
            cache = cache_epochs(base, args.warmup_fraction, teacher, workdir, args.cache_epochs)

        text = report(args, rows, half, cache, shared, base, (load_start, os.getloadavg()[0]),
                      time.perf_counter() - started, recipe, workdir)
    with atomic_file(out, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
