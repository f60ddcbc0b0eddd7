"""Consistency distillation (Song et al. 2023) on DDPM-family teachers, in the form LCMScheduler samples.

The consistency function is f(z, t) = c_skip(t) z + c_out(t) x0(z, t), with x0 the student network's
prediction in its own parameterisation and the boundary scalings of latent consistency models
(timestep_scaling 10, sigma_data 0.5): c_skip(0) = 1 and c_out(0) = 0, so f(z, 0) = z exactly. Training
pairs are adjacent points of a solver grid of ``num_solver_steps`` timesteps, ``skip`` grid intervals apart:
the teacher takes one ODE step (DDIM, or Heun) from the higher point, and an EMA copy of the student (the
target network) maps the result to its x0 estimate; the student must give the same estimate from the higher
point.

``anchor_below`` replaces that target, for pairs whose higher point is at or below the given timestep, by the
teacher's own solve on the grid from the higher point to t = 0: the points that multistep sampling ends on
(timestep 259 of 4 LCMScheduler steps, 499 of 2) are then pinned to the teacher's ODE directly, instead of
through a chain of EMA targets whose errors add up hop by hop. ``anchor_skip`` makes that solve take several
grid intervals a step, so that an anchor high enough for 2-step sampling stays affordable.

``sampling_focus`` draws that fraction of the pairs' higher points from the timesteps LCMScheduler visits when the
student samples in its ``student_steps`` (999, 759, 499 and 259 for 4 steps), the rest uniformly from the grid:
few-step sampling reads the student at those points only, and anchored pairs need no chain through the others.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Literal, Sequence

import torch
from torch import nn

from vlkd import rng
from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.errors import RecipeError

SIGMA_DATA = 0.5
DEFAULT_STEP_COUNTS = [1, 2, 4, 8]


@dataclass
class ConsistencyConfig:
    """Recipe section ``method`` of the ``consistency`` pipeline."""

    num_solver_steps: int = 50  # the DDIM grid; LCMScheduler's original_inference_steps
    skip: int = 1  # grid intervals between the two points of a training pair
    solver: Literal["ddim", "heun"] = "ddim"
    loss: Literal["l2", "huber"] = "huber"
    huber_c: float = 0.001
    target_ema: float = 0.95  # decay of the target network (LCM's default)
    timestep_scaling: float = 10.0
    student_steps: list[int] | None = None  # what it samples in: evaluated, recorded, focused on (default 1, 2, 4, 8)
    anchor_below: int | None = None  # pairs with t <= this: target = the teacher's grid solve to t = 0
    anchor_skip: int | None = None  # grid intervals a step of that solve (default: skip); coarser is cheaper
    sampling_focus: float = 0.0  # fraction of pairs drawn at the timesteps the student samples at

    def __post_init__(self) -> None:
        if self.num_solver_steps < 2:
            raise RecipeError(f"num_solver_steps must be at least 2, got {self.num_solver_steps}")
        if not 1 <= self.skip < self.num_solver_steps:
            raise RecipeError(f"skip must be in [1, num_solver_steps), got {self.skip}")
        if not 0.0 <= self.target_ema < 1.0:
            raise RecipeError(f"target_ema must be in [0, 1), got {self.target_ema}")
        if self.anchor_below is not None and self.anchor_below < 0:
            raise RecipeError(f"anchor_below is a timestep (0 or more), got {self.anchor_below}; leave it out for "
                              "plain consistency distillation")
        if self.anchor_skip is not None and not 1 <= self.anchor_skip < self.num_solver_steps:
            raise RecipeError(f"anchor_skip must be in [1, num_solver_steps), got {self.anchor_skip}")
        if not 0.0 <= self.sampling_focus < 1.0:
            raise RecipeError(f"sampling_focus is a fraction of the pairs in [0, 1), got {self.sampling_focus}")

    @property
    def step_counts(self) -> list[int]:
        """The step counts the student is meant to sample in, ascending."""
        return sorted(set(self.student_steps or DEFAULT_STEP_COUNTS))


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM at integer timesteps: c_skip(0) = 1, c_out(0) = 0 (diffusers issue #8547 form)."""
    scaled = timestep_scaling * t.double()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def solver_grid(num_train_timesteps: int, num_solver_steps: int) -> torch.Tensor:
    """The DDIM solver timesteps of LCM, low to high: (k + 1) * (T // N) - 1 for k = 0..N-1."""
    ratio = num_train_timesteps // num_solver_steps
    return torch.arange(1, num_solver_steps + 1) * ratio - 1


