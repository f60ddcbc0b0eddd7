"""Consistency distillation: the exact boundary condition, the solver grid and the teacher ODE steps."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlkd import rng
from vlkd.diffusion.consistency import (ConsistencyConfig, ConsistencyDistillation, boundary_scalings,
                                        sampling_timesteps, solver_grid)
from vlkd.diffusion.schedule import NoiseSchedule
from vlkd.errors import RecipeError
from vlkd.rng import sample_seed

S = 0.5


def schedule(prediction="v_prediction"):
    return NoiseSchedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                          "prediction_type": prediction})


class Random(nn.Module):
    """An arbitrary network: the boundary condition must hold whatever it outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, z, t, class_labels=None):
        return SimpleNamespace(sample=self.conv(z) * 7 + t.view(-1, 1, 1, 1).float())


class GaussianDenoiser(nn.Module):
    def __init__(self, sched):
        super().__init__()
        self.schedule = sched

    def forward(self, z, t, class_labels=None):
        alpha, sigma = self.schedule.alpha_sigma(t, z.double())
        x0 = alpha * S**2 / (alpha**2 * S**2 + sigma**2) * z.double()
        eps = (z.double() - alpha * x0) / sigma
        return SimpleNamespace(sample=self.schedule.target(x0, eps, t))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_boundary_condition_is_exact(prediction):
    method = ConsistencyDistillation(schedule(prediction), Random(), ConsistencyConfig())
    z = torch.randn(4, 1, 8, 8)
    out = method.consistency(Random(), z, torch.zeros(4, dtype=torch.long), None)
    assert torch.equal(out, z)
    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[2] < 1e-6 and c_out[2] > 0.999


def test_solver_grid_matches_lcm_scheduler():
    from diffusers import LCMScheduler

    grid = solver_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    lcm = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    lcm.set_timesteps(4)
    assert set(lcm.timesteps.tolist()) <= set(grid.tolist())  # sampling visits trained points only


def test_sampling_timesteps_are_lcm_schedulers():
    assert sampling_timesteps(1000, 50, [4]) == [259, 499, 759, 999]
    assert sampling_timesteps(1000, 50, [1, 2]) == [499, 999]
    assert sampling_timesteps(1000, 50, [8]) == [139, 259, 379, 499, 639, 759, 879, 999]


@pytest.mark.parametrize("focus", [0.0, 0.6])
def test_sampling_focus_draws_pairs_at_the_sampled_timesteps(focus):
    """A fraction ``focus`` of pairs starts at one of 4-step sampling's timesteps (each about equally often), the
    rest uniformly on the grid; without focus the draws are exactly the plain uniform ones."""
    method = ConsistencyDistillation(schedule(), Random(), ConsistencyConfig(student_steps=[4], sampling_focus=focus))
    batch = {"seed": torch.tensor([sample_seed(3, p) for p in range(4000)])}
    t, t_target = method.training_pair(batch, torch.device("cpu"))
    torch.testing.assert_close(t_target, (t - 20).clamp(min=0), rtol=0, atol=0)
    points = torch.tensor([259, 499, 759, 999])
    shares = torch.stack([(t == p).float().mean() for p in points])
    uniform = 1 / 50
    assert abs(shares.sum().item() - (focus + (1 - focus) * 4 * uniform)) < 0.03
    assert (shares - (focus / 4 + (1 - focus) * uniform)).abs().max().item() < 0.03
    off_points = t[~torch.isin(t, points)]
    assert len(off_points.unique()) == 46  # the other grid points are still drawn
    if not focus:
        torch.testing.assert_close(t, solver_grid(1000, 50)[rng.randint(batch, 0, 50, "step")], rtol=0, atol=0)


def test_sampling_focus_keeps_points_a_pair_can_start_from():
    """With skip 10 a pair starts at grid index 9 (t = 199) or above, so 8-step sampling's 139 is left out."""
    config = ConsistencyConfig(skip=10, student_steps=[8], sampling_focus=0.5)
    method = ConsistencyDistillation(schedule(), Random(), config)
    assert solver_grid(1000, 50)[method.focus_index].tolist() == [259, 379, 499, 639, 759, 879, 999]
    assert not len(ConsistencyDistillation(schedule(), Random(), ConsistencyConfig()).focus_index)


@pytest.mark.parametrize("start", [599, 399, 199, 39])
def test_heun_is_closer_than_ddim_to_the_exact_ode(start):
    """One skip-sized step (20 timesteps of a 50-point grid) against the closed-form probability-flow ODE.

    Not near t = 999: with cosine betas sigma/alpha falls from 20,291 to 32 in the first step, and the trapezoid
    rule is worse than Euler across such a range (the same reason EDM caps sigma_max at 80).
    """
    sched = schedule()
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t, t_next = torch.tensor([start, start]), torch.tensor([start - 20, start - 20])
    teacher = GaussianDenoiser(sched)
    alpha, sigma = sched.alpha_sigma(t, z)
    alpha2, sigma2 = sched.alpha_sigma(t_next, z)
    exact = z * ((alpha2**2 * S**2 + sigma2**2) / (alpha**2 * S**2 + sigma**2)).sqrt()
    errors = {}
    for solver in ("ddim", "heun"):
        method = ConsistencyDistillation(sched, Random(), ConsistencyConfig(solver=solver))
        errors[solver] = (method.teacher_step(teacher, z, t, t_next, None).double() - exact).abs().max().item()
    assert errors["heun"] < errors["ddim"] / 3


