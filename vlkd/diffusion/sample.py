"""``vlkd sample FOLDER``: sample an exported diffusers pipeline into a PNG grid, loading it with diffusers alone."""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vlkd.errors import ModelLoadError, VlkdError
from vlkd.files import atomic_file

MIN_TILE = 64  # small images (8x8, 16x16 digits) are enlarged to at least this many pixels per side


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (NCHW tensor or NHWC array, floats in [0, 1]) as one PNG grid, atomically."""
    from torchvision.utils import save_image

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    images = images.detach().float().cpu().clamp(0, 1)
    scale = max(1, math.ceil(MIN_TILE / max(images.shape[-2:])))
    if scale > 1:  # nearest, so each pixel stays a visible square
        images = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    path = Path(path)
    with atomic_file(path) as handle:
        save_image(images, handle, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2, pad_value=1.0,
                   format="png")
    return path


def load_pipeline(folder: str | Path) -> Any:
    """``DiffusionPipeline.from_pretrained(folder)`` with a one-line ModelLoadError when it cannot be loaded."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        from vlkd.diffusion.export import read_info

        if _lora_info(folder, read_info) is not None:
            return load_lora_student(folder)
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass an exported "
                             "student folder")
    try:
        with loading_quietly():
            pipeline = DiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load the diffusers pipeline in {folder}: {reason}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextmanager
def loading_quietly() -> Iterator[None]:
    """No diffusers or transformers loading bars inside the block: for a few small components they are noise
    around vlkd's own output (and would break its one-line errors)."""
    from diffusers.utils import logging as diffusers_logging

    modules = [diffusers_logging]
    if "transformers" in sys.modules:  # only pipelines with transformers parts import it
        from transformers.utils import logging as transformers_logging

        modules.append(transformers_logging)
    shown = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_shown in zip(modules, shown):
            if was_shown:
                module.enable_progress_bar()


def _lora_info(folder: Path, read_info: Any) -> dict[str, Any] | None:
    """The vlkd.json of an exported LCM-LoRA folder (adapters, no pipeline), else None."""
    try:
        info = read_info(folder)
    except ValueError:
        return None
    return info if info.get("method") == "lcm-lora" and info.get("base_model") else None


def load_lora_student(folder: str | Path) -> Any:
    """An exported LCM-LoRA student as the model card loads it: its base pipeline (the teacher named in vlkd.json),
    the adapters, and the LCMScheduler saved beside them."""
    from diffusers import LCMScheduler

    from vlkd.diffusion.export import read_info
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher

    folder = Path(folder)
    info = _lora_info(folder, read_info) or {}
    pipeline = load_text_to_image_teacher(info.get("base_model", "")).pipeline
    try:
        pipeline.load_lora_weights(folder)
        pipeline.scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load the LoRA student in {folder}: {reason}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def default_guidance_scale(folder: str | Path) -> float | None:
    """The guidance scale recorded in an exported text-to-image student's ``vlkd.json`` (None otherwise)."""
    from vlkd.diffusion.export import read_info

    try:
        scale = read_info(folder).get("guidance_scale")
    except ValueError:
        return None
    return float(scale) if isinstance(scale, (int, float)) else None


def default_steps(folder: str | Path) -> int | None:
    """The step count recorded in an exported student's ``vlkd.json`` (None for other folders)."""
    from vlkd.diffusion.export import read_info

    try:
        steps = read_info(folder).get("steps")
    except ValueError:
        return None
    return steps if isinstance(steps, int) else None


def sample_images(pipeline: Any, num: int, steps: int | None, seed: int = 0, prompts: list[str] | None = None,
                  guidance_scale: float | None = None) -> np.ndarray:
    """``num`` images (NHWC floats in [0, 1]) from any diffusers image pipeline; class-conditional UNets cycle
    through their labels, text-to-image pipelines through ``prompts``."""
    parameters = inspect.signature(pipeline.__call__).parameters
    kwargs: dict[str, Any] = {"output_type": "np", "generator": torch.Generator().manual_seed(seed)}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if "prompt" in parameters:
        if not prompts:
            raise VlkdError("this pipeline is text-to-image; pass --prompt TEXT (repeat it for several prompts)")
        kwargs["prompt"] = [prompts[i % len(prompts)] for i in range(num)]
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
    else:
        if prompts or guidance_scale is not None:
            raise VlkdError(f"{type(pipeline).__name__} takes no prompt; drop --prompt and --guidance-scale")
        kwargs["batch_size"] = num
        classes = getattr(getattr(pipeline, "unet", None), "config", {}).get("num_class_embeds")
        if classes and "class_labels" in parameters:
            kwargs["class_labels"] = torch.arange(num) % classes
    try:
        with torch.inference_mode():
            return np.asarray(pipeline(**kwargs).images)
    except ValueError as exc:  # diffusers' own argument checks, e.g. more steps than an LCM grid holds
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise VlkdError(f"cannot sample {num} images in {steps} steps: {reason}") from None


def run_sample_command(args: argparse.Namespace) -> int:
    """``vlkd sample FOLDER --steps K --num N --out grid.png [--seed S] [--prompt P] [--guidance-scale G]``."""
    if args.num < 1:
        raise VlkdError(f"--num must be at least 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise VlkdError(f"--steps must be at least 1, got {args.steps}")
    if not str(args.out).lower().endswith(".png"):
        raise VlkdError(f"--out {args.out}: the grid is a PNG file; name it *.png")
    pipeline = load_pipeline(args.folder)
    steps = args.steps if args.steps is not None else default_steps(args.folder)
    if torch.cuda.is_available():
        pipeline.to("cuda")
    guidance = args.guidance_scale
    if guidance is None and args.prompt:
        guidance = default_guidance_scale(args.folder)
    images = sample_images(pipeline, args.num, steps, seed=args.seed, prompts=args.prompt, guidance_scale=guidance)
    save_grid(images, args.out)
    print(f"wrote {args.out}: {args.num} images, {steps if steps is not None else 'default'} steps, seed {args.seed}")
    return 0
