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
