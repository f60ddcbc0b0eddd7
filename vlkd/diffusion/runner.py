"""``vlkd distill`` for the diffusion pipelines: teacher + data -> ``train.fit`` -> exported, measured student.

progressive: one ``fit`` per round (64 -> 32 -> ... -> 1 steps); the student of round r is the teacher of round
r + 1; every round is checkpointed, exported and (if asked) measured, and a resumed run skips finished rounds.
consistency: one ``fit`` of the consistency loss, then the student is measured at several step counts.
Work happens in ``<out>.run/`` (see ``workspace``); the output folder appears only when everything is done.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vlkd.diffusion.consistency import ConsistencyConfig, ConsistencyDistillation
from vlkd.diffusion.export import consistency_scheduler, progressive_scheduler, read_info, student_pipeline
from vlkd.diffusion.progressive import ProgressiveConfig, ProgressiveDistillation, round_steps
from vlkd.diffusion.teacher import Teacher, load_teacher
from vlkd.errors import RecipeError
from vlkd.files import check_output
from vlkd.recipes import PipelineSpec, Recipe, recipe_to_dict

# An epsilon student recovers x0 as (z - sigma eps) / alpha: below this alpha at the first sampling step the
# error of eps is amplified more than 20-fold, and one- or few-step samples fall apart.
MIN_EPSILON_ALPHA = 0.05


@dataclass
class StudentConfig:
    """Recipe section ``student`` of the progressive and consistency pipelines: the student starts as a copy of
    the teacher's UNet; ``prediction_type`` says what it outputs (``teacher``: the same as the teacher)."""

    prediction_type: Literal["teacher", "epsilon", "v_prediction", "sample"] = "teacher"


def student_prediction(teacher: Teacher, config: StudentConfig | None, method: str) -> str:
    """The student's prediction type, or a RecipeError naming why the method cannot use it."""
    chosen = (config or StudentConfig()).prediction_type
    kind = teacher.prediction_type if chosen == "teacher" else chosen
    whose = f"teacher {teacher.source} predicts" if chosen == "teacher" else "student.prediction_type is"
    if kind == "epsilon" and method == "progressive":
        raise RecipeError(f"{whose} epsilon, which progressive distillation cannot use (a few-step student's x "
                          "estimate divides by alpha_t ~ 0); set student.prediction_type: v_prediction")
    alpha = float(teacher.schedule.alpha[-1])
    if kind == "epsilon" and alpha < MIN_EPSILON_ALPHA:
        raise RecipeError(f"{whose} epsilon, which {method} distillation cannot use with this schedule (alpha at "
                          f"the first step is {alpha:.4f}); set student.prediction_type: v_prediction")
    return kind


def _dataset(recipe: Recipe, teacher: Any, image_size: int | None = None) -> tuple[Any, str, int | None]:
    """The training data, the FD reference spec (the same data) and its sample count (None: all of it).

    ``image_size`` is the size file datasets (csv, wds, ...) are read at; built-in ones name theirs in the spec.
    """
    from vlkd.data import build_dataset
    from vlkd.eval.sources import is_builtin_spec, parse_dataset_spec

    spec, split = parse_dataset_spec(recipe.data, "train")
    options = {"image_size": image_size} if image_size and not is_builtin_spec(spec) else {}
    dataset = build_dataset(spec, split, seed=recipe.train.seed, **options)
    teacher.check_sample(dataset[0], recipe.data)
    unlimited = bool(getattr(dataset, "unlimited", False))
    return dataset, f"{spec}@{split}", recipe.eval.num_samples if unlimited else None


def _check_features(recipe: Recipe) -> None:
    """Build each feature extractor once before training, so an unknown name fails now and not hours later."""
    if recipe.eval.enabled:
        from vlkd.eval import fid as metrics

        for name in recipe.eval.features:
            metrics.get_extractor(name)


