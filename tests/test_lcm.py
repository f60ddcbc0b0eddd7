"""Latent consistency distillation (LCM and LCM-LoRA) of tiny SD 1.x- and SDXL-style pipelines, built by
lcm_fixtures from real configs with random weights: 32x32 images, 8x8 latents, a character-level CLIP tokenizer."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lcm_fixtures import save_teacher
from script_modules import load_script

from vlkd.cli import main
from vlkd.rng import sample_seed

TINY = ["--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2",
        "--set", "eval.enabled=false"]


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teachers") / "sd")


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teachers") / "sdxl", sdxl=True)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Reference statistics go to one cache per test module, not to the user's."""
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path_factory.getbasetemp() / "vlkd-cache"))


def recipe(tmp_path, teacher, pipeline, data="shapes:32", **method):
    method = {"num_solver_steps": 10, "w_min": 2.0, "w_max": 4.0, "student_steps": "[1, 2]", **method}
    lines = [f"pipeline: {pipeline}", f"teacher: {teacher}", f"data: {data}", "method:"]
    lines += [f"  {key}: {value}" for key, value in method.items()]
    if pipeline == "lcm-lora":
        lines += ["student:", "  rank: 4"]
    else:
        lines += ["student:", "  time_cond_proj_dim: 8"]
    path = tmp_path / f"{pipeline}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def shapes_batch(size=2):
    from vlkd.data import build_dataset

    dataset = build_dataset("shapes:32", "train")
    samples = [dataset[i] for i in range(size)]
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "seed": torch.tensor([sample_seed(0, p) for p in range(size)])}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlkd: error:"), err
    return err[0]


def lcm_setup(sd_teacher, **config):
    """(teacher, guidance-embedded student, LCM method with ``config``, frozen teacher) on the tiny SD teacher."""
    from vlkd.diffusion.lcm import (
        FrozenTextToImageTeacher,
        LatentConsistencyConfig,
        LatentConsistencyDistillation,
        LCMStudentConfig,
        lcm_student,
    )
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher

    teacher = load_text_to_image_teacher(sd_teacher)
    student = lcm_student(teacher.unet, LCMStudentConfig(time_cond_proj_dim=8)).eval()
    method = LatentConsistencyDistillation(teacher.schedule, student, LatentConsistencyConfig(**config))
    return teacher, student, method, FrozenTextToImageTeacher(teacher)


def test_guidance_embedding_wiring(sd_teacher):
    """The student sees w through timestep_cond as diffusers' LCM pipeline gives it; w = 1 needs no second pass."""
    from diffusers import LatentConsistencyModelPipeline

    from vlkd.diffusion.export import consistency_scheduler, text_to_image_pipeline
    from vlkd.diffusion.lcm import (
        GuidedCondition,
        LatentConsistencyConfig,
        LatentConsistencyDistillation,
        guidance_embedding,
    )

    teacher, student, method, frozen = lcm_setup(sd_teacher, num_solver_steps=10, w_min=2.0, w_max=4.0)
    batch = shapes_batch()
    latents, condition = method.inputs(frozen, batch)
    assert latents.shape == (2, 4, 8, 8) and condition.w_embedding.shape == (2, 8)
    assert torch.equal(latents, method.inputs(frozen, batch)[0])  # the VAE draw is seeded per sample
    assert ((2 <= condition.w) & (condition.w <= 4)).all()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])

    def output(w, model=student):
        w = torch.full((2,), float(w))
        cond = GuidedCondition(condition.text, condition.empty_text, w, guidance_embedding(w, 8))
        with torch.no_grad():
            return method.network(model, z, t, cond), cond

    # The guidance projection starts at zero: the student is the teacher, whatever w.
    with torch.no_grad():
        teacher_output = teacher.unet(z, t, encoder_hidden_states=condition.text).sample
    torch.testing.assert_close(output(7)[0], teacher_output, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 1.0)
    assert (output(2)[0] - output(6)[0]).abs().max() > 1e-3  # w changes what the student computes
    assert torch.isfinite(output(1)[0]).all()  # w = 1 (no guidance) embeds 0

    # pipe(guidance_scale=w) is the trained w: one LCM step from z at t = 999 is the consistency function there.
    pipeline = text_to_image_pipeline(teacher.pipeline, student, consistency_scheduler(teacher.schedule, "epsilon",
                                                                                      10, 10.0))
    assert isinstance(pipeline, LatentConsistencyModelPipeline)
    for w in (1.0, 5.0):
        _, cond = output(w)
        with torch.no_grad():
            expected = method.consistency(student, z, torch.full((2,), 999), cond)
            sampled = pipeline(prompt=batch["caption"], latents=z, num_inference_steps=1, guidance_scale=w,
                               output_type="latent").images
        torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-4)

    # w = 1: the teacher's guided prediction is its conditional one (one pass), and the loss is finite.
    calls = []
    frozen.unet.register_forward_hook(lambda module, args, result: calls.append(args[0].shape[0]))
    one = LatentConsistencyDistillation(teacher.schedule, student, LatentConsistencyConfig(num_solver_steps=10,
                                                                                          w_min=1.0, w_max=1.0))
    terms = one(student, frozen, batch)
    assert calls == [2] and torch.isfinite(terms["cd_huber"]) and terms["cd_huber"].requires_grad
    calls.clear()
    method(student, frozen, batch)
    assert calls == [4]  # guided: the empty prompt and the captions in one doubled batch


