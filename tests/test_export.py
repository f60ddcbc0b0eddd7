"""Exported students: their schedulers sample exactly what was trained, and diffusers alone loads them."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vlkd.cli import main
from vlkd.diffusion.consistency import ConsistencyConfig, ConsistencyDistillation, boundary_scalings, solver_grid
from vlkd.diffusion.export import (consistency_scheduler, model_card, progressive_scheduler, save_student,
                                   student_pipeline)
from vlkd.diffusion.progressive import ProgressiveDistillation
from vlkd.diffusion.schedule import NoiseSchedule




def tiny_unet(size=8, classes=None):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       num_class_embeds=classes).eval()


def cosine(prediction="v_prediction", **extra):
    return NoiseSchedule({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                          "prediction_type": prediction, "clip_sample": False, **extra})


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 32, 64])
def test_ddim_export_visits_the_progressive_training_grid(steps):
    schedule = cosine()
    scheduler = progressive_scheduler(schedule, "v_prediction")
    scheduler.set_timesteps(steps)
    grid = ProgressiveDistillation(schedule, steps).grid.tolist()  # t_0 > ... > t_{K-1} > clean (-1)
    assert scheduler.timesteps.tolist() == grid[:-1]
    z, output = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for i, t in enumerate(grid[:-1]):
        landed = scheduler.step(output, t, z).prev_sample
        x0, eps = schedule.to_x0_eps(output, z, torch.full((2,), t))
        if 1000 % steps == 0:  # the step lands where the student was trained to land, the last one on x0
            torch.testing.assert_close(landed, schedule.ddim_step(x0, eps, torch.full((2,), grid[i + 1])))
        else:  # diffusers steps to t - 1000 // K, at most one timestep from the next trailing grid point
            assert abs((t - 1000 // steps) - grid[i + 1]) <= 1


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("solver_steps, skip", [(50, 1), (50, 5), (20, 2)])
def test_lcm_export_visits_the_consistency_training_grid(steps, solver_steps, skip):
    schedule = cosine()
    config = ConsistencyConfig(num_solver_steps=solver_steps, skip=skip, timestep_scaling=10.0)
    scheduler = consistency_scheduler(schedule, "v_prediction", solver_steps, config.timestep_scaling)
    scheduler.set_timesteps(steps)
    grid = solver_grid(1000, solver_steps)
    trained = set(grid[skip - 1:].tolist())  # the higher points of training pairs: n in [skip - 1, N)
    visited = scheduler.timesteps.tolist()
    assert visited[0] == 999 and set(visited) <= trained
    for t in visited:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        expected = boundary_scalings(torch.tensor([t]), config.timestep_scaling)
        assert float(c_skip) == pytest.approx(float(expected[0]), rel=1e-6)
        assert float(c_out) == pytest.approx(float(expected[1]), rel=1e-6)


def _manual_ddim(unet, schedule, steps, generator):
    grid = ProgressiveDistillation(schedule, steps).grid
    z = torch.randn(3, 1, 8, 8, generator=generator)
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = torch.full((3,), int(t))
        x0, eps = schedule.to_x0_eps(unet(z, tt).sample.double(), z.double(), tt)
        z = schedule.ddim_step(x0, eps, torch.full((3,), int(t_next))).float()
    return z


def _manual_consistency(unet, schedule, config, steps, generator):
    """Multistep consistency sampling: x <- f(x, t_n), then re-noise to t_{n+1} with fresh noise."""
    method = ConsistencyDistillation(schedule, unet, config)
    scheduler = consistency_scheduler(schedule, schedule.prediction_type, config.num_solver_steps,
                                      config.timestep_scaling)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    z = torch.randn(3, 1, 8, 8, generator=generator)
    for i, t in enumerate(timesteps):
        f = method.consistency(unet, z, torch.full((3,), t), None)
        if i == len(timesteps) - 1:
            return f
        alpha, sigma = schedule.alpha_sigma(torch.full((3,), timesteps[i + 1]), f)
        z = alpha * f + sigma * torch.randn(3, 1, 8, 8, generator=generator)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_pipelines_sample_as_trained(prediction):
    schedule = cosine(prediction)
    unet = tiny_unet()
    config = ConsistencyConfig(num_solver_steps=20)
    with torch.no_grad():
        for steps in (1, 2, 4):
            ddim = student_pipeline(unet, progressive_scheduler(schedule, prediction))
            images = ddim(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                          output_type="pt").images
            expected = _manual_ddim(unet, schedule, steps, torch.Generator().manual_seed(1))
            torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)

            lcm = student_pipeline(unet, consistency_scheduler(schedule, prediction, 20, 10.0))
            assert type(lcm).__name__ == "ConsistencyModelPipeline"
            images = lcm(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(2),
                         output_type="pt").images
            expected = _manual_consistency(unet, schedule, config, steps, torch.Generator().manual_seed(2))
            torch.testing.assert_close(images, (expected / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=1e-4)


def test_betas_diffusers_schedulers_lack_are_exported_as_trained_betas():
    schedule = NoiseSchedule({"num_train_timesteps": 1000, "beta_schedule": "sigmoid", "prediction_type": "sample"})
    for scheduler in (progressive_scheduler(schedule, "sample"), consistency_scheduler(schedule, "sample", 50, 10.0)):
        assert scheduler.config.trained_betas is not None
        torch.testing.assert_close(scheduler.alphas_cumprod.double(), schedule.alpha**2, rtol=1e-5, atol=1e-7)
    zero_snr = cosine(rescale_betas_zero_snr=True)
    scheduler = progressive_scheduler(zero_snr, "v_prediction")
    assert scheduler.config.rescale_betas_zero_snr and scheduler.alphas_cumprod[-1] == 0


def test_exported_folders_load_and_sample_with_diffusers_alone(tmp_path):
    schedule = cosine()
    folders = {
        "progressive": (student_pipeline(tiny_unet(), progressive_scheduler(schedule, "v_prediction")), 1),
        "consistency": (student_pipeline(tiny_unet(), consistency_scheduler(schedule, "v_prediction", 50, 10.0)), 4),
        "conditional": (student_pipeline(tiny_unet(classes=10), progressive_scheduler(schedule, "v_prediction")), 2),
    }
    for name, (pipeline, steps) in folders.items():
        save_student(pipeline, tmp_path / name, {"method": name, "steps": steps})
        assert json.loads((tmp_path / name / "vlkd.json").read_text())["steps"] == steps
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        for name, steps in {[(n, s) for n, (_, s) in folders.items()]!r}:
            pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r} + "/" + name)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                          output_type="np").images
            assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1, images.shape
            print(name, type(pipe).__name__, type(pipe.scheduler).__name__)
        assert not any(m == "vlkd" or m.startswith("vlkd.") for m in sys.modules), "vlkd was imported"
    """)
    # A generous limit: importing diffusers takes seconds alone, minutes on a machine shared with training jobs.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == ["progressive DDIMPipeline DDIMScheduler",
                                             "consistency ConsistencyModelPipeline LCMScheduler",
                                             "conditional ConsistencyModelPipeline DDIMScheduler"]


