"""scripts/report_reproduction.py: retrained teachers' figures beside the shipped ones, rows measured differently
refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from script_modules import load_script

REPO = Path(__file__).resolve().parent.parent
DDPM = REPO / "assets" / "teachers" / "ddpm-digits"


def _retrained_ddpm(tmp_path: Path, shift: float, **change) -> tuple[Path, Path]:
    """A fake retrained DDPM: its training.json, and a frontier.json of the shipped rows with FDs moved by ``shift``."""
    folder = tmp_path / "ddpm-digits"
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps({"training_minutes": 40.0, "machine": "x86_64, 2 threads"}))
    shipped = json.loads((DDPM / "metrics.json").read_text())["rows"]
    rows = [{**row, "fd": row["fd"] + shift, **change,
             "sampler": row["sampler"] if row["sampler"] == "ddim" else "dpm-solver++ (some configuration)"}
            for row in shipped if row["steps"] in (4, 16)]
    rows.append({**rows[0], "model": "a student"})  # not the teacher: left out
    frontier = tmp_path / "frontier.json"
    frontier.write_text(json.dumps({"rows": rows}))
    return folder, frontier


def test_report_sets_retrained_figures_beside_the_shipped_ones(tmp_path):
    module = load_script("report_reproduction")
    clip = tmp_path / "clip-shapes"
    clip.mkdir()
    metrics = json.loads((REPO / "assets" / "teachers" / "clip-shapes" / "metrics.json").read_text())
    metrics["zero_shot"]["shape"]["top1"] -= 0.01
    (clip / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(REPO / "assets" / "teachers" / "clip-shapes" / "training.json", clip / "training.json")
    ddpm, frontier = _retrained_ddpm(tmp_path, shift=0.5)
    out = tmp_path / "reproduction.md"
    module.main(["--clip", str(clip), "--ddpm", str(ddpm), "--ddpm-frontier", str(frontier), "--out", str(out)])

    text = out.read_text()
    assert "| shapes CLIP | zero-shot top1 shape | 99.95% | 98.95% | -1.00 points |" in text
    assert "| shapes CLIP | zero-shot top1 color | 100.00% | 100.00% | +0.00 points |" in text
    fid16 = next(row["fd"] for row in json.loads((DDPM / "metrics.json").read_text())["rows"]
                 if (row["sampler"], row["steps"], row["features"]) == ("ddim", 16, "inception"))
    assert f"| digits DDPM | FID, DDIM 16 steps | {fid16:.2f} | {fid16 + 0.5:.2f} | +0.50 " in text
    assert text.count("| digits DDPM |") == 6  # DDIM at 4 and 16 steps, DPM-Solver++ at 4; two feature spaces each
    assert "ddpm: 71.1 training minutes shipped" in text
    assert "40.0 training minutes retrained (x86_64, 2 threads)" in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 6 + 6


def test_report_refuses_rows_measured_differently(tmp_path):
    module = load_script("report_reproduction")
    ddpm, frontier = _retrained_ddpm(tmp_path, shift=0.0, num_samples=500)
    with pytest.raises(SystemExit, match="measured with"):
        module.main(["--ddpm", str(ddpm), "--ddpm-frontier", str(frontier), "--out", str(tmp_path / "r.md")])
    with pytest.raises(SystemExit, match="go together"):
        module.main(["--ddpm", str(ddpm), "--out", str(tmp_path / "r.md")])


def test_shipped_report_reproduces_every_teacher_within_the_stated_tolerance():
    """What the README states: DDPM FDs within 0.01, CLIP within one of 2,000 images, classifier within one of 300."""
    report = json.loads((REPO / "benchmarks" / "reproduction.json").read_text())
    tolerance = {"digits DDPM": 0.01, "shapes CLIP": 1 / 2000 + 1e-6, "digits classifier": 1 / 300 + 1e-6}
    rows = report["rows"]
    assert {row["model"] for row in rows} == set(tolerance)
    assert sum(row["model"] == "digits DDPM" and row["figure"].startswith("FID, DDIM") for row in rows) >= 4
    for row in rows:
        assert abs(row["retrained"] - row["shipped"]) <= tolerance[row["model"]], row


def test_report_says_when_a_training_time_was_not_recorded(tmp_path):
    module = load_script("report_reproduction")
    ddpm, frontier = _retrained_ddpm(tmp_path, shift=0.0)
    (ddpm / "training.json").write_text(json.dumps({"training_minutes": None, "resumed_at_step": 500,
                                                    "minutes_this_process": 30.0, "machine": "x86_64, 2 threads"}))
    out = tmp_path / "reproduction.md"
    module.main(["--ddpm", str(ddpm), "--ddpm-frontier", str(frontier), "--out", str(out)])
    assert ("resumed at step 500; 30.0 minutes from there to the end (the earlier leg did not record its time) "
            "retrained (x86_64, 2 threads)") in out.read_text()