def test_anchored_lcm_target_is_the_guided_teachers_solve(sd_teacher, monkeypatch):
    """anchor_below selects each sample's text, w and guidance embedding for the teacher's guided solve to t = 0."""
    import vlkd.diffusion.consistency as cd
    from vlkd import rng

    teacher, student, method, frozen = lcm_setup(sd_teacher, num_solver_steps=10, w_min=2.0, w_max=6.0,
                                                 anchor_below=999)
    batch = shapes_batch()
    seen = {}
    monkeypatch.setattr(cd, "consistency_loss", lambda prediction, target, *_: seen.setdefault("target", target))
    method(student, frozen, batch)

    latents, condition = method.inputs(frozen, batch)
    assert condition.w[0] != condition.w[1]  # a mix-up of the two samples' guidance would show
    t, _ = method.training_pair(batch, latents.device)
    z = teacher.schedule.add_noise(latents, rng.randn(batch, latents.shape[1:], "noise", latents.device), t)
    for i in range(2):  # each sample alone, one grid interval (100 timesteps) at a time
        zi, ti, ci = z[i:i + 1], t[i:i + 1], cd.select_samples(condition, torch.tensor([i]))
        with torch.no_grad():
            while ti.item() > 0:
                x0, eps = method.teacher_x0_eps(frozen, zi, ti, ci)
                ti = (ti - 100).clamp(min=0)
                zi = teacher.schedule.ddim_step(x0, eps, ti)
        torch.testing.assert_close(seen["target"][i:i + 1], zi, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", [None, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                              "ff.net.2", "conv1", "conv2", "time_emb_proj"]],
                         ids=["attention", "lcm-lora-shapes"])
def test_lora_weights_round_trip_through_load_lora_weights(sd_teacher, tmp_path, targets):
    """The default adapters, and those of pipelines/lcm-lora-shapes.yaml (convolutions too), load as trained."""
    from diffusers import StableDiffusionPipeline

    from vlkd.diffusion.export import LoraStudent, consistency_scheduler
    from vlkd.diffusion.lcm import LoRAStudentConfig, lora_student
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher

    teacher = load_text_to_image_teacher(sd_teacher)
    config = LoRAStudentConfig(rank=4, alpha=8, **({"target_modules": targets} if targets else {}))
    student = lora_student(teacher.unet, config)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in student.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for parameter in trainable:  # B starts at zero: make the adapters do something
            parameter.normal_(0, 0.2)
    LoraStudent(student, StableDiffusionPipeline, consistency_scheduler(teacher.schedule, "epsilon", 10, 10.0)
                ).save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    fresh = StableDiffusionPipeline.from_pretrained(sd_teacher, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(tmp_path / "lora")
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 19]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = student.eval()(z, t, encoder_hidden_states=text).sample
        loaded = fresh.unet(z, t, encoder_hidden_states=text).sample
        student.disable_adapters()
        base = student(z, t, encoder_hidden_states=text).sample
        student.enable_adapters()
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=0)


