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
- lcm (text-to-image): ``LatentConsistencyModelPipeline`` (SD 1.x/2.x) or ``StableDiffusionXLPipeline`` with the
  teacher's VAE, text encoder(s) and tokenizer(s) and the same LCMScheduler; both feed the UNet its guidance-scale
  embedding from ``guidance_scale``.
- lcm-lora: the UNet adapters in diffusers' LoRA format plus ``scheduler/``, for ``pipe.load_lora_weights(folder)``
  on the teacher's own pipeline.

The betas are copied from the teacher's schedule and checked against it, so the exported scheduler sees the
alpha_t the student was trained with.
"""

from __future__ import annotations

import json
import shlex
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


def text_to_image_pipeline(teacher_pipeline: Any, unet: Any, scheduler: Any) -> Any:
    """The teacher's VAE, text encoder(s) and tokenizer(s) with ``unet`` and ``scheduler``, as the diffusers pipeline
    that samples it: SDXL's own pipeline (which feeds a UNet with ``time_cond_proj_dim`` its guidance embedding and
    then skips classifier-free guidance); for SD 1.x/2.x, LatentConsistencyModelPipeline for a UNet with a guidance
    embedding and the teacher's pipeline class otherwise (a LoRA student)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionXLPipeline

    parts = {name: getattr(teacher_pipeline, name) for name in ("vae", "text_encoder", "tokenizer")}
    if isinstance(teacher_pipeline, StableDiffusionXLPipeline):
        pipeline = StableDiffusionXLPipeline(
            **parts, text_encoder_2=teacher_pipeline.text_encoder_2, tokenizer_2=teacher_pipeline.tokenizer_2,
            unet=unet, scheduler=scheduler, add_watermarker=False,
            force_zeros_for_empty_prompt=teacher_pipeline.config.force_zeros_for_empty_prompt)
    else:
        kind = LatentConsistencyModelPipeline if unet.config.time_cond_proj_dim else type(teacher_pipeline)
        # The scheduler is set after construction: StableDiffusionPipeline's constructor warns about, and rewrites,
        # the steps_offset of any scheduler but the teacher's, a setting LCMScheduler does not use.
        pipeline = kind(**parts, unet=unet, scheduler=teacher_pipeline.scheduler, safety_checker=None,
                        feature_extractor=None, requires_safety_checker=False)
        pipeline.scheduler = scheduler
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class LoraStudent:
    """An LCM-LoRA student as ``save_student`` writes it: the UNet adapters in diffusers' LoRA format (what
    ``pipe.load_lora_weights(folder)`` reads) and, under ``scheduler/``, the LCMScheduler it samples with."""

    def __init__(self, unet: Any, pipeline_class: type, scheduler: Any):
        self.unet, self.pipeline_class, self.scheduler = unet, pipeline_class, scheduler

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (with the LoRA config as metadata) and ``scheduler/``."""
        from peft.utils import get_peft_model_state_dict

        adapter = next(iter(self.unet.peft_config))
        self.pipeline_class.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(self.unet, adapter_name=adapter),
            safe_serialization=True, unet_lora_adapter_metadata=self.unet.peft_config[adapter].to_dict())
        self.scheduler.save_pretrained(Path(folder) / "scheduler")


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
    title = {"progressive": "Progressive-distillation", "consistency": "Consistency-distillation",
             "lcm": "Latent-consistency-distillation", "lcm-lora": "LCM-LoRA"}.get(method, method)
    what = (f"LoRA adapters for the UNet of `{info.get('base_model', '?')}` in diffusers' format, with the "
            f"`{info.get('scheduler', '?')}` they sample with under `scheduler/`" if method == "lcm-lora" else
            f"a plain diffusers `{pipeline}` with a `{info.get('scheduler', '?')}` set for this student")
    lines = [
        "---", "library_name: diffusers", "tags:", "- vlkd", f"- {method}-distillation", "- few-step", "---", "",
        f"# {title} student, {_plural(steps, 'step')}", "",
        f"Distilled with vlkd from the teacher `{teacher.get('path', '?')}` "
        f"({teacher.get('scheduler', '?')}, {teacher.get('prediction_type', '?')}). The folder is {what}; vlkd is "
        "not needed to use it.", "",
        "## Sample", "", "```python", *_sample_code(info), "```", "",
        f"or, with vlkd installed: `vlkd sample PATH/TO/THIS/FOLDER --steps {steps} --num 64 --out grid.png"
        + (f" --prompt {shlex.quote(_example_prompt(info))}`." if method in ("lcm", "lcm-lora") else "`."), "",
    ]
    counts = info.get("step_counts") or [steps]
    if method == "progressive":
        lines += [f"The student was trained for exactly {_plural(steps, 'DDIM step')} on the trailing grid; sample "
                  "it with `num_inference_steps` equal to that count.", ""]
    elif method in ("consistency", "lcm", "lcm-lora"):
        lines += [f"Multistep consistency sampling: any step count up to the training grid of "
                  f"{info.get('num_solver_steps', '?')} points works; it was evaluated at "
                  f"{', '.join(map(str, counts))} steps.", ""]
    guidance = info.get("guidance")
    if method == "lcm" and guidance:
        lines += [f"Classifier-free guidance is distilled in: the student was trained for `guidance_scale` from "
                  f"{guidance['w_min']:g} to {guidance['w_max']:g} (1 = none) and takes it as an input, so each "
                  "step costs one UNet evaluation whatever the scale.", ""]
    elif method == "lcm-lora" and guidance:
        lines += [f"The teacher's classifier-free guidance (scales {guidance['w_min']:g} to {guidance['w_max']:g}) "
                  "is baked into the adapters: sample with `guidance_scale=1` (no extra guidance).", ""]
    if info.get("class_conditional"):
        lines += ["The UNet is class-conditional: pass `class_labels=[...]` (one per image) to the pipeline.", ""]
    metrics = info.get("metrics") or []
    if metrics:
        # Text-to-image students sampled for the shapes test captions also carry their prompt fidelity.
        faithful = any("fidelity" in row for row in metrics)
        lines += ["## Measured", "", "| model | steps | features | FD | samples | reference | s/image |"
                  + (" prompt fidelity |" if faithful else ""), "|---|---|---|---|---|---|---|" + ("---|" * faithful)]
        for row in metrics:
            seconds = row.get("seconds_per_image")
            fidelity = f" {row['fidelity']:.3f} |" if "fidelity" in row else " - |"
            lines.append(f"| {row.get('model', '.')} | {row['steps']} | {row['features']} | {row['fd']:.3f} | "
                         f"{row['num_samples']} | {row['reference']} ({row.get('num_reference')}) | "
                         f"{'-' if seconds is None else f'{seconds:.4f}'} |" + (fidelity if faithful else ""))
        lines += ["", "FD falls as the sample count grows: compare only values measured at equal counts."
                  + (" Prompt fidelity: the fraction of images whose shape and colour, judged zero-shot by the "
                     "shapes CLIP teacher, match their caption." if faithful else ""), ""]
    training = info.get("training") or {}
    if training:
        lines += ["## Training", ""] + [f"- {key}: {_flat(value)}" for key, value in training.items()] + [""]
    return "\n".join(lines)


def _example_prompt(info: dict[str, Any]) -> str:
    """The caption the model card samples: the run's recorded training caption, else a generic one."""
    return info.get("example_prompt", "a photo of a cat")


