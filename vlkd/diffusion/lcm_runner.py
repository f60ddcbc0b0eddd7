"""``vlkd distill`` for the latent consistency pipelines: ``lcm`` (a full student UNet with a guidance embedding)
and ``lcm-lora`` (LoRA adapters on the teacher's UNet), from a Stable Diffusion or SDXL teacher.

One ``fit`` of the latent consistency loss, then the student is exported (a diffusers pipeline folder, or the
adapters in diffusers' LoRA format) and, if asked, measured on the data's captions, as ``run_consistency`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vlkd.diffusion.export import (
    LoraStudent,
    consistency_scheduler,
    text_to_image_pipeline,
)
from vlkd.diffusion.lcm import (
    FrozenTextToImageTeacher,
    LatentConsistencyConfig,
    LatentConsistencyDistillation,
    LCMLoRAConfig,
    LCMStudentConfig,
    LoRAStudentConfig,
    lcm_student,
    lora_student,
)
from vlkd.diffusion.runner import (
    _base_info,
    _check_features,
    _dataset,
    _training,
    consistency_step_counts,
)
from vlkd.errors import RecipeError
from vlkd.files import check_output
from vlkd.recipes import PipelineSpec, Recipe

GRID_PROMPTS = 16  # captions sampled into the training grids


def run_lcm(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Latent-consistency-distil a text-to-image teacher into a UNet with a guidance embedding; return the folder."""
    return _run(recipe, out_dir, resume=resume, overwrite=overwrite, lora=False)


