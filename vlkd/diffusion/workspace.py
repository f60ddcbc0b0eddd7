"""The run folder of a diffusion distillation, beside the output: ``<out>.run/``.

Training, checkpoints, sample grids and each stage's exported student (a round of progressive distillation, or
the consistency student) live there until the whole recipe is done; then the output folder is assembled in a
temporary folder, renamed into place, and the run folder is removed. A stage folder is written atomically, so
its existence means the stage is complete: a resumed run skips it and continues from the next one.
On several processes only the main one writes here; the others wait for it at each step that writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from vlkd.distributed import is_main_process, wait_for_everyone
from vlkd.diffusion.evaluate import evaluate_pipeline, save_uint8_grid
from vlkd.diffusion.export import read_info, save_student, write_info
from vlkd.diffusion.sample import load_pipeline
from vlkd.files import staged_folder
from vlkd.recipes import EvalConfig, Recipe
from vlkd.runs import open_run_folder

class Workspace:
    """``<out>.run/``: ``recipe.json``, ``train/<stage>/`` (fit run folders), ``stages/<stage>/`` (exports),
    ``samples/`` (PNG grids)."""

    def __init__(self, out: Path, path: Path):
        self.out, self.path = out, path
        self.samples = path / "samples"

    @classmethod
    def open(cls, out: str | Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> "Workspace":
        """Start a run folder, or reopen one with ``resume`` after checking it ran the same recipe."""
        return cls(Path(out), open_run_folder(out, recipe, resume=resume, overwrite=overwrite))

    def train_dir(self, name: str) -> Path:
        """Where ``fit`` checkpoints the stage."""
        return self.path / "train" / name

    def stage_dir(self, name: str) -> Path:
        """The stage's exported student (exists only when the stage is complete)."""
        return self.path / "stages" / name

    def is_done(self, name: str) -> bool:
        """Whether the stage was trained, exported and measured."""
        return (self.stage_dir(name) / "vlkd.json").is_file()

    def export_stage(self, name: str, pipeline: Any, info: dict[str, Any], *, eval_steps: Sequence[int],
                     eval_config: EvalConfig, reference: str, num_reference: int | None, seed: int = 0,
                     prompts: Sequence[str] | None = None, guidance_scale: float | None = None,
                     fidelity: Any = None) -> Path:
        """Save the stage's student, measure it at ``eval_steps`` from the saved folder, and record the numbers.

        A text-to-image student is measured on ``prompts`` at ``guidance_scale``, or with ``fidelity`` (shapes test
        captions, see ``evaluate_pipeline``) on those captions, its rows holding prompt fidelity as well.
        """
        folder = self.stage_dir(name)
        if is_main_process():
            self._export_stage(name, folder, pipeline, info, eval_steps, eval_config, reference, num_reference, seed,
                               prompts, guidance_scale, fidelity)
        wait_for_everyone()
        return folder

    def _export_stage(self, name: str, folder: Path, pipeline: Any, info: dict[str, Any], eval_steps: Sequence[int],
                      eval_config: EvalConfig, reference: str, num_reference: int | None, seed: int,
                      prompts: Sequence[str] | None, guidance_scale: float | None, fidelity: Any) -> None:
        with staged_folder(folder, overwrite=True) as staging:
            save_student(pipeline, staging)
            rows: list[dict[str, Any]] = []
            if eval_steps:
                # Measure what ships: the folder as diffusers loads it, not the object in memory (with its vlkd.json,
                # which tells the loader how to assemble a LoRA student).
                write_info(staging, info)
                loaded = load_pipeline(staging)
                loaded.to("cuda" if torch.cuda.is_available() else "cpu")
                rows, firsts = evaluate_pipeline(loaded, eval_steps, eval_config, reference,
                                                 num_reference=num_reference, seed=seed, prompts=prompts,
                                                 guidance_scale=guidance_scale, fidelity=fidelity)
                for count, images in firsts.items():
                    save_uint8_grid(images, self.samples / f"{name}-final-{count}steps.png")
            write_info(staging, {**info, "metrics": rows})
        # The exported weights are the stage's result; its optimizer checkpoints are no longer needed.
        shutil.rmtree(self.train_dir(name) / "checkpoints", ignore_errors=True)

    def assemble(self, final: str, others: Sequence[str], extra: dict[str, Any], overwrite: bool) -> Path:
        """Write the output folder: the final stage at its root, other stages under ``rounds/``, the grids under
        ``samples/`` and loss histories under ``training/``; then remove the run folder."""
        if is_main_process():
            self._assemble(final, others, extra, overwrite)
        wait_for_everyone()
        return self.out

    def _assemble(self, final: str, others: Sequence[str], extra: dict[str, Any], overwrite: bool) -> None:
        with staged_folder(self.out, overwrite=overwrite) as staging:
            shutil.copytree(self.stage_dir(final), staging, dirs_exist_ok=True)
            info = read_info(staging)
            metrics = []
            for name in others:
                shutil.copytree(self.stage_dir(name), staging / "rounds" / name)
                metrics += [{**row, "model": f"rounds/{name}"} for row in read_info(self.stage_dir(name))["metrics"]]
            info["metrics"] = sorted(metrics + info.get("metrics", []), key=lambda row: -row["steps"])
            if self.samples.is_dir():
                shutil.copytree(self.samples, staging / "samples")
            for name in [*others, final]:
                history = self.train_dir(name) / "history.jsonl"
                if history.is_file():
                    (staging / "training").mkdir(exist_ok=True)
                    shutil.copy2(history, staging / "training" / f"{name}-history.jsonl")
            write_info(staging, {**info, **extra})
        shutil.rmtree(self.path, ignore_errors=True)
