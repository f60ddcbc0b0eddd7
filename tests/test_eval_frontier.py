"""`vlkd eval frontier`: teacher (DDIM, DPM-Solver++) and students measured at the same points, as a table, JSON and
plots; a progressive student brings its rounds."""

import json

import pytest
from test_diffusion_runner import TINY, recipe, save_teacher

from vlkd.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    teacher = save_teacher(root / "teacher")
    assert main(["distill", recipe(root, teacher, "progressive", teacher_steps=4, student_steps=1), "--out",
                 str(root / "progressive"), *TINY, "--set", "eval.enabled=false"]) == 0
    assert main(["distill", recipe(root, teacher, "consistency", num_solver_steps=10), "--out",
                 str(root / "consistency"), *TINY, "--set", "eval.enabled=false"]) == 0
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path_factory.getbasetemp() / "vlkd-cache"))


def test_frontier_measures_teacher_and_students_at_the_same_points(folders, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "frontier", "--teacher", str(folders / "teacher"), "--students",
                 f"{folders / 'progressive'},{folders / 'consistency'}", "--steps", "1,2", "--teacher-steps", "4",
                 "--num", "8", "--batch-size", "8", "--features", "digits-classifier", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "frontier.json").read_text())
    points = {(row["model"], row["sampler"].split(" ")[0], row["steps"]) for row in result["rows"]}
    assert points == {("teacher", "ddim", 1), ("teacher", "ddim", 2), ("teacher", "ddim", 4),
                      ("teacher", "dpm-solver++", 1), ("teacher", "dpm-solver++", 2),
                      ("progressive", "student", 1), ("progressive", "student", 2),  # the final student and round 1
                      ("consistency", "student", 1), ("consistency", "student", 2)}
    assert result["reference"] == "digits:8@all"  # taken from the students' recipe
    assert all(row["num_samples"] == 8 and row["fd"] >= 0 for row in result["rows"])
    # No recorded configuration with this teacher: the best candidate at 4 steps was searched for and used.
    from vlkd.eval.frontier import DPM_SOLVER_CANDIDATES

    assert result["dpm_solver"] in DPM_SOLVER_CANDIDATES
    assert (out / "frontier-digits-classifier.png").stat().st_size > 1000
    assert "| progressive | student | 2 |" in printed and "| progressive | student | 2 |" in (out / "frontier.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["--dpm-solver", "fancy"], "--dpm-solver 'fancy'"),
    (["--steps", "1,two"], "--steps '1,two'"),
    (["--steps", "0"], "at least 1"),
])
def test_bad_frontier_arguments_are_one_line(folders, capsys, argv, words):
    assert main(["eval", "frontier", "--teacher", str(folders / "teacher"), "--reference", "digits:8@all", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_steps_to_the_next_point_of_its_grid(prediction):
    """diffusers' DDIMScheduler steps to t - 1000 // K (off a trailing grid when K does not divide 1000); vlkd's
    goes to the next grid point, and equals diffusers' where the two agree."""
    import torch
    from diffusers import DDIMScheduler

    from vlkd.eval.frontier import ddim_scheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction,
              "clip_sample": False, "timestep_spacing": "trailing"}
    ours, stock = ddim_scheduler(config), DDIMScheduler.from_config(config)
    sample, output = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for steps in (4, 256):
        ours.set_timesteps(steps)
        stock.set_timesteps(steps)
        assert torch.equal(ours.timesteps, stock.timesteps)
        t, t_next = int(ours.timesteps[1]), int(ours.timesteps[2])
        mine = ours.step(output, t, sample).prev_sample
        alpha, alpha_next = ours.alphas_cumprod[t], ours.alphas_cumprod[t_next]
        x0 = {"epsilon": (sample - (1 - alpha).sqrt() * output) / alpha.sqrt(), "sample": output,
              "v_prediction": alpha.sqrt() * sample - (1 - alpha).sqrt() * output}[prediction]
        eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        assert torch.allclose(mine, alpha_next.sqrt() * x0 + (1 - alpha_next).sqrt() * eps, atol=1e-5)
        if steps == 4:  # 4 divides 1000: the same step as diffusers'
            assert torch.allclose(mine, stock.step(output, t, sample).prev_sample, atol=1e-6)
        else:  # t - 1000 // 256 = t - 3 is not the next grid point (t - 4 here): diffusers' step differs
            assert t - t_next != 1000 // steps
            assert not torch.allclose(mine, stock.step(output, t, sample).prev_sample, atol=1e-4)
    # the last step lands on the clean sample
    ours.set_timesteps(4)
    last = int(ours.timesteps[-1])
    assert torch.allclose(ours.step(output, last, sample).pred_original_sample,
                          ours.step(output, last, sample).prev_sample, atol=1e-5)


def test_teacher_rows_are_reused_only_when_comparable_and_rechecked(folders, tmp_path, capsys):
    """--teacher-rows copies the teacher's rows of an earlier run after measuring its fewest-step point again."""
    common = ["eval", "frontier", "--teacher", str(folders / "teacher"), "--students", str(folders / "consistency"),
              "--steps", "1,2", "--num", "8", "--batch-size", "8", "--features", "digits-classifier"]
    assert main([*common, "--teacher-steps", "4", "--out", str(tmp_path / "first")]) == 0
    earlier = json.loads((tmp_path / "first" / "frontier.json").read_text())
    assert main([*common, "--teacher-rows", str(tmp_path / "first" / "frontier.json"),
                 "--out", str(tmp_path / "second")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "second" / "frontier.json").read_text())
    teacher = [row for row in result["rows"] if row["model"] == "teacher"]
    assert {(row["sampler"].split(" ")[0], row["steps"]) for row in teacher} == {
        ("ddim", 1), ("ddim", 2), ("dpm-solver++", 1), ("dpm-solver++", 2)}  # only the points this run asks for
    assert all(row in earlier["rows"] for row in teacher)
    recheck = result["teacher_rows"]["recheck"]["ddim-1 digits-classifier"]
    assert recheck["now"] == pytest.approx(recheck["earlier"], rel=1e-6)
    assert "taken from an earlier run" in (tmp_path / "second" / "frontier.md").read_text()

    # A teacher figure that the same measurement no longer reproduces, other settings, a missing point: refused.
    tampered = {**earlier, "rows": [{**row, "fd": row["fd"] * 1.01} if row["model"] == "teacher" else row
                                    for row in earlier["rows"]]}
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    for argv, words in [(["--teacher-rows", str(tmp_path / "tampered.json")], "not comparable"),
                        (["--teacher-rows", str(tmp_path / "first" / "frontier.json"), "--seed", "1"], "seed 0"),
                        (["--teacher-rows", str(tmp_path / "first" / "frontier.json"), "--teacher-steps", "8"],
                         "lacks teacher point"),
                        (["--teacher-rows", str(tmp_path / "nothing.json")], "not a frontier JSON")]:
        assert main([*common, *argv]) == 2
        err = capsys.readouterr().err  # the recheck's progress bars come first
        assert "Traceback" not in err and words in err.strip().splitlines()[-1], err
