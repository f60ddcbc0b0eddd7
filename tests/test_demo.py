"""`vlkd demo --quick` end to end: the report's table is the harness's JSON, the students beat the teacher's DDIM at
their step count, the CLIP student is at most a quarter of the teacher's image tower, and everything it writes
opens; the exported folders load with diffusers and open_clip alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlkd.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def table_cells(report: str) -> dict[tuple[str, str], list[str]]:
    """The report's table: (model, steps) -> the cells of its row."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[(cells[0], cells[1])] = dict(zip(header, cells))
    return rows


def test_the_report_table_is_what_the_harness_measured(demo):
    results = json.loads((demo / "results.json").read_text())
    table = table_cells((demo / "report.md").read_text())
    assert len(table) == len(results["table"])
    for name in ("progressive", "consistency"):
        info = json.loads((demo / f"{name}-student" / "vlkd.json").read_text())
        for row in (r for r in info["metrics"] if r["model"] == "."):
            cells = table[(f"{name} student, {info['scheduler']}", str(row["steps"]))]
            assert cells["FD digits-classifier"] == f"{row['fd']:.2f}"
            assert cells["s/image"] == f"{row['seconds_per_image']:.4f}"
    clip = json.loads((demo / "clip-student" / "vlkd.json").read_text())
    for who, key in (("teacher", "teacher_zero_shot"), ("student", "zero_shot")):
        cells = table[(f"CLIP {who}", "-")]
        for spec, result in clip["metrics"][key].items():
            assert cells[f"top-1 {spec.rsplit(':', 1)[-1]} %"] == f"{100 * result['top1']:.2f}"
        assert cells["parameters"] == f"{clip[who]['image_tower_parameters']:,}"


def test_students_beat_the_teacher_at_their_steps_and_the_clip_student_is_small(demo):
    results = json.loads((demo / "results.json").read_text())
    fd = {(row["model"], row["steps"]): row["fd"]["digits-classifier"] for row in results["table"] if row["fd"]}
    teacher = fd[("teacher, ddim", 4)]
    students = {model: value for (model, steps), value in fd.items() if "student" in model and steps == 4}
    assert len(students) == 2 and all(value < teacher for value in students.values()), (teacher, students)
    clip = {row["model"]: row["parameters"] for row in results["table"] if row["model"].startswith("CLIP")}
    assert clip["CLIP student"] * 4 <= clip["CLIP teacher"]


def test_grids_plot_and_students_open_without_vlkd(demo):
    grids = sorted((demo / "grids").glob("*.png"))
    assert any(g.name.startswith("teacher-ddim-") for g in grids) and any("progressive" in g.name for g in grids)
    assert any("consistency" in g.name for g in grids)
    for image in [*grids, demo / "frontier.png"]:
        with Image.open(image) as opened:
            assert opened.size[0] > 32
    code = f"""
import sys, torch, open_clip
from diffusers import DiffusionPipeline
for name in ("progressive-student", "consistency-student"):
    pipe = DiffusionPipeline.from_pretrained({str(demo)!r} + "/" + name)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 1), images.shape
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + {str(demo)!r} + "/clip-student")
tokens = open_clip.get_tokenizer("local-dir:" + {str(demo)!r} + "/clip-student")(["a red circle."])
assert model.encode_text(tokens).shape[0] == 1
assert "vlkd" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