def run_lcm_lora(recipe: Recipe, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Latent-consistency-distil a text-to-image teacher into LoRA adapters on its UNet; return the folder."""
    return _run(recipe, out_dir, resume=resume, overwrite=overwrite, lora=True)


def _captions(dataset: Any, count: int) -> list[str]:
    """The captions of the first ``count`` samples (or of all of them, cycling, when there are fewer)."""
    size = min(count, len(dataset))
    return [dataset[i % size]["caption"] for i in range(count)]


def _check_fidelity(recipe: Recipe) -> str:
    """The data's shapes spec (``shapes:32``), or a RecipeError saying why ``eval.fidelity`` cannot measure it."""
    from vlkd.data.builtin_shapes import TEST_COUNT
    from vlkd.eval.sources import parse_dataset_spec

    spec, _ = parse_dataset_spec(recipe.data, "train")
    if spec.partition(":")[0] != "shapes":
        raise RecipeError(f"eval.fidelity judges images against shapes captions, but data is {recipe.data!r}; train "
                          "on shapes (data: shapes:32) or leave eval.fidelity out")
    if not recipe.eval.features:
        raise RecipeError("eval.fidelity adds its figures to the FD rows, but eval.features is empty; name one, "
                          "e.g. [inception]")
    if recipe.eval.num_samples > TEST_COUNT:
        raise RecipeError(f"eval.num_samples is {recipe.eval.num_samples}, but eval.fidelity samples one image per "
                          f"shapes test caption and there are {TEST_COUNT}; use at most {TEST_COUNT}")
    return spec


def _teacher_identity(teacher: Any) -> str:
    """A hash of the files the cached rows depend on: the VAE, text encoder(s) and tokenizer(s) of the teacher."""
    from vlkd.files import files_digest

    parts = [teacher.folder / part for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")]
    files = [path for part in parts if part.is_dir() for path in part.rglob("*") if path.is_file()]
    return files_digest(files, teacher.folder)[:20]


def _encoder_cache(recipe: Recipe, teacher: Any, frozen: FrozenTextToImageTeacher, pool: Any) -> tuple[Any, dict]:
    """The pool's VAE posteriors and text-encoder states (vlkd.cache): filled by the main process, read by all."""
    import torch

    from vlkd.cache import cache_key, pool_cache
    from vlkd.distributed import is_main_process, wait_for_everyone
    from vlkd.train import default_collate

    config: LatentConsistencyConfig = recipe.method
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key_parts = {"teacher": _teacher_identity(teacher), "data": recipe.data, "seed": recipe.train.seed,
                 "image_size": config.image_size, "pool_size": len(pool)}
    frozen.to(device)
    started = time.perf_counter()

    def fill() -> Any:
        return pool_cache(config.cache_dir, key_parts, lambda batch: frozen.cache_rows(batch, device), pool,
                          default_collate, batch_size=recipe.train.batch_size)

    cache = fill() if is_main_process() else None
    wait_for_everyone()
    cache = cache or fill()  # the other processes read what the main one wrote
    return cache, {"folder": str(Path(config.cache_dir) / cache_key(key_parts)), "rows": len(cache),
                   "seconds": round(time.perf_counter() - started, 2)}


def _run(recipe: Recipe, out_dir: str | Path, *, resume: bool, overwrite: bool, lora: bool) -> Path:
    from vlkd.clip.data import (
        CaptionPool,  # a fixed pool of captioned samples, each with its index
    )
    from vlkd.diffusion.evaluate import SampleGrids
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher
    from vlkd.diffusion.workspace import Workspace
    from vlkd.train import fit, list_checkpoints

    started = time.time()
    method_name = "lcm-lora" if lora else "lcm"
    out = check_output(out_dir, overwrite)
    if recipe.eval.fidelity:
        _check_fidelity(recipe)  # before any model loads
    config: LatentConsistencyConfig = recipe.method
    teacher = load_text_to_image_teacher(recipe.teacher)
    prediction = teacher.prediction_type  # LCMScheduler converts the student's output as the teacher's
    step_counts, measured = consistency_step_counts(recipe, teacher.schedule.num_train_timesteps)
    dataset, reference, num_reference = _dataset(recipe, teacher, config.image_size or teacher.image_size)
    _check_features(recipe)
    fidelity = None
    if measured and recipe.eval.fidelity:
        from vlkd.eval.fidelity import shapes_prompts

        # Test captions, not the train ones the student was distilled on: the judge's labels come with the test
        # split, which is also the FD reference (all 2,000 images). evaluate_pipeline samples one image each.
        fidelity = shapes_prompts(recipe.eval.num_samples)
        reference, num_reference = f"{_check_fidelity(recipe)}@test", None
    eval_prompts = _captions(dataset, recipe.eval.num_samples) if measured and fidelity is None else None
    if config.pool_size is not None or config.cache:
        dataset = CaptionPool(dataset, config.pool_size)
        dataset[0]  # data without captions fails here, before any model is built
    work = Workspace.open(out, recipe, resume=resume, overwrite=overwrite)
    scheduler = consistency_scheduler(teacher.schedule, prediction, config.num_solver_steps, config.timestep_scaling)
    guidance = config.sample_guidance_scale

    name = "student"
    if not work.is_done(name):
        if lora:
            student = lora_student(teacher.unet, recipe.student)
            frozen = FrozenTextToImageTeacher(teacher, lora_unet=student)
        else:
            student = lcm_student(teacher.unet, recipe.student)
            frozen = FrozenTextToImageTeacher(teacher)
        cache, cache_info = _encoder_cache(recipe, teacher, frozen, dataset) if config.cache else (None, None)
        method = LatentConsistencyDistillation(teacher.schedule, student, config, lora=lora, cache=cache)

        def build(unet: Any, fresh_scheduler: Any) -> Any:
            return text_to_image_pipeline(teacher.pipeline, unet, fresh_scheduler)

        run_dir = work.train_dir(name)
        resumed = bool(list_checkpoints(run_dir))
        grid_prompts = _captions(dataset, GRID_PROMPTS)
        grids = SampleGrids(work.samples, name, scheduler, step_counts, every=recipe.train.checkpoint_every,
                            build=build, prompts=grid_prompts, guidance_scale=guidance)
        result = fit(method, student, dataset, recipe.train, run_dir, teacher=frozen, resume=resumed,
                     callbacks=[grids], desc=f"{'LCM-LoRA' if lora else 'latent consistency'} distillation")
        final = result.final_model().eval()
        fresh = type(scheduler).from_config(scheduler.config)
        student_export = (LoraStudent(final, type(teacher.pipeline), fresh) if lora else
                          text_to_image_pipeline(teacher.pipeline, final, fresh))
        # The default step count is the largest it was trained to serve: multistep sampling refines the result.
        info = _base_info(recipe, teacher, method_name, max(step_counts), step_counts, prediction, student_export)
        info.update(num_solver_steps=config.num_solver_steps, timestep_scaling=config.timestep_scaling,
                    guidance_scale=guidance, guidance={"w_min": config.w_min, "w_max": config.w_max},
                    training=_training(recipe.train, result, started), cache=cache_info,
                    example_prompt=grid_prompts[0])  # the model card samples a caption of the training data
        if lora:
            info.update(pipeline=type(teacher.pipeline).__name__, base_model=teacher.source,
                        lora={"rank": recipe.student.rank, "alpha": recipe.student.alpha or recipe.student.rank,
                              "target_modules": list(recipe.student.target_modules)})
        else:
            info["time_cond_proj_dim"] = recipe.student.time_cond_proj_dim
        work.export_stage(name, student_export, info, eval_steps=measured, eval_config=recipe.eval,
                          reference=reference, num_reference=num_reference, prompts=eval_prompts,
                          guidance_scale=guidance, fidelity=fidelity)
    extra = {"wall_minutes_this_process": round((time.time() - started) / 60, 2)}
    return work.assemble(name, [], extra, overwrite)


LCM = PipelineSpec("lcm", LatentConsistencyConfig, LCMStudentConfig, run_lcm, text_to_image=True)
LCM_LORA = PipelineSpec("lcm-lora", LCMLoRAConfig, LoRAStudentConfig, run_lcm_lora, text_to_image=True)

__all__ = ["LCM", "LCM_LORA", "run_lcm", "run_lcm_lora"]
