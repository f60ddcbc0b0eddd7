"""`vlkd distill` on the diffusion pipelines end to end, with a tiny random teacher and two optimizer steps."""

import json
import os
import shutil

import pytest
import torch

from vlkd import train
from vlkd.cli import main
from vlkd.diffusion import evaluate



TINY = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "eval.num_samples=8",
        "--set", "eval.batch_size=8"]


def save_teacher(folder, prediction="v_prediction", scheduler="DDPMScheduler", classes=None, channels=1):
    import diffusers
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=classes)
    config = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
    DDPMPipeline(unet=unet, scheduler=getattr(diffusers, scheduler)(**config)).save_pretrained(folder)
    path = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(path.read_text())
    data["prediction_type"] = prediction  # written by hand: some names are ones diffusers itself refuses
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "ddpm")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Reference statistics go to one cache per test module, not to the user's."""
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path_factory.getbasetemp() / "vlkd-cache"))


def recipe(tmp_path, teacher, pipeline, **method):
    lines = [f"pipeline: {pipeline}", f"teacher: {teacher}", "data: digits:8@all", "method:"]
    lines += [f"  {key}: {value}" for key, value in method.items()]
    lines += ["eval:", "  steps: [1, 2]", "  features: [digits-classifier]"]
    path = tmp_path / f"{pipeline}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlkd: error:"), err
    return err[0]


