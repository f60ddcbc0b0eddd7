"""The `vlkd` command: subcommands, one-line errors with exit code 2, tracebacks only on request."""

import os
import subprocess
import sys

import pytest

SUBCOMMANDS = ["demo", "distill", "sample", "eval", "export", "bench"]


def vlkd(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("VLKD_DEBUG", None) if env is None else None
    return subprocess.run([sys.executable, "-m", "vlkd", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=120)


def test_help_lists_the_six_subcommands():
    result = vlkd("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    result = vlkd(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: vlkd {name}")


def test_missing_recipe_is_one_line_exit_2(tmp_path):
    result = vlkd("distill", "does-not-exist.yaml", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does-not-exist.yaml" in lines[0]
    assert "Traceback" not in result.stderr


def test_misspelled_key_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: progressive\nteacher: t\ndata: digits:16\ntrian:\n  steps: 3\n")
    result = vlkd("distill", str(recipe))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'trian'" in lines[0] and str(recipe) in lines[0]


def test_debug_shows_the_traceback(tmp_path):
    for args, env in [(("--debug", "distill", "nope.yaml"), None), (("distill", "nope.yaml"), {"VLKD_DEBUG": "1"})]:
        result = vlkd(*args, env=env, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" in result.stderr and "RecipeError" in result.stderr


def test_bad_override_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: progressive\nteacher: t\ndata: digits:16\n")
    result = vlkd("distill", str(recipe), "--set", "train.steps=many")
    assert result.returncode == 2 and "'train.steps'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
