"""Measuring a few-step student with the harness, and sample grids while it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from vlkd.diffusion.export import student_pipeline
from vlkd.diffusion.sample import sample_images, save_grid
from vlkd.recipes import EvalConfig
from vlkd.train import FitState

GRID_IMAGES = 64


def evaluate_pipeline(pipeline: Any, steps: Sequence[int], config: EvalConfig, reference: str, *,
                      num_reference: int | None = None, seed: int = 0, progress: bool = True,
                      prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                      fidelity: Any = None, judge: Any = None
                      ) -> tuple[list[dict[str, Any]], dict[int, torch.Tensor]]:
    """FD of ``pipeline`` at each step count against ``reference`` for every ``config.features``.

    Images are sampled once per step count and shared by all feature spaces (a text-to-image pipeline from
    ``prompts``, image i from prompt i, cycling). Returns one row per (steps, features) and the first
    ``GRID_IMAGES`` uint8 images per step count (for grids).

    ``fidelity``: a ``vlkd.eval.fidelity.ShapesPrompts`` whose captions are then the prompts, one image each; every
    row also gets the prompt fidelity of its step count's images (``fidelity``, ``shape_accuracy``,
    ``color_accuracy``), judged by ``judge`` (a ClipAdapter or ``load_clip`` spec; default: the shipped shapes CLIP).
    """
    from vlkd.eval import fid as metrics
    from vlkd.eval.fidelity import load_judge
    from vlkd.eval.sources import PipelineSource, TensorSource

    extractors = [metrics.get_extractor(name) for name in config.features]
    if fidelity is not None:
        prompts, judge = fidelity.captions, load_judge(judge)  # loaded once, not per step count
    rows: list[dict[str, Any]] = []
    firsts: dict[int, torch.Tensor] = {}
    for count in steps:
        source = PipelineSource(pipeline, config.num_samples, steps=count, seed=seed, prompts=prompts,
                                guidance_scale=guidance_scale, device=pipeline.device, progress=progress)
        images = torch.cat(list(source.batches(config.batch_size)))
        firsts[count] = images[:GRID_IMAGES]
        faithful = fidelity_fields(images, fidelity, judge, config.batch_size) if fidelity is not None else {}
        for extractor in extractors:
            result = metrics.fid(TensorSource(images), reference, features=extractor, num=len(images),
                                 num_b=num_reference, batch_size=config.batch_size)
            rows.append({"model": ".", "steps": count, "features": result.extractor, "fd": result.value,
                         "num_samples": result.num_a, "num_reference": result.num_b, "reference": reference,
                         "seconds_per_image": source.seconds_per_image, **faithful})
    return rows, firsts


def fidelity_fields(images: torch.Tensor, prompts: Any, judge: Any, batch_size: int) -> dict[str, float]:
    """Prompt fidelity of uint8 ``images`` (image i for caption i of the ShapesPrompts ``prompts``) as row fields."""
    from vlkd.eval.fidelity import prompt_fidelity

    result = prompt_fidelity(images, prompts, judge, batch_size=batch_size)
    return {key: result[key] for key in ("fidelity", "shape_accuracy", "color_accuracy")}


def save_uint8_grid(images: torch.Tensor, path: str | Path) -> Path:
    """A PNG grid of uint8 NCHW images."""
    return save_grid(images.float() / 255.0, path)


class SampleGrids:
    """A ``fit`` callback: every ``every`` steps and at the end, a grid of the student's samples (with its EMA
    weights when it has them, as they will be exported) at each of ``steps`` sampling steps.

    ``build(student, scheduler)`` makes the pipeline (default: ``student_pipeline``); a text-to-image one samples
    ``prompts`` at ``guidance_scale``.
    """

    def __init__(self, folder: Path, name: str, scheduler: Any, steps: Sequence[int], every: int,
                 num: int = 16, seed: int = 0, build: Callable[[Any, Any], Any] = student_pipeline,
                 prompts: Sequence[str] | None = None, guidance_scale: float | None = None):
        self.folder, self.name, self.scheduler = Path(folder), name, scheduler
        self.steps, self.every, self.num, self.seed = list(steps), every, num, seed
        self.build, self.prompts, self.guidance_scale = build, list(prompts) if prompts else None, guidance_scale

    def __call__(self, state: FitState) -> None:
        if state.step % self.every and state.step != state.total_steps:
            return
        model = state.student
        parameters = [p for p in model.parameters() if p.requires_grad]
        if state.ema is not None:
            state.ema.store(parameters)
            state.ema.copy_to(parameters)
        training = model.training
        model.eval()
        try:
            # A fresh scheduler each time: set_timesteps mutates it.
            pipeline = self.build(model, type(self.scheduler).from_config(self.scheduler.config))
            for count in self.steps:
                images = sample_images(pipeline, self.num, count, seed=self.seed, prompts=self.prompts,
                                       guidance_scale=self.guidance_scale)
                save_grid(images, self.folder / f"{self.name}-step{state.step:07d}-{count}steps.png")
        finally:
            model.train(training)
            if state.ema is not None:
                state.ema.restore(parameters)