def _versions() -> dict[str, str]:
    import diffusers
    import torch

    import vlkd

    return {"vlkd": vlkd.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def _base_info(recipe: Recipe, teacher: Any, method: str, steps: int, step_counts: list[int],
               prediction: str, pipeline: Any) -> dict[str, Any]:
    return {
        "format": "vlkd-diffusion-student/1", "method": method, "steps": steps, "step_counts": step_counts,
        "prediction_type": prediction, "pipeline": type(pipeline).__name__,
        "scheduler": type(pipeline.scheduler).__name__, "class_conditional": bool(teacher.num_classes),
        "teacher": teacher.describe(), "recipe": recipe_to_dict(recipe), "versions": _versions(),
    }


def _training(config: Any, result: Any, started: float) -> dict[str, Any]:
    """The facts of a fit for vlkd.json, with its training clock (``FitResult.clock``)."""
    return {"optimizer_steps": config.steps, "batch_size": config.batch_size, "lr": config.lr,
            "ema_decay": config.ema_decay, "seed": config.seed, "resumed": result.resumed_from > 0,
            **result.clock(started)}


def run_progressive(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Distil the teacher round by round from ``teacher_steps`` to ``student_steps``; return the output folder."""
    from vlkd.diffusion.evaluate import SampleGrids
    from vlkd.diffusion.workspace import Workspace
    from vlkd.train import fit, list_checkpoints

    started = time.time()
    out = check_output(out_dir, overwrite)
    config: ProgressiveConfig = recipe.method
    teacher = load_teacher(recipe.teacher)
    prediction = student_prediction(teacher, recipe.student, "progressive")
    if config.teacher_steps > teacher.schedule.num_train_timesteps:
        raise RecipeError(f"method.teacher_steps {config.teacher_steps} exceeds the teacher's "
                          f"{teacher.schedule.num_train_timesteps} training timesteps; use at most that many")
    rounds = round_steps(config.teacher_steps, config.student_steps)
    measured = _progressive_eval_steps(recipe, rounds)
    dataset, reference, num_reference = _dataset(recipe, teacher)
    _check_features(recipe)
    work = Workspace.open(out, recipe, resume=resume, overwrite=overwrite)
    scheduler = progressive_scheduler(teacher.schedule, prediction)

    current, current_prediction = teacher.unet, teacher.prediction_type
    for index, steps in enumerate(rounds):
        name = f"steps-{steps}"
        if work.is_done(name):
            current, current_prediction = _load_stage_unet(work.stage_dir(name)), prediction
            continue
        round_started = time.time()
        method = ProgressiveDistillation(teacher.schedule, steps, config.weighting, bool(teacher.num_classes),
                                         teacher_prediction=current_prediction, student_prediction=prediction)
        student = copy.deepcopy(current).requires_grad_(True)
        train = dataclasses.replace(recipe.train, seed=recipe.train.seed + index,  # fresh noise per round
                                    steps=config.train_steps(index, recipe.train.steps))
        run_dir = work.train_dir(name)
        resumed = bool(list_checkpoints(run_dir))
        grids = SampleGrids(work.samples, name, scheduler, [steps], every=train.checkpoint_every)
        result = fit(method, student, dataset, train, run_dir, teacher=current, resume=resumed, callbacks=[grids],
                     desc=f"progressive {2 * steps} -> {steps} steps ({index + 1}/{len(rounds)})")
        current, current_prediction = result.final_model().eval(), prediction
        pipeline = student_pipeline(current, type(scheduler).from_config(scheduler.config))
        info = _base_info(recipe, teacher, "progressive", steps, [steps], prediction, pipeline)
        info["teacher"]["steps"] = config.teacher_steps
        info["round"] = {"index": index + 1, "rounds": len(rounds), "teacher_steps": 2 * steps}
        info["training"] = _training(train, result, round_started)
        work.export_stage(name, pipeline, info, eval_steps=[steps] if steps in measured else [],
                          eval_config=recipe.eval, reference=reference, num_reference=num_reference)

    names = [f"steps-{steps}" for steps in rounds]
    kept = names[:-1] if config.eval_every_round else []  # earlier rounds' students, under rounds/
    extra = {"rounds": {name: f"rounds/{name}" for name in kept},
             "training": {name: read_info(work.stage_dir(name)).get("training") for name in names},
             "wall_minutes_this_process": round((time.time() - started) / 60, 2)}
    return work.assemble(names[-1], kept, extra, overwrite)


def _progressive_eval_steps(recipe: Recipe, rounds: list[int]) -> set[int]:
    """The rounds whose students are measured: eval.steps (each must be a round), else every round; only the
    final one unless method.eval_every_round."""
    if not recipe.eval.enabled:
        return set()
    wrong = [steps for steps in recipe.eval.steps if steps not in rounds]
    if wrong:
        raise RecipeError(f"eval.steps {wrong[0]}: a progressive run from {recipe.method.teacher_steps} steps has "
                          f"students at {', '.join(map(str, rounds))} steps only; evaluate some of those")
    measured = set(recipe.eval.steps or rounds)
    return measured if recipe.method.eval_every_round else measured & {rounds[-1]}


def _load_stage_unet(folder: Path) -> Any:
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder / "unet").eval()


def consistency_step_counts(recipe: Recipe, num_train_timesteps: int) -> tuple[list[int], list[int]]:
    """(step counts the consistency student is meant for, those measured), or a RecipeError when the solver grid
    or a step count does not fit the teacher."""
    config: ConsistencyConfig = recipe.method
    if config.num_solver_steps > num_train_timesteps:
        raise RecipeError(f"method.num_solver_steps {config.num_solver_steps} exceeds the teacher's "
                          f"{num_train_timesteps} training timesteps; use at most that many")
    step_counts = config.step_counts  # what it is meant for
    measured = sorted(set(recipe.eval.steps or step_counts)) if recipe.eval.enabled else []
    too_many = [steps for steps in step_counts + measured if not 1 <= steps <= config.num_solver_steps]
    if too_many:
        raise RecipeError(f"{too_many[0]} sampling steps: a consistency student samples in 1 to num_solver_steps "
                          f"({config.num_solver_steps}) steps")
    return step_counts, measured


def run_consistency(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Consistency-distil the teacher; return the output folder."""
    from vlkd.diffusion.evaluate import SampleGrids
    from vlkd.diffusion.workspace import Workspace
    from vlkd.train import fit, list_checkpoints

    started = time.time()
    out = check_output(out_dir, overwrite)
    config: ConsistencyConfig = recipe.method
    teacher = load_teacher(recipe.teacher)
    prediction = student_prediction(teacher, recipe.student, "consistency")
    step_counts, measured = consistency_step_counts(recipe, teacher.schedule.num_train_timesteps)
    dataset, reference, num_reference = _dataset(recipe, teacher)
    _check_features(recipe)
    work = Workspace.open(out, recipe, resume=resume, overwrite=overwrite)
    scheduler = consistency_scheduler(teacher.schedule, prediction, config.num_solver_steps, config.timestep_scaling)

    name = "student"
    if not work.is_done(name):
        student = copy.deepcopy(teacher.unet).requires_grad_(True)
        method = ConsistencyDistillation(teacher.schedule, student, config, bool(teacher.num_classes),
                                         student_prediction=prediction)
        run_dir = work.train_dir(name)
        resumed = bool(list_checkpoints(run_dir))
        grids = SampleGrids(work.samples, name, scheduler, step_counts, every=recipe.train.checkpoint_every)
        result = fit(method, student, dataset, recipe.train, run_dir, teacher=teacher.unet, resume=resumed,
                     callbacks=[grids], desc="consistency distillation")
        final = result.final_model().eval()
        pipeline = student_pipeline(final, type(scheduler).from_config(scheduler.config))
        # The default step count is the largest it was trained to serve: multistep sampling refines the result.
        info = _base_info(recipe, teacher, "consistency", max(step_counts), step_counts, prediction, pipeline)
        info.update(num_solver_steps=config.num_solver_steps, timestep_scaling=config.timestep_scaling,
                    training=_training(recipe.train, result, started))
        work.export_stage(name, pipeline, info, eval_steps=measured, eval_config=recipe.eval, reference=reference,
                          num_reference=num_reference)
    extra = {"wall_minutes_this_process": round((time.time() - started) / 60, 2)}
    return work.assemble(name, [], extra, overwrite)


PROGRESSIVE = PipelineSpec("progressive", ProgressiveConfig, StudentConfig, run_progressive)
CONSISTENCY = PipelineSpec("consistency", ConsistencyConfig, StudentConfig, run_consistency)

__all__ = ["CONSISTENCY", "PROGRESSIVE", "StudentConfig", "run_consistency", "run_progressive", "student_prediction"]
