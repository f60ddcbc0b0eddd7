"""Progressive distillation (Salimans & Ho, ICLR 2022): each round halves the number of sampling steps.

The student starts as a copy of the teacher. In a round with N student steps the student learns, at every
point t_i of the N-step grid, the x-prediction that makes one DDIM step from z_{t_i} land where two teacher
DDIM steps (through the midpoint of the 2N-step grid) land. The grids are the ones the exported
``DDIMScheduler(timestep_spacing="trailing")`` visits, so the student is trained on exactly the timesteps it
is sampled at. The student of round r becomes the teacher of round r + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlkd import rng
from vlkd.diffusion.schedule import NoiseSchedule, trailing_timesteps
from vlkd.errors import RecipeError


@dataclass
class ProgressiveConfig:
    """Recipe section ``method`` of the ``progressive`` pipeline."""

    teacher_steps: int = 64  # the DDIM step count of the first round's teacher
    student_steps: int = 1  # the step count of the final student
    weighting: Literal["snr_trunc", "snr_plus_one"] = "snr_trunc"  # max(SNR, 1) on x-error, or v-loss
    eval_every_round: bool = True
    # train.steps is scaled by these, one per round, first round first (empty: every round train.steps). The rounds
    # differ in how much they lose (on digits 16 -> 8 costs little, 8 -> 4 the most), so a budget is better spent
    # unevenly; scales rather than counts keep `--set train.steps=N` shortening or lengthening every round.
    round_steps_scale: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        rounds = round_steps(self.teacher_steps, self.student_steps)
        if self.round_steps_scale and len(self.round_steps_scale) != len(rounds):
            raise RecipeError(f"round_steps_scale {self.round_steps_scale} lists {len(self.round_steps_scale)} but "
                              f"{self.teacher_steps} -> {self.student_steps} steps takes {len(rounds)} rounds "
                              f"({', '.join(map(str, rounds))} steps); give one scale per round")
        if any(scale <= 0 for scale in self.round_steps_scale):
            raise RecipeError(f"round_steps_scale {self.round_steps_scale}: every scale must be above 0")

    def train_steps(self, index: int, steps: int) -> int:
        """Optimizer steps of round ``index`` (0-based): ``steps`` times its scale, rounded, at least 1."""
        return max(1, round(steps * self.round_steps_scale[index])) if self.round_steps_scale else steps


def round_steps(teacher_steps: int, student_steps: int) -> list[int]:
    """The student step count of every round, e.g. 64 -> 4 gives [32, 16, 8, 4]."""
    if student_steps < 1:
        raise RecipeError(f"student_steps must be at least 1, got {student_steps}")
    if student_steps >= teacher_steps:
        raise RecipeError(f"student_steps {student_steps} must be smaller than teacher_steps {teacher_steps}")
    counts, steps = [], teacher_steps
    while steps > student_steps and steps % 2 == 0:
        steps //= 2
        counts.append(steps)
    if steps != student_steps:
        reachable = []
        steps = teacher_steps
        while steps % 2 == 0:
            steps //= 2
            reachable.append(str(steps))
        raise RecipeError(f"{teacher_steps} -> {student_steps} steps is not reachable by halving; from "
                          f"{teacher_steps} teacher steps the student may have {', '.join(reachable) or 'none'}")
    return counts


def predict_x0_eps(model: nn.Module, schedule: NoiseSchedule, z: torch.Tensor, t: torch.Tensor,
                   labels: torch.Tensor | None, prediction_type: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) predicted by a diffusers UNet at (z_t, t), in its own parameterisation (default: the schedule's)."""
    output = model(z, t, class_labels=labels).sample
    return schedule.to_x0_eps(output.float(), z, t, prediction_type)


def two_step_target(schedule: NoiseSchedule, z: torch.Tensor, t: torch.Tensor, z_next: torch.Tensor,
                    t_next: torch.Tensor) -> torch.Tensor:
    """The x that makes one DDIM step from (z_t, t) land on z_next at t_next (the paper's closed form).

    x = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha); at t'' = clean it is z'' itself.
    """
    alpha, sigma = schedule.alpha_sigma(t, z)
    alpha_next, sigma_next = schedule.alpha_sigma(t_next, z)
    ratio = sigma_next / sigma
    return (z_next - ratio * z) / (alpha_next - ratio * alpha)


class ProgressiveDistillation:
    """One round: ``student_steps`` student DDIM steps imitate twice as many teacher steps.

    ``teacher_prediction`` / ``student_prediction`` default to the schedule's prediction type; they differ when an
    epsilon teacher is distilled into a v- or x-prediction student (the first round's student relearns its output).
    """

    def __init__(self, schedule: NoiseSchedule, student_steps: int, weighting: str = "snr_trunc",
                 class_conditional: bool = False, teacher_prediction: str | None = None,
                 student_prediction: str | None = None):
        self.schedule, self.student_steps, self.weighting = schedule, student_steps, weighting
        self.class_conditional = class_conditional
        self.teacher_prediction = teacher_prediction or schedule.prediction_type
        self.student_prediction = student_prediction or schedule.prediction_type
        T = schedule.num_train_timesteps
        # Student grid t_0 > ... > t_{N-1} > clean (-1); the teacher's 2N grid nests in it (t_i = fine_{2i}).
        self.grid = torch.tensor(trailing_timesteps(T, student_steps) + [-1])
        self.fine = torch.tensor(trailing_timesteps(T, 2 * student_steps) + [-1])

    def __call__(self, student: nn.Module, teacher: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x = batch["pixel_values"]
        labels = batch.get("label") if self.class_conditional else None
        i = rng.randint(batch, 0, self.student_steps, "step")
        t, t_mid, t_next = self.grid[i], self.fine[2 * i + 1], self.grid[i + 1]
        t_model = t.to(x.device)
        z = self.schedule.add_noise(x, rng.randn(batch, x.shape[1:], "noise", x.device), t)
        with torch.no_grad():
            x0, eps = predict_x0_eps(teacher, self.schedule, z, t_model, labels, self.teacher_prediction)
            z_mid = self.schedule.ddim_step(x0, eps, t_mid)
            x0_mid, eps_mid = predict_x0_eps(teacher, self.schedule, z_mid, t_mid.to(x.device), labels,
                                             self.teacher_prediction)
            z_next = self.schedule.ddim_step(x0_mid, eps_mid, t_next)
            x_target = two_step_target(self.schedule, z, t, z_next, t_next)
        x_student, _ = predict_x0_eps(student, self.schedule, z, t_model, labels, self.student_prediction)
        snr = self.schedule.snr(t).to(x.device, torch.float32)
        weight = snr.clamp(min=1.0) if self.weighting == "snr_trunc" else snr + 1.0
        error = ((x_student - x_target) ** 2).flatten(1).mean(1)
        return {"x_mse": (weight * error).mean()}