def sampling_timesteps(num_train_timesteps: int, num_solver_steps: int, step_counts: Sequence[int]) -> list[int]:
    """The timesteps LCMScheduler (on a ``num_solver_steps`` grid) visits sampling in any of ``step_counts`` steps."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(num_train_timesteps=num_train_timesteps, original_inference_steps=num_solver_steps)
    visited: set[int] = set()
    for steps in step_counts:
        scheduler.set_timesteps(steps)
        visited.update(int(t) for t in scheduler.timesteps)
    return sorted(visited)


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float
                     ) -> dict[str, torch.Tensor]:
    """The named distance between the student's and the target's estimates: ``cd_l2`` or pseudo-Huber ``cd_huber``."""
    difference = prediction - target
    if loss == "l2":
        return {"cd_l2": (difference**2).mean()}
    return {"cd_huber": ((difference**2 + huber_c**2).sqrt() - huber_c).mean()}


def select_samples(condition: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of a batch's condition: None, a tensor, or a dataclass of those (LCM's GuidedCondition)."""
    if condition is None:
        return None
    if isinstance(condition, torch.Tensor):
        return condition[index]
    if is_dataclass(condition):
        return replace(condition, **{f.name: select_samples(getattr(condition, f.name), index)
                                     for f in fields(condition)})
    raise TypeError(f"cannot select samples of a {type(condition).__name__} condition")