def test_loss_target_and_ema_update():
    sched = schedule()
    student = Random()
    method = ConsistencyDistillation(sched, student, ConsistencyConfig(loss="l2", target_ema=0.5))
    batch = {"pixel_values": torch.randn(8, 1, 8, 8), "seed": torch.tensor([sample_seed(1, p) for p in range(8)])}
    terms = method(student, GaussianDenoiser(sched), batch)
    assert set(terms) == {"cd_l2"} and terms["cd_l2"].requires_grad and terms["cd_l2"].item() > 0
    before = method.target.conv.weight.clone()
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    method.after_step(student)
    torch.testing.assert_close(method.target.conv.weight, before + 0.5)


def test_bad_config_is_a_recipe_error():
    with pytest.raises(RecipeError, match="skip"):
        ConsistencyConfig(num_solver_steps=10, skip=10)
    with pytest.raises(RecipeError, match="target_ema"):
        ConsistencyConfig(target_ema=1.0)
    with pytest.raises(RecipeError, match="sampling_focus is a fraction"):
        ConsistencyConfig(sampling_focus=1.0)


@pytest.mark.parametrize("anchor_below, anchor_skip", [(259, None), (999, None), (519, 3)])
def test_anchored_target_is_the_teachers_grid_solve(monkeypatch, anchor_below, anchor_skip):
    """Pairs at or below the anchor get the teacher's one-interval step, then its DDIM solve to t = 0 on the grid
    (anchor_skip intervals a step); the rest the usual target."""
    import vlkd.diffusion.consistency as cd
    from vlkd import rng

    sched, student, teacher = schedule(), Random(), GaussianDenoiser(schedule())
    config = ConsistencyConfig(num_solver_steps=50, loss="l2", anchor_below=anchor_below, anchor_skip=anchor_skip)
    method = ConsistencyDistillation(sched, student, config)
    assert (method.target is None) == (anchor_below == 999)  # no EMA copy that no target would read
    batch = {"pixel_values": torch.randn(32, 1, 4, 4), "seed": torch.tensor([sample_seed(3, p) for p in range(32)])}
    seen = {}
    monkeypatch.setattr(cd, "consistency_loss", lambda prediction, target, *_: seen.setdefault("target", target))
    method(student, teacher, batch)

    t, t_target = method.training_pair(batch, torch.device("cpu"))
    z = sched.add_noise(batch["pixel_values"], rng.randn(batch, (1, 4, 4), "noise", torch.device("cpu")), t)
    anchored = t <= anchor_below
    assert anchored.any() and (anchored.all() if anchor_below == 999 else not anchored.all())
    for i in range(32):
        zi, ti = z[i:i + 1], t[i:i + 1]
        if anchored[i]:  # DDIM one grid interval (20 timesteps), then 20 * anchor_skip at a time down to 0
            stride = 20
            while ti.item() > 0:
                x0, eps = sched.to_x0_eps(teacher(zi, ti).sample.float(), zi, ti)
                ti = (ti - stride).clamp(min=0)
                zi = sched.ddim_step(x0, eps, ti)
                stride = 20 * (anchor_skip or 1)
            expected = zi
        else:
            with torch.no_grad():
                z_next = method.teacher_step(teacher, zi, ti, t_target[i:i + 1], None)
                expected = method.consistency(method.target, z_next, t_target[i:i + 1], None)
        torch.testing.assert_close(seen["target"][i:i + 1], expected, rtol=1e-5, atol=1e-5)


def test_select_samples_picks_rows_of_tensors_and_dataclasses():
    from dataclasses import dataclass

    from vlkd.diffusion.consistency import select_samples

    @dataclass
    class Condition:
        text: torch.Tensor
        pooled: torch.Tensor | None

    index = torch.tensor([2, 0])
    picked = select_samples(Condition(torch.arange(12).view(4, 3), None), index)
    assert picked.pooled is None and picked.text.tolist() == [[6, 7, 8], [0, 1, 2]]
    assert select_samples(torch.tensor([5, 6, 7]), index).tolist() == [7, 5]
    assert select_samples(None, index) is None
    with pytest.raises(TypeError, match="dict"):
        select_samples({"labels": torch.zeros(3)}, index)


def test_negative_anchor_is_a_recipe_error():
    with pytest.raises(RecipeError, match="anchor_below"):
        ConsistencyConfig(anchor_below=-5)
    with pytest.raises(RecipeError, match="anchor_skip must be in"):
        ConsistencyConfig(anchor_below=519, anchor_skip=0)
