"""The ``clip-distill`` pipeline: a CLIP teacher -> a small open_clip student, trained with weighted CLIP losses,
saved for open_clip (and transformers), measured (zero-shot top-1, image-encoding latency) into ``vlkd.json``.

Run folder: ``<out>.run/`` beside the output (vlkd.runs) holds ``fit``'s checkpoints until the output is complete,
then goes.
The teacher-embedding cache lives under ``method.cache_dir`` (shared across runs: same key, same numbers).
"""

from __future__ import annotations

import inspect
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlkd.clip.models import ClipStudentConfig
from vlkd.errors import RecipeError
from vlkd.recipes import PipelineSpec, Recipe, recipe_to_dict

LATENCY_BATCH = 64  # the measure: image encoding at batch 64, on the CPU
SHAPES_TASKS = ("shape", "color", "shape_color")
_FILE_SOURCES = ("csv", "imagefolder", "hf", "wds")


@dataclass
class ClipDistillConfig:
    """The ``method`` section: losses and their weights, text-tower mode, weight inheritance, teacher cache."""

    # name -> weight, or name -> {weight: ..., other hyperparameters}; names from vlkd.clip.losses.LOSSES
    losses: dict[str, Any] = field(default_factory=lambda: {"fd": 2000.0})
    text_mode: Literal["train", "locked", "shared-tokenizer"] = "shared-tokenizer"
    inherit: bool = False  # initialise the student from the teacher (vlkd.clip.inherit)
    cache: bool = True  # teacher embeddings computed once into safetensors shards (vlkd.clip.cache)
    cache_dir: str = "runs/cache/clip-teacher"
    pool_size: int | None = None  # samples drawn once from an unlimited train split (shapes); others use all
    reduce_captions: bool = False  # shapes only: half the captions cut to a few attributes (vlkd.clip.data)
    data_image_size: int | None = None  # image_size for file datasets (csv, imagefolder, hf, wds); default: teacher's

    def __post_init__(self) -> None:
        if not self.losses:
            raise ValueError("method.losses is empty; name at least one loss, e.g. {fd: 2000}")
        for name, value in self.losses.items():
            if not isinstance(value, (int, float, dict)) or isinstance(value, bool):
                raise ValueError(f"method.losses.{name} must be a weight or a mapping of hyperparameters")
        if self.pool_size is not None and self.pool_size < 1:
            raise ValueError(f"method.pool_size must be positive, got {self.pool_size}")


def build_losses(spec: dict[str, Any]) -> list:
    """Loss instances from ``{name: weight}`` / ``{name: {weight, ...}}``."""
    from vlkd.clip.losses import LOSSES, build_loss

    losses = []
    for name, value in spec.items():
        options = dict(value) if isinstance(value, dict) else {"weight": float(value)}
        try:
            losses.append(build_loss(name, **options))
        except TypeError:
            accepted = list(inspect.signature(LOSSES[name]).parameters)
            unknown = ", ".join(sorted(set(options) - set(accepted))) or "?"
            raise RecipeError(f"method.losses.{name}: unknown option(s) {unknown}; it takes: {', '.join(accepted)}"
                              ) from None
    return losses


def _train_data(recipe: Recipe, teacher: Any) -> Any:
    from vlkd.data import build_dataset

    options = {}
    if recipe.data.partition(":")[0] in _FILE_SOURCES:
        options["image_size"] = recipe.method.data_image_size or int(teacher.preprocess_cfg["size"][0])
    return build_dataset(recipe.data, "train", seed=recipe.train.seed, **options)


def _zero_shot_specs(recipe: Recipe) -> list[str]:
    if recipe.eval.zero_shot:
        return list(recipe.eval.zero_shot)
    if recipe.data.startswith("shapes"):
        return [f"{recipe.data}:{task}" for task in SHAPES_TASKS]
    return []


def _zero_shot(clip: Any, specs: list[str], recipe: Recipe) -> dict:
    from vlkd.eval.zeroshot import zero_shot

    results = {}
    for spec in specs:
        result = zero_shot(clip, spec, num=recipe.eval.num_samples, batch_size=recipe.eval.batch_size)
        results[spec] = {k: result[k] for k in ("top1", "top5", "mean_per_class_recall", "num_images")}
    return results


