"""scripts/bench_lcm_seeds.py: the student and the teacher's DDIM measured seed by seed from the same noise, each at
its own guidance scale and with its own sampler, and the table's means, spreads and paired gaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from script_modules import load_script

from vlkd.eval.fidelity import shapes_prompts, shapes_validation

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "assets" / "teachers" / "t2i-shapes"


def test_both_sides_are_measured_per_seed_and_summarised(tmp_path, monkeypatch):
    module = load_script("bench_lcm_seeds")
    # A stand-in student: the shipped teacher's folder with a run record whose guidance differs from the teacher's.
    student = tmp_path / "student"
    shutil.copytree(TEACHER, student, ignore=shutil.ignore_patterns("metrics.json", "training.json", "README.md"))
    (student / "vlkd.json").write_text(json.dumps({"guidance_scale": 3.5}))
    calls, judges = [], set()

    def fake_measure(pipeline, steps, seed, guidance_scale, prompts, reference, config, judge):
        spacing = getattr(pipeline.scheduler.config, "timestep_spacing", None)
        assert reference == "shapes:32@test" and prompts.captions == shapes_prompts(8).captions
        calls.append((type(pipeline.scheduler).__name__, spacing, steps, seed, guidance_scale, len(prompts.captions),
                      config.num_samples))
        judges.add(id(judge))
        is_student = guidance_scale == 3.5
        return {"fid": 30.0 + seed / 10 - (0.5 if is_student else 0.0), "fidelity": 0.9 + (0.01 if is_student else 0)}

    monkeypatch.setattr(module, "measure", fake_measure)
    out = tmp_path / "seeds.md"
    module.main(["--student", str(student), "--teacher", str(TEACHER), "--seeds", "0,10", "--num", "8",
                 "--batch-size", "4", "--out", str(out)])

    chosen = json.loads((TEACHER / "metrics.json").read_text())["guidance"]["chosen"]
    own = json.loads((student / "scheduler" / "scheduler_config.json").read_text())  # the student keeps its own
    mine = (own["_class_name"], own.get("timestep_spacing", "leading"))
    assert calls == [(*mine, 4, 0, 3.5, 8, 8), ("DDIMScheduler", "trailing", 4, 0, chosen, 8, 8),
                     (*mine, 4, 10, 3.5, 8, 8), ("DDIMScheduler", "trailing", 4, 10, chosen, 8, 8)]
    assert len(judges) == 1  # the judge is loaded once for every seed and model
    text = out.read_text()
    assert "| 0 | 3.5 | 30.000 | 29.500 | -0.500 | 0.900 | 0.910 | 0.010 |" in text
    assert "| 10 | 3.5 | 31.000 | 30.500 | -0.500 | 0.900 | 0.910 | 0.010 |" in text
    assert "| mean ± sd | 3.5 | 30.500 ± 0.707 | 30.000 ± 0.707 | -0.500 ± 0.000 |" in text
    assert "At guidance 3.5 the student is ahead in both FID and fidelity for 2 of 2 seeds." in text
    assert "one per shapes test caption, Inception FID against shapes:32@test (2,000 images)" in text
    assert f"- command: `python scripts/bench_lcm_seeds.py --student {student}" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["seed"] for row in saved["rows"]] == [0, 10] and saved["teacher_guidance"] == chosen


def test_student_scales_on_the_validation_split_share_the_teachers_measurement(tmp_path, monkeypatch):
    from vlkd.eval.fidelity import VALIDATION_STREAM

    module = load_script("bench_lcm_seeds")
    student = tmp_path / "student"
    shutil.copytree(TEACHER, student, ignore=shutil.ignore_patterns("metrics.json", "training.json", "README.md"))
    (student / "vlkd.json").write_text(json.dumps({"guidance_scale": 2.0}))
    calls, references = [], set()

    def fake_measure(pipeline, steps, seed, guidance_scale, prompts, reference, config, judge):
        # One reference, the validation images, handed to every measurement (its statistics cached after the first).
        references.add(id(reference))
        assert reference.dataset.seed == VALIDATION_STREAM and reference.count() == 2000
        assert prompts.captions == shapes_validation(8)[0].captions
        teacher = type(pipeline.scheduler).__name__ == "DDIMScheduler"
        calls.append(("teacher" if teacher else "student", seed, guidance_scale))
        return {"fid": 30.0 if teacher else 30.0 - guidance_scale / 10, "fidelity": 0.9 if teacher else 0.89}

    monkeypatch.setattr(module, "measure", fake_measure)
    out = tmp_path / "guidance.md"
    module.main(["--student", str(student), "--teacher", str(TEACHER), "--seeds", "0,10", "--num", "8",
                 "--batch-size", "4", "--split", "validation", "--student-guidance", "2,3", "--out", str(out)])
    chosen = json.loads((TEACHER / "metrics.json").read_text())["guidance"]["chosen"]
    assert calls == [("student", 0, 2.0), ("teacher", 0, chosen), ("student", 0, 3.0),
                     ("student", 10, 2.0), ("teacher", 10, chosen), ("student", 10, 3.0)]
    assert len(references) == 1
    text = out.read_text()
    assert "one per shapes validation caption, Inception FID against 2,000 images of shapes train stream 1" in text
    assert "| 10 | 3 | 30.000 | 29.700 | -0.300 | 0.900 | 0.890 | -0.010 |" in text
    assert "| mean ± sd | 2 | 30.000 ± 0.000 | 29.800 ± 0.000 | -0.200 ± 0.000 |" in text
    assert "At guidance 3 the student is ahead in both FID and fidelity for 0 of 2 seeds." in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["split"] == "validation" and saved["student_guidance"] == [2.0, 3.0] and len(saved["rows"]) == 4


def test_overlapping_seeds_and_missing_runs_are_one_line_errors(tmp_path):
    module = load_script("bench_lcm_seeds")
    with pytest.raises(SystemExit, match="space them at least 4 apart"):
        module.main(["--seeds", "0,2", "--out", str(tmp_path / "x.md")])
    with pytest.raises(SystemExit, match="no vlkd.json there; train and evaluate it first"):
        module.main(["--student", str(tmp_path), "--out", str(tmp_path / "x.md")])
