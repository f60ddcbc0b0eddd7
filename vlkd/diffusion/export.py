"""Few-step students as diffusers pipeline folders that sample with diffusers alone.

- progressive: ``DDIMPipeline`` with ``DDIMScheduler(timestep_spacing="trailing")``, whose K-step grid is the one
  the student was trained on (``trailing_timesteps``), with ``set_alpha_to_one`` so the last step lands on the
  clean image as in training. diffusers' DDIM steps from t to t - T // K, which is the next grid point whenever
  K divides T (1, 2, 4, 8 of T = 1000); otherwise (16, 32, 64) it lands at most one timestep off it.
- consistency: ``ConsistencyModelPipeline`` with ``LCMScheduler(original_inference_steps=N)`` on the training
  grid; its ``step`` is the consistency function c_skip z + c_out x0 followed by re-noising to the next grid
  point, i.e. multistep consistency sampling. (diffusers' LCM pipeline is text-to-image only; the consistency
  models pipeline is its unconditional / class-conditional counterpart and calls the scheduler generically.)
- class-conditional progressive students also use ``ConsistencyModelPipeline`` (with the DDIM scheduler), the
  one diffusers pipeline that passes class labels to a UNet2DModel.

The betas are copied from the teacher's schedule and checked against it, so the exported scheduler sees the
alpha_t the student was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.errors import ModelLoadError
from vlkd.files import atomic_file, write_json

_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr")


def _betas(schedule: NoiseSchedule, scheduler_class: type) -> Any:
    """``scheduler_class`` built on the schedule's betas: its own beta settings, or explicit trained_betas for a
    beta schedule the class does not implement (e.g. ``sigmoid`` in DDIM/LCM)."""
    settings = {k: schedule.config[k] for k in _BETA_KEYS if k in schedule.config}
    try:
        scheduler = scheduler_class(**settings)
    except NotImplementedError:
        from diffusers import DDPMScheduler

        betas = DDPMScheduler.from_config(schedule.config).betas  # zero-SNR rescaling already applied
        settings = {"num_train_timesteps": schedule.num_train_timesteps, "trained_betas": betas.tolist(),
                    "rescale_betas_zero_snr": False}
        scheduler = scheduler_class(**settings)
    alphas = scheduler.alphas_cumprod.double().sqrt()
    if not torch.allclose(alphas, schedule.alpha, rtol=1e-5, atol=1e-6):
        raise ModelLoadError(f"{scheduler_class.__name__} cannot reproduce the teacher's noise schedule "
                             f"({schedule.config.get('beta_schedule')}); export is not possible")
    return settings


def progressive_scheduler(schedule: NoiseSchedule, prediction_type: str) -> Any:
    """The DDIMScheduler a progressive student samples with: trailing spacing, clean final step, no clipping."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_betas(schedule, DDIMScheduler), prediction_type=prediction_type,
                         timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0, clip_sample=False,
                         thresholding=False)


def consistency_scheduler(schedule: NoiseSchedule, prediction_type: str, num_solver_steps: int,
                          timestep_scaling: float) -> Any:
    """The LCMScheduler a consistency student samples with, on its training grid of ``num_solver_steps`` points."""
    from diffusers import LCMScheduler

    return LCMScheduler(**_betas(schedule, LCMScheduler), prediction_type=prediction_type,
                        original_inference_steps=num_solver_steps, timestep_scaling=timestep_scaling,
                        clip_sample=False, thresholding=False, steps_offset=0)


def student_pipeline(unet: Any, scheduler: Any) -> Any:
    """The diffusers pipeline object that samples ``unet`` with ``scheduler`` (see the module docstring)."""
    from diffusers import ConsistencyModelPipeline, DDIMPipeline, DDIMScheduler

    if isinstance(scheduler, DDIMScheduler) and unet.config.num_class_embeds is None:
        pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    else:
        pipeline = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_student(pipeline: Any, folder: str | Path, info: dict[str, Any] | None = None) -> None:
    """Write the pipeline (safetensors) into ``folder``, and ``vlkd.json`` and a README model card when ``info``."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    if info is not None:
        write_info(folder, info)


def write_info(folder: str | Path, info: dict[str, Any]) -> None:
    """(Re)write ``vlkd.json`` and ``README.md`` of an exported student from ``info``."""
    folder = Path(folder)
    write_json(folder / "vlkd.json", info)
    with atomic_file(folder / "README.md", "w") as handle:
        handle.write(model_card(info))


def read_info(folder: str | Path) -> dict[str, Any]:
    """The ``vlkd.json`` of an exported student ({} when absent)."""
    path = Path(folder) / "vlkd.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(info: dict[str, Any]) -> str:
    """A README.md for an exported student: what it is, how to load and sample it, and what it measured."""
    method = info.get("method", "?")
    steps = info.get("steps")
    teacher = info.get("teacher", {})
    pipeline = info.get("pipeline", "DiffusionPipeline")
    title = {"progressive": "Progressive-distillation", "consistency": "Consistency-distillation"}.get(method, method)
    lines = [
        "---", "library_name: diffusers", "tags:", "- vlkd", f"- {method}-distillation", "- few-step", "---", "",
        f"# {title} student, {_plural(steps, 'step')}", "",
        f"Distilled with vlkd from the teacher `{teacher.get('path', '?')}` "
        f"({teacher.get('scheduler', '?')}, {teacher.get('prediction_type', '?')}). The folder is a plain diffusers "
        f"`{pipeline}` with a `{info.get('scheduler', '?')}` set for this student; vlkd is not needed to use it.", "",
        "## Sample", "", "```python", "import torch", "from diffusers import DiffusionPipeline", "",
        'pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")',
        f"images = pipe(batch_size=16, num_inference_steps={steps}, "
        "generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")', "```", "",
        f"or, with vlkd installed: `vlkd sample PATH/TO/THIS/FOLDER --steps {steps} --num 64 --out grid.png`.", "",
    ]
    counts = info.get("step_counts") or [steps]
    if method == "progressive":
        lines += [f"The student was trained for exactly {_plural(steps, 'DDIM step')} on the trailing grid; sample "
                  "it with `num_inference_steps` equal to that count.", ""]
    elif method == "consistency":
        lines += [f"Multistep consistency sampling: any step count up to the training grid of "
                  f"{info.get('num_solver_steps', '?')} points works; it was evaluated at "
                  f"{', '.join(map(str, counts))} steps.", ""]
    if info.get("class_conditional"):
        lines += ["The UNet is class-conditional: pass `class_labels=[...]` (one per image) to the pipeline.", ""]
    metrics = info.get("metrics") or []
    if metrics:
        lines += ["## Measured", "", "| model | steps | features | FD | samples | reference | s/image |",
                  "|---|---|---|---|---|---|---|"]
        for row in metrics:
            seconds = row.get("seconds_per_image")
            lines.append(f"| {row.get('model', '.')} | {row['steps']} | {row['features']} | {row['fd']:.3f} | "
                         f"{row['num_samples']} | {row['reference']} ({row.get('num_reference')}) | "
                         f"{'-' if seconds is None else f'{seconds:.4f}'} |")
        lines += ["", "FD falls as the sample count grows: compare only values measured at equal counts.", ""]
    training = info.get("training") or {}
    if training:
        lines += ["## Training", ""] + [f"- {key}: {_flat(value)}" for key, value in training.items()] + [""]
    return "\n".join(lines)


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items())
    return str(value)