def _sample_code(info: dict[str, Any]) -> list[str]:
    """The Python lines of the model card that load the student and sample it."""
    steps, method = info.get("steps"), info.get("method")
    generator = "generator=torch.Generator().manual_seed(0)"
    if method not in ("lcm", "lcm-lora"):
        return ["import torch", "from diffusers import DiffusionPipeline", "",
                'pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")',
                f"images = pipe(batch_size=16, num_inference_steps={steps}, {generator}).images",
                'images[0].save("sample.png")']
    call = (f"images = pipe([{json.dumps(_example_prompt(info))}] * 4, num_inference_steps={steps}, "
            f"guidance_scale={info.get('guidance_scale', 1.0)}, {generator}).images")
    if method == "lcm":
        return ["import torch", "from diffusers import DiffusionPipeline", "",
                'pipe = DiffusionPipeline.from_pretrained("PATH/TO/THIS/FOLDER")', call, 'images[0].save("sample.png")']
    return ["import torch", "from diffusers import DiffusionPipeline, LCMScheduler", "",
            f'pipe = DiffusionPipeline.from_pretrained("{info.get("base_model", "BASE/MODEL")}")',
            'pipe.load_lora_weights("PATH/TO/THIS/FOLDER")',
            "# the training grid; the same scheduler is saved under scheduler/ in this folder",
            f"pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps="
            f"{info.get('num_solver_steps')}, timestep_scaling={info.get('timestep_scaling')}, clip_sample=False)",
            call, 'images[0].save("sample.png")']


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items())
    return str(value)
