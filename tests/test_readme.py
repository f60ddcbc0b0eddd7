"""The README as a user meets it: two one-line quick-start commands (the second is what CI runs), recipe YAML
that parses, a figures table copied from benchmarks/*.md, and Python snippets that run against outputs of the
shipped recipes (on a budget of a few optimizer steps)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlkd.bench import readme_figures
from vlkd.cli import main
from vlkd.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL)


def test_quick_start_has_two_one_line_commands_and_ci_runs_the_second():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```bash\n(.*?)^```", quick_start, re.MULTILINE | re.DOTALL)
    assert [len(c.strip().splitlines()) for c in commands] == [1, 1]
    assert "vlkd demo" in commands[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1].strip() in ci.splitlines() and "set -euo pipefail" in ci


def test_the_figures_table_is_copied_from_the_benchmark_files():
    table = README.split("<!-- figures:start", 1)[1].split("-->", 1)[1].split("<!-- figures:end -->", 1)[0]
    assert table.strip() == readme_figures().strip()


def test_the_frontier_table_is_copied_from_its_benchmark():
    table = README.split("<!-- frontier:start", 1)[1].split("-->", 1)[1].split("<!-- frontier:end -->", 1)[0]
    measured = (REPO / "benchmarks" / "frontier.md").read_text()
    assert table.count("\n| ") >= 19 and table.strip() in measured
    assert (REPO / "benchmarks" / "frontier-inception.png").is_file() and "benchmarks/frontier-inception.png" in README


def test_the_lcm_shapes_table_is_copied_from_its_report():
    table = README.split("<!-- lcm-shapes:start", 1)[1].split("-->", 1)[1].split("<!-- lcm-shapes:end -->", 1)[0]
    measured = (REPO / "benchmarks" / "lcm-shapes.md").read_text()
    assert table.count("\n| ") >= 11 and table.strip() in measured


def test_recipe_examples_parse(tmp_path):
    examples = [b for b in blocks("yaml") if b.startswith("pipeline:")]
    assert examples
    for number, text in enumerate(examples):
        path = tmp_path / f"example-{number}.yaml"
        path.write_text(text)
        load_recipe(path, [])  # raises on an unknown key or a wrong type


TINY = ["--set", "train.steps=1", "--set", "train.batch_size=8", "--set", "eval.enabled=false"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """runs/<recipe> for the three shipped recipes the snippets load, trained for one step each."""
    root = tmp_path_factory.mktemp("readme")
    for name, extra in (("progressive-digits", []), ("consistency-digits", []),
                        ("clip-shapes-fd", ["--set", "method.pool_size=16",
                                            "--set", f"method.cache_dir={root / 'cache'}"])):
        assert main(["distill", str(REPO / "pipelines" / f"{name}.yaml"), "--out", str(root / "runs" / name),
                     *TINY, *extra]) == 0
    # The LCM recipes name hub teachers; a tiny SD 1.x and a tiny SDXL pipeline stand in for them here.
    from lcm_fixtures import save_teacher

    for name, sdxl in (("lcm-sd15", False), ("lcm-lora-sdxl", True)):
        teacher = save_teacher(root / f"{name}-teacher", sdxl=sdxl)
        assert main(["distill", str(REPO / "pipelines" / f"{name}.yaml"), "--out", str(root / "runs" / name),
                     "--set", f"teacher={teacher}", "--set", "data=shapes:32", "--set", "method.image_size=32",
                     "--set", "train.mixed_precision=no", *TINY]) == 0
    return root


SNIPPETS = [b for b in blocks("python") if "runs/" in b]


@pytest.mark.parametrize("number", range(len(SNIPPETS)))
def test_python_snippets_run_without_vlkd(outputs, number):
    code = SNIPPETS[number] + "\nimport sys\nassert 'vlkd' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=outputs, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_python_snippet_is_run():
    assert len(SNIPPETS) == len(blocks("python")) >= 3