def evaluate(folder: Path, teacher: Any, recipe: Recipe) -> dict:
    """Zero-shot accuracy of the exported student and of the teacher; image-encoding latency of both on the CPU."""
    from vlkd.eval.speed import image_encoder_latency
    from vlkd.eval.zeroshot import load_clip

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = load_clip(f"local-dir:{folder}", device=device)
    teacher.to(device)
    specs = _zero_shot_specs(recipe)
    metrics: dict[str, Any] = {"zero_shot": _zero_shot(student, specs, recipe),
                               "teacher_zero_shot": _zero_shot(teacher.adapter, specs, recipe)}
    student.model.cpu()
    teacher.cpu()
    student_latency = image_encoder_latency(student, batch_size=LATENCY_BATCH)
    teacher_latency = image_encoder_latency(teacher.adapter, batch_size=LATENCY_BATCH)
    metrics["image_encoding_latency"] = {
        "student": student_latency, "teacher": teacher_latency,
        "speedup": teacher_latency["median_s"] / student_latency["median_s"],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    return metrics


def run(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Distil, export, measure; returns the output folder."""
    from vlkd.clip.cache import cache_key, teacher_cache
    from vlkd.clip.data import CaptionPool, ClipCollate
    from vlkd.clip.export import write_student
    from vlkd.clip.inherit import inherit_weights
    from vlkd.clip.losses import ClipLossMethod
    from vlkd.clip.models import build_student, image_tower_parameters, load_teacher
    from vlkd.files import check_output, staged_folder, write_json
    from vlkd.runs import open_run_folder
    from vlkd.train import fit, get_accelerator, list_checkpoints, seed_everything

    out = check_output(out_dir, overwrite)
    method = recipe.method
    accelerator = get_accelerator(recipe.train.mixed_precision)

    teacher = load_teacher(recipe.teacher)
    pool = CaptionPool(_train_data(recipe, teacher), method.pool_size, reduce_captions=method.reduce_captions)
    pool[0]  # a dataset without captions fails here, before any model is built
    seed_everything(recipe.train.seed)  # new heads and layers start the same on every process and every rerun
    student = build_student(recipe.student, teacher, method.text_mode)
    inherited = inherit_weights(student, teacher) if method.inherit else None
    teacher_tokenizer = None if student.tokenizer is teacher.tokenizer else teacher.tokenizer
    collate = ClipCollate(student.tokenizer, teacher_tokenizer)
    losses = build_losses(method.losses)
    run_dir = open_run_folder(out, recipe, resume=resume, overwrite=overwrite)  # once the inputs are known good

    cache, cache_info = None, None
    if method.cache:
        key_parts = {"teacher": teacher.identity, "data": recipe.data, "split": "train", "seed": recipe.train.seed,
                     "preprocess": teacher.preprocess_cfg, "tokenizer": teacher.tokenizer.identity,
                     "reduce_captions": method.reduce_captions, "pool_size": len(pool)}
        started = time.perf_counter()
        if accelerator.is_main_process:
            cache = teacher_cache(method.cache_dir, key_parts, teacher, pool, collate,
                                  batch_size=recipe.train.batch_size, device=accelerator.device)
        accelerator.wait_for_everyone()
        if cache is None:
            cache = teacher_cache(method.cache_dir, key_parts, teacher, pool, collate,
                                  batch_size=recipe.train.batch_size, device=accelerator.device)
        cache_info = {"folder": str(Path(method.cache_dir) / cache_key(key_parts)), "rows": len(cache),
                      "seconds": round(time.perf_counter() - started, 2)}

    result = fit(ClipLossMethod(losses, cache=cache, shared_text=method.text_mode == "locked"), student, pool,
                 recipe.train, run_dir / "train", teacher=None if cache is not None else teacher,
                 resume=bool(list_checkpoints(run_dir / "train")),  # a run killed before its first one starts over
                 collate_fn=collate, desc="clip distill")
    final = result.final_model().eval()
    if not accelerator.is_main_process:
        return out

    with staged_folder(out, overwrite=overwrite) as folder:
        written = write_student(folder, final)
        metrics = evaluate(folder, teacher, recipe) if recipe.eval.enabled else {}
        teacher_image = image_tower_parameters(teacher)
        student_image = image_tower_parameters(final)
        write_json(folder / "vlkd.json", {
            "pipeline": "clip-distill",
            "recipe": recipe_to_dict(recipe),
            "teacher": {"spec": recipe.teacher, "family": teacher.family, "identity": teacher.identity,
                        "embed_dim": teacher.embed_dim, "image_tower_parameters": teacher_image},
            "student": {"model_cfg": final.model_cfg, "text_mode": method.text_mode,
                        "image_tower_parameters": student_image,
                        "image_tower_fraction_of_teacher": student_image / teacher_image,
                        "parameters": sum(p.numel() for p in final.clip.parameters())},
            "steps": result.steps,
            "losses": {"first": result.history[0] if result.history else None,
                       "last": result.history[-1] if result.history else None},
            # All legs of a resumed run (None when an earlier leg did not record its time).
            "training_seconds": result.seconds, "resumed_at_step": result.resumed_from or None,
            "inherit": None if inherited is None else {**inherited, "left_out": inherited["left_out"][:20]},
            "cache": cache_info,
            "export": written,
            "metrics": metrics,
            "versions": _versions(),
        })
        history = run_dir / "train" / "history.jsonl"
        if history.is_file():  # every step's loss terms, as the diffusion pipelines keep them
            (folder / "training").mkdir()
            shutil.copy2(history, folder / "training" / "history.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def _versions() -> dict[str, str]:
    import open_clip
    import transformers

    import vlkd

    return {"vlkd": vlkd.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


CLIP_DISTILL = PipelineSpec("clip-distill", ClipDistillConfig, ClipStudentConfig, run)