def test_sample_command_writes_a_grid(tmp_path, capsys):
    schedule = cosine()
    folder = tmp_path / "student"
    save_student(student_pipeline(tiny_unet(), consistency_scheduler(schedule, "v_prediction", 10, 10.0)), folder,
                 {"method": "consistency", "steps": 2})
    assert main(["sample", str(folder), "--num", "5", "--out", str(tmp_path / "grid.png"), "--seed", "3"]) == 0
    assert "2 steps" in capsys.readouterr().out  # the student's own step count from vlkd.json
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as image:
        assert image.size[0] >= 3 * 64  # 3 columns of enlarged 8x8 tiles
    # More steps than the LCM grid holds, and a folder that is not a pipeline: one line each, exit code 2.
    for argv in (["sample", str(folder), "--steps", "11", "--out", str(tmp_path / "x.png")],
                 ["sample", str(tmp_path), "--out", str(tmp_path / "x.png")]):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("vlkd: error:")
    assert not (tmp_path / "x.png").exists()


def test_model_card_says_how_to_sample():
    card = model_card({"method": "progressive", "steps": 4, "pipeline": "DDIMPipeline", "scheduler": "DDIMScheduler",
                       "teacher": {"path": "assets/teachers/ddpm-digits"},
                       "metrics": [{"model": ".", "steps": 4, "features": "digits-classifier", "fd": 1.5,
                                    "num_samples": 1000, "num_reference": 1797, "reference": "digits:16@all",
                                    "seconds_per_image": 0.001}]})
    assert "DiffusionPipeline.from_pretrained" in card and "num_inference_steps=4" in card
    assert "| . | 4 | digits-classifier | 1.500 | 1000 |" in card


def test_model_card_shows_prompt_fidelity_of_text_to_image_students():
    row = {"model": ".", "steps": 4, "features": "inception", "fd": 20.0, "num_samples": 1000, "num_reference": 2000,
           "reference": "shapes:32@test", "seconds_per_image": 0.01}
    card = model_card({"method": "lcm", "steps": 4, "metrics": [{**row, "fidelity": 0.875}]})
    assert "prompt fidelity |" in card and "| shapes:32@test (2000) | 0.0100 | 0.875 |" in card
    assert "prompt fidelity" not in model_card({"method": "lcm", "steps": 4, "metrics": [row]})
