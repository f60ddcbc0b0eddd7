"""``vlkd demo``: distil the shipped digits teacher with progressive and consistency distillation and the shapes
CLIP teacher into a small CLIP on a small budget, measure teachers and students with the same harness, and write
a report with tables, grids and a plot.

The runs are the shipped recipes (``pipelines/*-digits.yaml``, ``pipelines/clip-shapes-fd.yaml``) with smaller budgets given as ``--set``
overrides, so the demo exercises exactly what ``vlkd distill`` runs. Everything is written under a temporary
name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any

from vlkd.files import atomic_file, staged_folder, write_json

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
TEACHER = "assets/teachers/ddpm-digits"
REFERENCE = "digits:16@all"

# Budgets per mode: overrides of the shipped recipes, the step counts measured and the samples per measurement.
# Sized on 2 CPU cores: "quick" about 3 minutes, the default about 15. Fewer rounds than the shipped recipe, so
# every round trains train.steps (its per-round scales are for its own four rounds).
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "progressive": ["method.teacher_steps=8", "method.student_steps=4", "method.round_steps_scale=[]",
                        "train.steps=60", "train.batch_size=32", "train.warmup_steps=10",
                        "train.checkpoint_every=60"],
        "consistency": ["train.steps=80", "train.batch_size=32", "train.warmup_steps=10",
                        "train.checkpoint_every=80"],
        "clip": ["train.steps=100", "train.batch_size=128", "train.warmup_steps=10", "method.pool_size=4096",
                 "train.checkpoint_every=100", "eval.num_samples=500"],
        "steps": [4], "num_samples": 200,
    },
    "default": {
        "progressive": ["method.teacher_steps=16", "method.student_steps=4", "method.round_steps_scale=[]",
                        "train.steps=200", "train.batch_size=64", "train.warmup_steps=20",
                        "train.checkpoint_every=100"],
        "consistency": ["train.steps=300", "train.batch_size=64", "train.warmup_steps=30",
                        "train.checkpoint_every=150"],
        "clip": ["train.steps=400", "train.batch_size=256", "train.warmup_steps=40", "method.pool_size=8192",
                 "train.checkpoint_every=200"],
        "steps": [1, 2, 4], "num_samples": 500,
    },
}


def demo_recipe(name: str, budget: dict[str, Any], features: list[str]) -> tuple[Path, list[str]]:
    """The shipped recipe for ``name`` and the overrides that size it for the demo."""
    steps = budget["steps"] if name == "consistency" else [budget["steps"][-1]]
    overrides = budget[name] + [f"eval.steps={json.dumps(steps)}", f"eval.num_samples={budget['num_samples']}",
                                f"eval.features={json.dumps(features)}", "eval.batch_size=250"]
    return PIPELINES / f"{name}-digits.yaml", overrides


def teacher_ddim() -> Any:
    """The shipped digits teacher sampling with DDIM on trailing spacing (the grid the students use)."""
    from diffusers import DDPMPipeline

    from vlkd.data import assets_dir
    from vlkd.eval.frontier import ddim_scheduler, with_scheduler

    pipeline = DDPMPipeline.from_pretrained(assets_dir().parent / TEACHER)
    return with_scheduler(pipeline, ddim_scheduler(pipeline.scheduler.config, timestep_spacing="trailing"))


def teacher_rows(ddim: Any, steps: list[int], features: list[str], num: int) -> list[dict[str, Any]]:
    """The teacher at the students' step counts and at 16 steps."""
    from vlkd.eval.frontier import measure
    from vlkd.recipes import EvalConfig

    config = EvalConfig(num_samples=num, features=features, batch_size=250)
    return measure(ddim, sorted(set(steps) | {16}), config, REFERENCE, model="teacher", sampler="ddim")


def student_rows(folder: Path, name: str) -> list[dict[str, Any]]:
    """The measured rows a distillation wrote into its ``vlkd.json`` (the final student's only)."""
    info = json.loads((folder / "vlkd.json").read_text())
    return [{**row, "model": f"{name} student", "sampler": info["scheduler"]}
            for row in info["metrics"] if row["model"] == "."]


TASKS = ("shape", "color", "shape_color")


def demo_table(rows: list[dict[str, Any]], clip: dict[str, Any], unet_parameters: int) -> list[dict[str, Any]]:
    """One row per teacher and student, diffusion and CLIP alike: steps, FD per feature space, seconds per image,
    zero-shot top-1 per shapes task, parameters (the UNet, or the image tower) and image-encoding ms (None where a
    column does not apply)."""
    from vlkd.eval.frontier import by_point

    table = []
    for (model, sampler, steps), point in by_point(rows).items():
        table.append({"model": f"{model}, {sampler}", "steps": steps, "fd": point["fd"],
                      "seconds_per_image": point["seconds_per_image"], "top1": {}, "parameters": unet_parameters,
                      "image_encoding_ms": None})
    metrics = clip["metrics"]
    for who, zero_shot in (("teacher", "teacher_zero_shot"), ("student", "zero_shot")):
        top1 = {spec.rsplit(":", 1)[-1]: result["top1"] for spec, result in metrics[zero_shot].items()}
        latency = metrics["image_encoding_latency"][who]
        table.append({"model": f"CLIP {who}", "steps": None, "fd": {}, "seconds_per_image": None, "top1": top1,
                      "parameters": clip[who]["image_tower_parameters"],
                      "image_encoding_ms": 1000 * latency["median_s"]})
    return table