class ConsistencyDistillation(nn.Module):
    """The CD loss; holds the target network, updated from the student after every optimizer step.

    ``forward`` is the algorithm; what a sample is conditioned on and how each network is called are hooks
    (``inputs``, ``network``, ``teacher_x0_eps``, ``target_network``), which latent consistency distillation
    (``vlkd.diffusion.lcm``) overrides for text-conditioned latent UNets and classifier-free guidance.
    """

    def __init__(self, schedule: NoiseSchedule, student: nn.Module, config: ConsistencyConfig,
                 class_conditional: bool = False, student_prediction: str | None = None,
                 separate_target: bool = True):
        super().__init__()
        self.schedule, self.config = schedule, config
        self.class_conditional = class_conditional
        # The teacher speaks the schedule's parameterisation; the student (and its target copy) may differ.
        self.student_prediction = student_prediction or schedule.prediction_type
        self.register_buffer("grid", solver_grid(schedule.num_train_timesteps, config.num_solver_steps),
                             persistent=False)
        # Anchored at the grid's top, every target is the teacher's solve: an EMA copy would never be read.
        every_pair_anchored = config.anchor_below is not None and config.anchor_below >= int(self.grid.max())
        self.target = (copy.deepcopy(student).requires_grad_(False).eval()
                       if separate_target and not every_pair_anchored else None)
        # Grid indices of the sampled timesteps that can start a pair (index >= skip - 1).
        visited = (sampling_timesteps(schedule.num_train_timesteps, config.num_solver_steps, config.step_counts)
                   if config.sampling_focus else [])
        self.focus_index = torch.tensor([n for n, t in enumerate(self.grid.tolist())
                                         if t in visited and n >= config.skip - 1], dtype=torch.long)

    # ------------------------------------------------------------------ hooks

    def inputs(self, teacher: Any, batch: dict) -> tuple[torch.Tensor, Any]:
        """The clean samples to noise and what every network is conditioned on (class labels, or None)."""
        labels = batch.get("label") if self.class_conditional else None
        return batch["pixel_values"], labels

    def network(self, model: nn.Module, z: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """A student-side network's raw output at (z, t)."""
        return model(z, t, class_labels=condition).sample.float()

    def teacher_x0_eps(self, teacher: Any, z: torch.Tensor, t: torch.Tensor, condition: Any
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (x0, eps) at (z, t), in the schedule's parameterisation."""
        return self.schedule.to_x0_eps(teacher(z, t, class_labels=condition).sample.float(), z, t)

    def target_network(self, student: nn.Module) -> nn.Module:
        """The network that maps the teacher's step to the target estimate (called under no_grad): the EMA copy,
        or without one the online student itself (target_ema 0 without a copy, as LCM-LoRA does)."""
        return self.target if self.target is not None else student

    # ------------------------------------------------------------------ the algorithm

    def consistency(self, model: nn.Module, z: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """f(z, t) = c_skip z + c_out x0(z, t)."""
        x0, _ = self.schedule.to_x0_eps(self.network(model, z, t, condition), z, t, self.student_prediction)
        c_skip, c_out = (c.to(z.device, z.dtype).view(-1, *([1] * (z.ndim - 1)))
                         for c in boundary_scalings(t.cpu(), self.config.timestep_scaling))
        return c_skip * z + c_out * x0

    def teacher_step(self, teacher: Any, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                     condition: Any) -> torch.Tensor:
        """One teacher ODE step from t to t_next < t: DDIM, or Heun in DDIM's (z / alpha, sigma / alpha) time."""
        x0, eps = self.teacher_x0_eps(teacher, z, t, condition)
        z_next = self.schedule.ddim_step(x0, eps, t_next)
        if self.config.solver == "ddim":
            return z_next
        _, eps_next = self.teacher_x0_eps(teacher, z_next, t_next, condition)
        alpha, sigma = self.schedule.alpha_sigma(t, z)
        alpha_next, sigma_next = self.schedule.alpha_sigma(t_next, z)
        y = z / alpha + (sigma_next / alpha_next - sigma / alpha) * (eps + eps_next) / 2
        return alpha_next * y

    def teacher_solve(self, teacher: Any, z: torch.Tensor, t: torch.Tensor, condition: Any) -> torch.Tensor:
        """The teacher's ODE solve from (z, t) to t = 0 on the solver grid, ``anchor_skip`` (else ``skip``) intervals
        a step, each sample stepping only while it is above 0."""
        intervals = self.config.anchor_skip or self.config.skip
        stride = intervals * (self.schedule.num_train_timesteps // self.config.num_solver_steps)
        z, t = z.clone(), t.clone()
        while bool((t > 0).any()):
            index = (t > 0).nonzero().squeeze(1)
            t_next = (t[index] - stride).clamp(min=0)
            z[index] = self.teacher_step(teacher, z[index], t[index], t_next, select_samples(condition, index))
            t[index] = t_next
        return z

    def training_pair(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, a grid point t_{n+k} and the point t_n the teacher steps to (k = skip; t_n >= 0)."""
        ratio = self.schedule.num_train_timesteps // self.config.num_solver_steps
        n = rng.randint(batch, self.config.skip - 1, self.config.num_solver_steps, "step")
        if len(self.focus_index):
            focused = rng.rand(batch, (), "focus") < self.config.sampling_focus
            n = torch.where(focused, self.focus_index[rng.randint(batch, 0, len(self.focus_index), "focus_point")], n)
        t = self.grid.cpu()[n]
        t_target = (t - self.config.skip * ratio).clamp(min=0)
        return t.to(device), t_target.to(device)

    def forward(self, student: nn.Module, teacher: Any, batch: dict) -> dict[str, torch.Tensor]:
        x, condition = self.inputs(teacher, batch)
        t, t_target = self.training_pair(batch, x.device)
        z = self.schedule.add_noise(x, rng.randn(batch, x.shape[1:], "noise", x.device), t)
        prediction = self.consistency(student, z, t, condition)
        with torch.no_grad():
            z_target = self.teacher_step(teacher, z, t, t_target, condition)
            threshold = self.config.anchor_below
            anchored = t <= threshold if threshold is not None else torch.zeros_like(t, dtype=torch.bool)
            if not bool(anchored.any()):
                target = self.consistency(self.target_network(student), z_target, t_target, condition)
            else:
                # f(z, 0) = z: the solve's endpoint is the anchored target itself; the target network runs on the rest.
                target = torch.empty_like(prediction)
                for index, solve in ((anchored.nonzero().squeeze(1), True), ((~anchored).nonzero().squeeze(1), False)):
                    if not len(index):
                        continue
                    part = (z_target[index], t_target[index], select_samples(condition, index))
                    target[index] = (self.teacher_solve(teacher, *part) if solve
                                     else self.consistency(self.target_network(student), *part))
        return consistency_loss(prediction, target, self.config.loss, self.config.huber_c)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        """target <- decay * target + (1 - decay) * student (nothing without a separate target)."""
        if self.target is None:
            return
        decay = self.config.target_ema
        for target, online in zip(self.target.parameters(), student.parameters()):
            target.lerp_(online.detach(), 1.0 - decay)