def test_sd_lcm_distills_exports_and_samples_without_vlkd(tmp_path, sd_teacher, capsys):
    out = tmp_path / "student"
    assert main(["distill", recipe(tmp_path, sd_teacher, "lcm"), "--out", str(out), *TINY]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["method"] == "lcm" and info["pipeline"] == "LatentConsistencyModelPipeline"
    assert info["guidance"] == {"w_min": 2.0, "w_max": 4.0} and info["guidance_scale"] == 3.0
    assert info["num_solver_steps"] == 10 and info["steps"] == 2 and info["teacher"]["sdxl"] is False
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 10
    assert scheduler["timestep_scaling"] == 10.0 and scheduler["prediction_type"] == "epsilon"
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 8
    assert "guidance_scale=3.0" in (out / "README.md").read_text()
    assert len(list(out.glob("samples/student-step0000002-*steps.png"))) == 2
    assert not (tmp_path / "student.run").exists()
    history = [json.loads(line) for line in (out / "training" / "student-history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2] and all(row["cd_huber"] > 0 for row in history)

    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r})
        pipe.set_progress_bar_config(disable=True)
        images = pipe(["a small red star", "a big blue circle"], num_inference_steps=4, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1, images.shape
        print(type(pipe).__name__, type(pipe.scheduler).__name__)
        assert not any(m == "vlkd" or m.startswith("vlkd.") for m in sys.modules), "vlkd was imported"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "LatentConsistencyModelPipeline LCMScheduler"

    capsys.readouterr()
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), "--prompt", "a red star", "--num", "2", "--out", str(grid)]) == 0
    assert grid.is_file() and "2 steps" in capsys.readouterr().out
    assert main(["sample", str(out), "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt" in one_error_line(capsys)


def test_sdxl_lcm_lora_distills_and_loads_as_its_model_card_says(tmp_path, sdxl_teacher, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "student"
    measured = ["--set", "eval.enabled=true", "--set", "eval.steps=[1]", "--set", "eval.num_samples=4",
                "--set", "eval.batch_size=4", "--set", "eval.features=[digits-classifier]"]
    assert main(["distill", recipe(tmp_path, sdxl_teacher, "lcm-lora"), "--out", str(out), *TINY, *measured]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["method"] == "lcm-lora" and info["pipeline"] == "StableDiffusionXLPipeline"
    assert info["base_model"] == str(sdxl_teacher) and info["lora"]["rank"] == 4 and info["guidance_scale"] == 1.0
    assert info["teacher"]["sdxl"] is True
    assert [(row["steps"], row["num_samples"]) for row in info["metrics"]] == [(1, 4)]  # measured as it loads
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any("lora_B" in key or "lora.up" in key for key in weights)
    assert all(key.startswith("unet.") for key in weights)
    assert max(value.abs().max() for key, value in weights.items() if "lora_B" in key or "lora.up" in key) > 0

    # The model card's code, run as written (with the folder filled in), gives the exported student.
    card = (out / "README.md").read_text()
    assert f'pipe(["{info["example_prompt"]}"] * 4' in card and "--prompt 'a " in card  # a training caption
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("PATH/TO/THIS/FOLDER", str(out))
    assert "pipe.load_lora_weights" in code and "LCMScheduler.from_config" in code
    code = code.replace('images[0].save("sample.png")', "")
    namespace = {}
    exec(code.replace("] * 4", "] * 1").replace("num_inference_steps=2", "num_inference_steps=1"), namespace)
    pipe = namespace["pipe"]
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.scheduler.config.original_inference_steps == 10
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    pipe.scheduler.set_timesteps(4)
    from diffusers import LCMScheduler

    exported = LCMScheduler.from_config(saved)
    exported.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == exported.timesteps.tolist()
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, exported.alphas_cumprod)

    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "a red star", "--num", "2", "--steps", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("style, pipeline", [("sdxl", "lcm"), ("sd", "lcm-lora")])
def test_other_pairings_distill(tmp_path, request, style, pipeline):
    teacher = request.getfixturevalue(f"{style}_teacher")
    out = tmp_path / "student"
    # The full student also deepens its transformers here, so the recipe key reaches the exported UNet.
    deeper = ["--set", "student.transformer_layers_per_block=2"] if pipeline == "lcm" else []
    assert main(["distill", recipe(tmp_path, teacher, pipeline), "--out", str(out), *TINY, *deeper]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    expected = {("sdxl", "lcm"): "StableDiffusionXLPipeline", ("sd", "lcm-lora"): "StableDiffusionPipeline"}
    assert info["pipeline"] == expected[(style, pipeline)]
    if deeper:
        assert json.loads((out / "unet" / "config.json").read_text())["transformer_layers_per_block"] == 2


def test_a_deeper_student_starts_as_the_teacher_and_can_learn(sd_teacher, tmp_path):
    """New transformer blocks start as identities (the student computes the teacher's output exactly), train,
    and survive diffusers' save and load; a student shallower than its teacher is refused."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    from vlkd.diffusion.lcm import LCMStudentConfig, lcm_student
    from vlkd.diffusion.text_teacher import load_text_to_image_teacher
    from vlkd.errors import RecipeError

    teacher = load_text_to_image_teacher(sd_teacher)
    student = lcm_student(teacher.unet, LCMStudentConfig(8, transformer_layers_per_block=3)).eval()
    blocks = [m for m in student.modules() if isinstance(m, BasicTransformerBlock)]
    teacher_blocks = [m for m in teacher.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 3 * len(teacher_blocks) > 0
    new = [m for name, m in student.named_modules() if isinstance(m, BasicTransformerBlock)
           and not name.endswith("transformer_blocks.0")]
    assert len(new) == 2 * len(teacher_blocks)
    assert all(m.ff.net[-1].weight.abs().max() == 0 and m.attn2.to_out[0].weight.abs().max() == 0 for m in new)
    assert all(m.attn1.to_out[0].weight.abs().max() == 0 and m.attn1.to_out[0].bias.abs().max() == 0 for m in new)
    assert all(m.attn1.to_q.weight.abs().max() > 0 for m in new)  # only the output projections start at zero

    torch.manual_seed(0)
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 259]), torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = teacher.unet(z, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(student(z, t, text, timestep_cond=torch.randn(2, 8)).sample, expected,
                               atol=1e-6, rtol=1e-5)

    student(z, t, text, timestep_cond=torch.randn(2, 8)).sample.square().mean().backward()
    assert all(m.ff.net[-1].weight.grad.abs().max() > 0 for m in new)  # the new blocks learn from the first step
    with torch.no_grad():
        for m in new:
            m.ff.net[-1].weight.normal_(0, 0.1)
        moved = student(z, t, text, timestep_cond=torch.zeros(2, 8)).sample
    assert (moved - expected).abs().max() > 1e-3
    student.save_pretrained(tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, t, text, timestep_cond=torch.zeros(2, 8)).sample, moved)

    deep_teacher = UNet2DConditionModel.from_config(teacher.unet.config, transformer_layers_per_block=2)
    with pytest.raises(RecipeError, match="shallower than the teacher"):
        lcm_student(deep_teacher, LCMStudentConfig(8, transformer_layers_per_block=1))
    with pytest.raises(RecipeError, match="transformer_layers_per_block must be at least 1"):
        LCMStudentConfig(transformer_layers_per_block=0)


def test_the_encoder_cache_trains_as_the_encoders_do_and_is_read_back(tmp_path, sdxl_teacher, monkeypatch):
    """Cached VAE posteriors and text states (pooled ones too, SDXL) give the uncached run's losses; a later run
    reads them back and never runs the VAE encoder."""
    from diffusers import AutoencoderKL

    def history(out):
        lines = (out / "training" / "student-history.jsonl").read_text().splitlines()
        return [json.loads(line)["cd_huber"] for line in lines]

    pool = {"pool_size": 4, "cache_dir": str(tmp_path / "cache")}
    live = tmp_path / "live"
    assert main(["distill", recipe(tmp_path, sdxl_teacher, "lcm", **pool), "--out", str(live), *TINY]) == 0
    cached = tmp_path / "cached"
    assert main(["distill", recipe(tmp_path, sdxl_teacher, "lcm", cache="true", **pool), "--out", str(cached),
                 *TINY]) == 0
    # Equal up to float summation order: the cache encoded the pool in pool-order batches, the live run in training
    # order (a wrong or misaligned cached row changes the loss by far more than this).
    assert history(cached) == pytest.approx(history(live), rel=1e-4, abs=1e-6)
    info = json.loads((cached / "vlkd.json").read_text())["cache"]
    assert info["rows"] == 4 and (tmp_path / "cache" / Path(info["folder"]).name / "meta.json").is_file()
    assert json.loads((live / "vlkd.json").read_text())["cache"] is None

    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE encoder ran although its outputs are cached")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encoding)
    again = tmp_path / "again"
    assert main(["distill", recipe(tmp_path, sdxl_teacher, "lcm", cache="true", **pool), "--out", str(again),
                 *TINY]) == 0
    assert history(again) == history(cached)


@pytest.mark.parametrize("case, words", [
    ("no-text-encoder", "names no text_encoder"),
    ("no-vae", "names no vae"),
    ("cross-attention", "cross_attention_dim"),
    ("guidance-below-1", "w_min"),
    ("no-captions", "has no captions"),
    ("fidelity-not-shapes", "eval.fidelity judges images against shapes captions"),
    ("fidelity-too-many", "eval.num_samples is 2001"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path, sd_teacher, capsys, case, words):
    folder, method, data = tmp_path / "teacher", {}, "shapes:32"
    if case in ("no-text-encoder", "no-vae"):
        shutil.copytree(sd_teacher, folder)
        index = json.loads((folder / "model_index.json").read_text())
        del index["text_encoder" if case == "no-text-encoder" else "vae"]
        (folder / "model_index.json").write_text(json.dumps(index))
    elif case == "cross-attention":
        save_teacher(folder, cross_attention_dim=48)
    else:
        folder = sd_teacher
        method = {"w_min": 0.5} if case == "guidance-below-1" else {}
        data = "digits:32" if case in ("no-captions", "fidelity-not-shapes") else data
    argv = ["distill", recipe(tmp_path, folder, "lcm", data=data, **method), "--out", str(tmp_path / "out"), *TINY]
    if case.startswith("fidelity"):
        argv += ["--set", "eval.fidelity=true"]
        argv += ["--set", "eval.num_samples=2001"] if case == "fidelity-too-many" else []
    capsys.readouterr()  # saving a teacher shows transformers' progress bars
    assert main(argv) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, pipeline, teacher", [
    ("lcm-sd15", "lcm", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("lcm-lora-sdxl", "lcm-lora", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("lcm-shapes", "lcm", "assets/teachers/t2i-shapes"),
    ("lcm-lora-shapes", "lcm-lora", "assets/teachers/t2i-shapes"),
])
def test_shipped_recipes_parse(name, pipeline, teacher):
    from vlkd.recipes import load_recipe

    recipe_ = load_recipe(REPO / "pipelines" / f"{name}.yaml")
    assert recipe_.pipeline == pipeline and recipe_.teacher == teacher
    assert 1 <= recipe_.method.w_min <= recipe_.method.w_max


@pytest.mark.parametrize("name", ["lcm-shapes", "lcm-lora-shapes"])
def test_shapes_recipes_fit_the_t2i_teacher_and_its_evaluation(name):
    """The recipe names the folder the t2i-shapes training script writes, trains on its data from a cached pool,
    and measures prompt fidelity at the counts it trains for."""

    from vlkd.diffusion.lcm_runner import _check_fidelity
    from vlkd.recipes import load_recipe

    recipe_ = load_recipe(REPO / "pipelines" / f"{name}.yaml")
    script = load_script("train_teacher_t2i")
    assert script.parse_args([]).out == recipe_.teacher
    assert recipe_.data == "shapes:32" and _check_fidelity(recipe_) == "shapes:32"
    assert recipe_.method.pool_size and recipe_.method.cache and recipe_.method.w_max <= 8
    assert recipe_.eval.fidelity and recipe_.eval.enabled and recipe_.eval.features == ["inception"]
    assert recipe_.eval.steps == recipe_.method.student_steps == [1, 2, 4, 8] and recipe_.eval.num_samples == 1000
    assert recipe_.train.steps >= 1000 and recipe_.train.steps % recipe_.train.checkpoint_every == 0
    if recipe_.pipeline == "lcm-lora":
        assert recipe_.method.sample_guidance_scale == 1.0 and recipe_.student.rank in (16, 32)
    else:  # the anchor and schedule its README figures were measured with: every pair, up to the grid's top
        assert recipe_.method.anchor_below == 999 and recipe_.method.anchor_skip == 10
        assert recipe_.method.sampling_focus == 0.0  # uniform pairs; the focused run is a kept report
        assert (recipe_.train.steps, recipe_.train.lr_schedule) == (3600, "cosine")
        assert (recipe_.method.w_min, recipe_.method.w_max, recipe_.method.guidance_scale) == (1.5, 3.0, 2.0)


def test_fidelity_is_refused_for_pipelines_without_prompts():
    from vlkd.errors import RecipeError
    from vlkd.recipes import load_recipe

    with pytest.raises(RecipeError, match="eval.fidelity measures text-to-image students .*'consistency'"):
        load_recipe(REPO / "pipelines" / "consistency-digits.yaml", ["eval.fidelity=true"])


def test_fidelity_eval_samples_the_test_captions_and_records_fidelity(tmp_path, sd_teacher, monkeypatch):
    """eval.fidelity: the student samples the first eval.num_samples shapes test captions, in order, once per step
    count; FD is against the whole test split and the rows of each step count carry its prompt fidelity."""
    from vlkd.diffusion import sample
    from vlkd.eval.fidelity import shapes_prompts

    sampled = []

    def recording(pipeline, num, steps, seed=0, prompts=None, guidance_scale=None):
        sampled.append((steps, list(prompts)))
        return sample_images(pipeline, num, steps, seed=seed, prompts=prompts, guidance_scale=guidance_scale)

    sample_images = sample.sample_images
    monkeypatch.setattr(sample, "sample_images", recording)  # where the harness's PipelineSource finds it
    out = tmp_path / "student"
    measured = ["--set", "eval.enabled=true", "--set", "eval.fidelity=true", "--set", "eval.steps=[1, 2]",
                "--set", "eval.num_samples=4", "--set", "eval.batch_size=4",
                "--set", "eval.features=[digits-classifier]"]
    assert main(["distill", recipe(tmp_path, sd_teacher, "lcm-lora"), "--out", str(out), *TINY, *measured]) == 0
    captions = shapes_prompts(4).captions
    assert sampled[-2:] == [(1, captions), (2, captions)]  # after the training grids' calls, the evaluation's
    rows = json.loads((out / "vlkd.json").read_text())["metrics"]
    assert sorted(row["steps"] for row in rows) == [1, 2]
    for row in rows:
        assert row["features"] == "digits-classifier" and row["fd"] > 0
        assert (row["reference"], row["num_reference"], row["num_samples"]) == ("shapes:32@test", 2000, 4)
        for key in ("fidelity", "shape_accuracy", "color_accuracy"):
            assert 0 <= row[key] <= 1
        assert row["fidelity"] <= min(row["shape_accuracy"], row["color_accuracy"])
    assert "| 1 | digits-classifier |" in (out / "README.md").read_text()  # the card still reads the rows


def test_shapes_lcm_student_is_measured_at_the_teachers_chosen_guidance():
    """The shipped teacher's evaluation chose its guidance scale; the LCM student samples and is judged at it."""
    import json

    from vlkd.recipes import load_recipe

    recipe_ = load_recipe(REPO / "pipelines" / "lcm-shapes.yaml")
    chosen = json.loads((REPO / recipe_.teacher / "metrics.json").read_text())["guidance"]["chosen"]
    assert recipe_.method.guidance_scale == chosen and recipe_.method.w_min <= chosen <= recipe_.method.w_max