def table_markdown(table: list[dict[str, Any]], features: list[str]) -> str:
    """The demo table as markdown; '-' where a column does not apply."""
    def cell(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    header = ["model", "steps", *(("FID" if f == "inception" else f"FD {f}") for f in features), "s/image",
              *(f"top-1 {task} %" for task in TASKS), "parameters", "image encoding ms (batch 64)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [row["model"], cell(row["steps"], "d"), *(cell(row["fd"].get(f), ".2f") for f in features),
                 cell(row["seconds_per_image"], ".4f"),
                 *(cell(None if task not in row["top1"] else 100 * row["top1"][task], ".2f") for task in TASKS),
                 cell(row["parameters"], ","), cell(row["image_encoding_ms"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(table: str, commands: list[str], minutes: float, mode: str) -> str:
    """The markdown report: the table, what was written, how to reproduce, versions and machine."""
    import diffusers
    import torch

    import vlkd

    return "\n".join([
        f"# vlkd demo ({mode})", "",
        "The shipped digits DDPM teacher and its few-step students, and the shipped shapes CLIP teacher and its "
        "small student, all measured in this run with the same harness: Fréchet distance against all 1,797 digits "
        f"({REFERENCE}; lower is better), sampling seconds per image, zero-shot top-1 on the shapes test split, "
        "parameters (the UNet; the CLIP image tower) and image-encoding milliseconds on the CPU.", "",
        table, "",
        "Grids: `grids/`. Plot: `frontier.png`. Students: `progressive-student/` and `consistency-student/`, "
        "each a diffusers pipeline folder (`DiffusionPipeline.from_pretrained(folder)`); their README.md shows how "
        "to sample them. CLIP student: `clip-student/`, an open_clip folder "
        "(`open_clip.create_model_and_transforms(\"local-dir:clip-student\")`).", "",
        "## Reproduce", "", "```bash", *commands, "```", "",
        f"vlkd {vlkd.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"{minutes:.1f} minutes.", "",
    ])


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo and print its table; returns the exit code."""
    from vlkd.eval.frontier import frontier_plot
    from vlkd.recipes import get_pipeline, load_recipe

    mode = "quick" if args.quick else "default"
    budget = BUDGETS[mode]
    features = ["inception"] if args.inception else ["digits-classifier"]
    started = time.time()
    rows: list[dict[str, Any]] = []
    commands = []
    with staged_folder(args.out, overwrite=args.overwrite) as folder:
        for name in ("progressive", "consistency"):
            recipe_path, overrides = demo_recipe(name, budget, features)
            recipe = load_recipe(recipe_path, overrides)
            student = get_pipeline(recipe.pipeline).run(recipe, folder / f"{name}-student", overwrite=True)
            rows += student_rows(student, name)
            commands.append(f"vlkd distill {recipe_path.relative_to(PIPELINES.parent)} "
                            + " ".join(f"--set {shlex.quote(o)}" for o in overrides))
        clip_recipe = PIPELINES / "clip-shapes-fd.yaml"
        recipe = load_recipe(clip_recipe, budget["clip"])
        clip_student = get_pipeline(recipe.pipeline).run(recipe, folder / "clip-student", overwrite=True)
        clip = json.loads((clip_student / "vlkd.json").read_text())
        commands.append(f"vlkd distill {clip_recipe.relative_to(PIPELINES.parent)} "
                        + " ".join(f"--set {shlex.quote(o)}" for o in budget["clip"]))
        ddim = teacher_ddim()  # loaded once for the table and the grids
        rows = teacher_rows(ddim, budget["steps"], features, budget["num_samples"]) + rows
        frontier_plot(rows, features[0], folder / "frontier.png", title="digits: quality against sampling steps")
        _teacher_grids(ddim, folder / "grids", budget["steps"])
        for name in ("progressive", "consistency"):
            for grid in sorted((folder / f"{name}-student" / "samples").glob("*-final-*.png")):
                (folder / "grids" / f"{name}-{grid.name}").write_bytes(grid.read_bytes())
        table = demo_table(rows, clip, sum(p.numel() for p in ddim.unet.parameters()))
        text = report(table_markdown(table, features), commands, (time.time() - started) / 60, mode)
        write_json(folder / "results.json", {"mode": mode, "features": features, "table": table, "rows": rows,
                                             "clip": clip["metrics"]})
        with atomic_file(folder / "report.md", "w") as handle:
            handle.write(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


def _teacher_grids(ddim: Any, folder: Path, steps: list[int]) -> None:
    """Sample grids of the teacher at the students' step counts and at 64 steps."""
    from vlkd.diffusion.sample import sample_images, save_grid

    ddim.set_progress_bar_config(disable=True)
    for count in sorted(set(steps) | {64}):
        save_grid(sample_images(ddim, 64, count, seed=0), folder / f"teacher-ddim-{count}steps.png")
