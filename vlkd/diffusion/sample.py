"""``vlkd sample FOLDER``: sample an exported diffusers pipeline into a PNG grid, loading it with diffusers alone."""

from __future__ import annotations

import argparse
import inspect
import math
from pathlib import Path
from typing import Any

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
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json); pass an exported "
                             "student folder")
    from diffusers.utils import logging as diffusers_logging

    # A "Loading pipeline components" bar for a two-component folder is noise around vlkd's own output.
    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipeline = DiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load the diffusers pipeline in {folder}: {reason}") from None
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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
    images = sample_images(pipeline, args.num, steps, seed=args.seed, prompts=args.prompt,
                           guidance_scale=args.guidance_scale)
    save_grid(images, args.out)
    print(f"wrote {args.out}: {args.num} images, {steps if steps is not None else 'default'} steps, seed {args.seed}")
    return 0