def test_progressive_end_to_end(tmp_path, teacher):
    out = tmp_path / "student"
    assert main(["distill", recipe(tmp_path, teacher, "progressive", teacher_steps=4, student_steps=1),
                 "--out", str(out), *TINY]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["method"] == "progressive" and info["steps"] == 1 and info["pipeline"] == "DDIMPipeline"
    assert info["teacher"]["path"] == str(teacher) and info["teacher"]["steps"] == 4
    measured = {(row["model"], row["steps"]) for row in info["metrics"]}
    assert measured == {(".", 1), ("rounds/steps-2", 2)}
    assert all(row["features"] == "digits-classifier" and row["num_samples"] == 8 and row["fd"] >= 0
               for row in info["metrics"])
    assert json.loads((out / "rounds" / "steps-2" / "vlkd.json").read_text())["steps"] == 2
    assert (out / "README.md").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert any(out.glob("samples/steps-1-step*-1steps.png"))
    assert (out / "samples" / "steps-1-final-1steps.png").is_file()
    assert not (tmp_path / "student.run").exists()  # the run folder goes once the output is complete
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["timestep_spacing"] == "trailing"
    # An existing output is refused without --overwrite.
    assert main(["distill", recipe(tmp_path, teacher, "progressive", teacher_steps=4, student_steps=1),
                 "--out", str(out), *TINY]) == 2


def test_progressive_round_steps_scale_sets_each_rounds_length(tmp_path, teacher):
    out = tmp_path / "student"
    assert main(["distill", recipe(tmp_path, teacher, "progressive", teacher_steps=8, student_steps=1),
                 "--out", str(out), *TINY, "--set", "method.round_steps_scale=[1.5,0.5,1]"]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert {name: row["optimizer_steps"] for name, row in info["training"].items()} == {
        "steps-4": 3, "steps-2": 1, "steps-1": 2}
    lengths = {path.name: len(path.read_text().splitlines()) for path in (out / "training").glob("*.jsonl")}
    assert lengths == {"steps-4-history.jsonl": 3, "steps-2-history.jsonl": 1, "steps-1-history.jsonl": 2}


def test_consistency_end_to_end(tmp_path, teacher):
    out = tmp_path / "student"
    assert main(["distill", recipe(tmp_path, teacher, "consistency", num_solver_steps=10),
                 "--out", str(out), *TINY]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["method"] == "consistency" and info["pipeline"] == "ConsistencyModelPipeline"
    assert info["num_solver_steps"] == 10 and info["step_counts"] == [1, 2, 4, 8] and info["steps"] == 8
    assert sorted(row["steps"] for row in info["metrics"]) == [1, 2]  # eval.steps picks what is measured
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 10


def test_progressive_resumes_from_checkpoints_and_finished_rounds(tmp_path, teacher, monkeypatch, capsys):
    path = recipe(tmp_path, teacher, "progressive", teacher_steps=8, student_steps=2)
    out, work = tmp_path / "student", tmp_path / "student.run"
    argv = ["distill", path, "--out", str(out), *TINY, "--set", "train.steps=4", "--set", "train.checkpoint_every=2",
            "--set", "eval.steps=[2, 4]"]
    real_call = evaluate.SampleGrids.__call__

    def crash_in_second_round(self, state):
        if self.name == "steps-2" and state.step == 3:
            raise RuntimeError("killed")
        real_call(self, state)

    monkeypatch.setattr(evaluate.SampleGrids, "__call__", crash_in_second_round)
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    capsys.readouterr()
    assert not out.exists() and (work / "stages" / "steps-4" / "vlkd.json").is_file()
    assert [p.name for p in (work / "train" / "steps-2" / "checkpoints").iterdir()] == ["step-00000002.pt"]
    monkeypatch.setattr(evaluate.SampleGrids, "__call__", real_call)

    assert main(argv) == 2  # an unfinished run is neither continued nor discarded silently
    assert "--resume" in one_error_line(capsys)
    changed = [*argv, "--resume", "--set", "method.weighting=snr_plus_one"]
    assert main(changed) == 2 and "method.weighting" in one_error_line(capsys)

    fits, real_fit = [], train.fit

    def counting_fit(method, student, dataset, config, run_dir, **kwargs):
        fits.append((os.path.basename(run_dir), kwargs["resume"]))
        return real_fit(method, student, dataset, config, run_dir, **kwargs)

    monkeypatch.setattr(train, "fit", counting_fit)
    assert main([*argv, "--resume"]) == 0
    assert fits == [("steps-2", True)]  # the finished round is skipped; the second continues from step 2
    history = (out / "training" / "steps-2-history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3, 4]
    assert {row["model"] for row in json.loads((out / "vlkd.json").read_text())["metrics"]} == {".", "rounds/steps-4"}
    assert not work.exists()


@pytest.mark.parametrize("case, words", [
    ("no-unet", "no UNet"),
    ("no-scheduler", "no scheduler"),
    ("index-without-scheduler", "names no scheduler"),
    ("flow-prediction", "prediction_type 'flow_prediction'"),
    ("edm-scheduler", "EDMEulerScheduler is not a DDPM-family"),
    ("epsilon-progressive", "epsilon"),
    ("not-halving", "not reachable by halving"),
    ("student-above-teacher", "must be smaller than teacher_steps"),
    ("round-steps-miscounted", "round_steps_scale [1.0, 1.0, 1.0] lists 3 but 4 -> 1 steps takes 2 rounds"),
    ("missing-teacher", "no such folder"),
    ("eval-step-not-a-round", "eval.steps 3"),
    ("unknown-features", "unknown features 'fancy'"),
])
def test_bad_inputs_are_one_line_exit_2(tmp_path, teacher, capsys, case, words):
    folder, method = tmp_path / "teacher", {"teacher_steps": 4, "student_steps": 1}
    if case in ("no-unet", "no-scheduler", "index-without-scheduler"):
        shutil.copytree(teacher, folder)
        if case == "no-unet":
            shutil.rmtree(folder / "unet")
        elif case == "no-scheduler":
            shutil.rmtree(folder / "scheduler")
        else:
            index = json.loads((folder / "model_index.json").read_text())
            del index["scheduler"]
            (folder / "model_index.json").write_text(json.dumps(index))
    elif case == "flow-prediction":
        save_teacher(folder, prediction="flow_prediction")
    elif case == "edm-scheduler":
        shutil.copytree(teacher, folder)
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "EDMEulerScheduler"}))
    elif case == "epsilon-progressive":
        save_teacher(folder, prediction="epsilon")
    else:
        folder = teacher if case != "missing-teacher" else tmp_path / "nowhere"
        method = {"not-halving": {"teacher_steps": 64, "student_steps": 3},
                  "student-above-teacher": {"teacher_steps": 4, "student_steps": 8}}.get(case, method)
    argv = ["distill", recipe(tmp_path, folder, "progressive", **method), "--out", str(tmp_path / "out"), *TINY]
    if case == "eval-step-not-a-round":
        argv += ["--set", "eval.steps=[3]"]
    if case == "round-steps-miscounted":
        argv += ["--set", "method.round_steps_scale=[1,1,1]"]
    if case == "unknown-features":
        argv += ["--set", "eval.features=[fancy]"]
    assert main(argv) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()


def test_epsilon_teacher_is_fine_for_a_v_prediction_student(tmp_path):
    teacher = save_teacher(tmp_path / "eps", prediction="epsilon")
    out = tmp_path / "student"
    argv = ["distill", recipe(tmp_path, teacher, "progressive", teacher_steps=2, student_steps=1), "--out", str(out),
            *TINY, "--set", "student.prediction_type=v_prediction", "--set", "eval.steps=[1]"]
    assert main(argv) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["prediction_type"] == "v_prediction" and info["teacher"]["prediction_type"] == "epsilon"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_class_conditional_teacher_with_ema_student(tmp_path):
    teacher = save_teacher(tmp_path / "conditional", classes=10)
    out = tmp_path / "student"
    argv = ["distill", recipe(tmp_path, teacher, "consistency", num_solver_steps=10), "--out", str(out), *TINY,
            "--set", "train.ema_decay=0.9", "--set", "train.checkpoint_every=1"]
    assert main(argv) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["class_conditional"] and info["teacher"]["num_classes"] == 10
    assert info["pipeline"] == "ConsistencyModelPipeline" and len(info["metrics"]) == 2
    assert len(list(out.glob("samples/student-step0000001-*steps.png"))) == 4  # grids at 1, 2, 4 and 8 steps


def test_teacher_layouts(tmp_path):
    """A bare UNet folder with its scheduler config beside it loads like a pipeline folder."""
    from vlkd.diffusion.teacher import load_teacher

    pipeline = save_teacher(tmp_path / "pipeline")
    bare = tmp_path / "bare"
    shutil.copytree(pipeline / "unet", bare)
    shutil.copy(pipeline / "scheduler" / "scheduler_config.json", bare)
    for folder in (pipeline, bare):
        teacher = load_teacher(folder)
        assert teacher.image_shape == (1, 8, 8) and teacher.prediction_type == "v_prediction"
        assert not any(p.requires_grad for p in teacher.unet.parameters())


# Seconds per optimizer step at batch 64, measured on this project's 2-core machine. Progressive (two teacher
# passes, a student pass with its backward; 2026-12-06): 85.4 training minutes for 5,600 steps at one thread, run
# side by side with the consistency recipe. Anchored consistency (teacher, target and student passes, plus the
# teacher's coarse solve for pairs below the anchor; 2026-12-07): 84.64 training minutes for 5,500 steps, alone at
# two threads.
SECONDS_PER_SAMPLE_STEP = {"progressive-digits": 85.4 * 60 / 5600 / 64, "consistency-digits": 84.64 * 60 / 5500 / 64}
EVALUATION_MINUTES = 2  # exports and 4 x 1,000 samples with digits-classifier FD: 0.8 and 0.5 minutes measured


@pytest.mark.parametrize("name", ["progressive-digits", "consistency-digits"])
def test_shipped_recipes_parse_and_fit_the_cpu_budget(name):
    """90 minutes on 2 CPU cores: training at the measured step time plus the evaluation."""
    from pathlib import Path

    from vlkd.diffusion.progressive import round_steps
    from vlkd.recipes import load_recipe

    path = Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.yaml"
    recipe = load_recipe(path)
    assert recipe.teacher == "assets/teachers/ddpm-digits"
    if name.startswith("prog"):
        rounds = round_steps(recipe.method.teacher_steps, recipe.method.student_steps)
        steps = sum(recipe.method.train_steps(index, recipe.train.steps) for index in range(len(rounds)))
    else:
        rounds, steps = [1], recipe.train.steps
    assert rounds[-1] == 1  # distilled down to one step
    minutes = steps * recipe.train.batch_size * SECONDS_PER_SAMPLE_STEP[name] / 60
    assert minutes + EVALUATION_MINUTES <= 90
    assert sorted(recipe.eval.steps) == [1, 2, 4, 8] and recipe.eval.num_samples == 1000
