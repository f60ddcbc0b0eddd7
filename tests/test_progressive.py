"""Progressive distillation on Gaussian data, where every DDIM step is a known scalar map of z."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlkd.diffusion.progressive import ProgressiveDistillation, round_steps, two_step_target
from vlkd.diffusion.schedule import NoiseSchedule, trailing_timesteps
from vlkd.errors import RecipeError
from vlkd.rng import sample_seed

S = 0.5  # data x ~ N(0, S^2 I)


def ab(schedule, t):
    """alpha, sigma as float64 scalars (t = -1: clean)."""
    return (1.0, 0.0) if t < 0 else (schedule.alpha[t].item(), schedule.sigma[t].item())


def ddim_gain(schedule, t, t_next):
    """With the exact Gaussian denoiser, one DDIM step multiplies z by this factor."""
    a, s = ab(schedule, t)
    a2, s2 = ab(schedule, t_next)
    return (a2 * a * S**2 + s2 * s) / (a**2 * S**2 + s**2)


class GaussianDenoiser(nn.Module):
    """The exact posterior mean E[x | z_t] for Gaussian data, output in the schedule's parameterisation."""

    def __init__(self, schedule, gain=None):
        super().__init__()
        self.schedule, self.gain = schedule, gain

    def forward(self, z, t, class_labels=None):
        z = z.double()
        alpha, sigma = self.schedule.alpha_sigma(t, z)
        x0 = alpha * S**2 / (alpha**2 * S**2 + sigma**2) * z if self.gain is None else self.gain(t, z) * z
        eps = (z - alpha * x0) / sigma
        return SimpleNamespace(sample=self.schedule.target(x0, eps, t))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("student_steps", [1, 2, 4])
def test_target_lands_where_two_teacher_steps_land(prediction, student_steps):
    schedule = NoiseSchedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                              "prediction_type": prediction})
    grid = trailing_timesteps(1000, student_steps) + [-1]
    fine = trailing_timesteps(1000, 2 * student_steps) + [-1]
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    teacher = GaussianDenoiser(schedule)
    for i in range(student_steps):
        t, t_mid, t_next = (torch.full((3,), v) for v in (grid[i], fine[2 * i + 1], grid[i + 1]))
        x0, eps = schedule.to_x0_eps(teacher(z, t).sample.double(), z, t)
        z_mid = schedule.ddim_step(x0, eps, t_mid)
        x0m, epsm = schedule.to_x0_eps(teacher(z_mid, t_mid).sample.double(), z_mid, t_mid)
        z_next = schedule.ddim_step(x0m, epsm, t_next)
        expected = ddim_gain(schedule, grid[i], fine[2 * i + 1]) * ddim_gain(schedule, fine[2 * i + 1], grid[i + 1]) * z
        torch.testing.assert_close(z_next, expected, rtol=1e-5, atol=1e-5)
        target = two_step_target(schedule, z, t, z_next, t_next)
        alpha, sigma = schedule.alpha_sigma(t, z)
        one_step = schedule.ddim_step(target, (z - alpha * target) / sigma, t_next)
        torch.testing.assert_close(one_step, expected, rtol=1e-5, atol=1e-5)
        if grid[i + 1] == -1:  # last step: the target is the teacher's x-prediction at the midpoint
            torch.testing.assert_close(target, x0m, rtol=1e-5, atol=1e-5)


def test_loss_is_zero_for_the_ideal_student():
    """A student whose x-prediction is the closed-form two-step target has zero loss on every grid point."""
    schedule = NoiseSchedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                              "prediction_type": "v_prediction"})
    method = ProgressiveDistillation(schedule, student_steps=2)
    grid, fine = method.grid.tolist(), method.fine.tolist()

    def ideal_gain(t, z):
        gains = []
        for value in t.tolist():
            i = grid.index(value)
            g = ddim_gain(schedule, grid[i], fine[2 * i + 1]) * ddim_gain(schedule, fine[2 * i + 1], grid[i + 1])
            a, s = ab(schedule, grid[i])
            a2, s2 = ab(schedule, grid[i + 1])
            gains.append((g - s2 / s) / (a2 - s2 / s * a))  # x = (z'' - (s''/s) z) / (a'' - (s''/s) a)
        return torch.tensor(gains, dtype=z.dtype).view(-1, 1, 1, 1)

    batch = {"pixel_values": S * torch.randn(16, 1, 4, 4), "seed": torch.tensor([sample_seed(0, p) for p in range(16)])}
    terms = method(GaussianDenoiser(schedule, ideal_gain), GaussianDenoiser(schedule), batch)
    assert terms["x_mse"].item() < 1e-6
    wrong = method(GaussianDenoiser(schedule), GaussianDenoiser(schedule), batch)
    assert wrong["x_mse"].item() > 1e-3  # the teacher itself is not a 2-step sampler


def test_round_steps_and_unreachable_counts():
    assert round_steps(64, 1) == [32, 16, 8, 4, 2, 1]
    assert round_steps(16, 4) == [8, 4]
    with pytest.raises(RecipeError, match="not reachable by halving"):
        round_steps(64, 3)
    with pytest.raises(RecipeError, match="must be smaller"):
        round_steps(4, 8)


def test_round_steps_scale_one_positive_scale_per_round():
    from vlkd.diffusion.progressive import ProgressiveConfig

    config = ProgressiveConfig(teacher_steps=16, student_steps=4, round_steps_scale=[0.3, 2.4])
    assert [config.train_steps(index, 1000) for index in range(2)] == [300, 2400]
    assert [config.train_steps(index, 1) for index in range(2)] == [1, 2]  # never below one step
    assert ProgressiveConfig(teacher_steps=16, student_steps=4).train_steps(1, 1000) == 1000
    with pytest.raises(RecipeError, match=r"\[0.3\] lists 1 but 16 -> 4 steps takes 2 rounds"):
        ProgressiveConfig(teacher_steps=16, student_steps=4, round_steps_scale=[0.3])
    with pytest.raises(RecipeError, match="every scale must be above 0"):
        ProgressiveConfig(teacher_steps=16, student_steps=4, round_steps_scale=[0.3, 0.0])
