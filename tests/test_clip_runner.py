"""The clip-distill pipeline: a few steps lower FD, `vlkd distill` end to end, the shipped recipes, and the one-line
errors for bad input (each exits 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clip_fixtures import make_tiny_teacher

from vlkd.cli import main
from vlkd.clip.data import CaptionPool, ClipCollate
from vlkd.clip.losses import ClipLossMethod, build_loss
from vlkd.clip.models import ClipStudentConfig, build_student, image_tower_parameters, load_teacher
from vlkd.data import build_dataset
from vlkd.recipes import TrainConfig, load_recipe
from vlkd.train import fit

REPO = Path(__file__).resolve().parents[1]
TINY = """
pipeline: clip-distill
teacher: local-dir:{teacher}
data: shapes:32
student:
  embed_dim: 16
  vision_cfg: {{image_size: 32, patch_size: 8, width: 32, layers: 1, head_width: 16, mlp_ratio: 2.0}}
  text_cfg: {{width: 32, heads: 2, layers: 1, mlp_ratio: 2.0}}
method:
  losses: {{fd: 100, icl: 1, affinity_kl: {{weight: 1, temperature: 2}}}}
  inherit: true
  pool_size: 32
  reduce_captions: true
  cache_dir: {cache}
train: {{steps: 3, batch_size: 16, lr: 1e-3}}
eval: {{num_samples: 40, batch_size: 40}}
"""


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def write_recipe(tmp_path: Path, teacher_folder: Path, text: str = TINY) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(teacher=teacher_folder, cache=tmp_path / "cache", tmp=tmp_path))
    return path


def test_a_few_distillation_steps_lower_the_fd_loss(teacher_folder, tmp_path):
    teacher = load_teacher(f"local-dir:{teacher_folder}")
    student = build_student(ClipStudentConfig(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32,
                                                                        "layers": 1, "head_width": 16},
                                              text_cfg={"width": 32, "heads": 2, "layers": 1}), teacher)
    pool = CaptionPool(build_dataset("shapes:32", "train"), 64)
    collate = ClipCollate(teacher.tokenizer)
    method = ClipLossMethod([build_loss("fd")])
    fixed = collate([pool[i] for i in range(32)])

    def fd_loss() -> float:
        device = next(student.parameters()).device  # the loop moves both models to its device (CUDA if any)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fixed.items()}
        with torch.no_grad():
            return sum(v.item() for v in method(student, teacher.to(device), batch).values())

    before = fd_loss()
    fit(method, student, pool, TrainConfig(steps=6, batch_size=8, lr=5e-3), tmp_path / "run", teacher=teacher,
        collate_fn=collate)
    student.eval()
    assert fd_loss() < 0.5 * before


def test_vlkd_distill_end_to_end(teacher_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", str(write_recipe(tmp_path, teacher_folder)), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert {"open_clip_config.json", "open_clip_model.safetensors", "tokenizer.json", "transformers",
            "vlkd.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "vlkd.json").read_text())
    assert info["steps"] == 3 and info["cache"]["rows"] == 32 and info["inherit"]["left_out"] == []
    assert set(info["metrics"]["zero_shot"]) == {"shapes:32:shape", "shapes:32:color", "shapes:32:shape_color"}
    assert 0 <= info["metrics"]["zero_shot"]["shapes:32:shape_color"]["top1"] <= 1
    assert info["metrics"]["image_encoding_latency"]["student"]["batch_size"] == 64
    assert info["student"]["image_tower_fraction_of_teacher"] < 0.25
    assert info["export"]["projection_heads"] == "dropped"
    assert not out.with_name("out.run").exists()
    # The run again without --overwrite is refused; with it, replaced (the cache is read, not refilled).
    assert main(["distill", str(tmp_path / "recipe.yaml"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_vitb32_recipe_runs_with_a_local_stand_in_teacher(teacher_folder, tmp_path):
    out = tmp_path / "tiny"
    overrides = [f"teacher=local-dir:{teacher_folder}", "data=shapes:32", "method.pool_size=16",
                 f"method.cache_dir={tmp_path / 'cache'}", "student.vision_cfg.image_size=32",
                 "student.vision_cfg.patch_size=8", "student.vision_cfg.layers=1", "student.text_cfg.layers=1",
                 "train.steps=2", "train.batch_size=8", "train.mixed_precision='no'", "train.num_workers=0",
                 "eval.num_samples=16"]
    args = ["distill", str(REPO / "pipelines" / "clip-vitb32-to-tiny.yaml"), "--out", str(out)]
    assert main(args + [x for item in overrides for x in ("--set", item)]) == 0
    info = json.loads((out / "vlkd.json").read_text())
    assert info["student"]["text_mode"] == "shared-tokenizer" and info["export"]["transformers"]["class"] == "CLIPModel"
    assert info["student"]["model_cfg"]["text_cfg"]["vocab_size"] == 38  # the stand-in's word tokenizer


def test_the_shapes_recipe_student_is_at_most_a_quarter_of_the_teacher():
    recipe = load_recipe(REPO / "pipelines" / "clip-shapes-fd.yaml")
    assert recipe.method.text_mode == "locked" and recipe.teacher == "local-dir:assets/teachers/clip-shapes"
    folder = REPO / "assets" / "teachers" / "clip-shapes"
    if not (folder / "open_clip_config.json").is_file():
        pytest.skip("the shipped shapes CLIP teacher is not in assets/teachers yet")
    teacher = load_teacher(f"local-dir:{folder}")
    student = build_student(recipe.student, teacher, recipe.method.text_mode)
    assert image_tower_parameters(student) <= image_tower_parameters(teacher) / 4


LOCKED_BUILTIN = TINY.replace("student:\n", "student:\n  model: ViT-S-32\n").replace(
    "  inherit: true\n", "  inherit: true\n  text_mode: locked\n")
UNKNOWN_NAME = TINY.replace("student:\n  embed_dim: 16\n", "student:\n  model: ViT-S-33\n")
NO_EMBED_DIM = TINY.replace("  embed_dim: 16\n", "")
CSV_DATA = TINY.replace("data: shapes:32", "data: csv:{tmp}/images.csv")


@pytest.mark.parametrize("recipe, message", [
    (LOCKED_BUILTIN, "text_mode locked: the student's tokenizer (open_clip BPE, vocabulary 49408, context 77) "
                     "differs from the teacher's"),
    (UNKNOWN_NAME, "unknown open_clip student model 'ViT-S-33'; close names: ViT-S-32"),
    (TINY.replace("local-dir:{teacher}", "ViT-B-33:openai"),
     "unknown open_clip model 'ViT-B-33'; close names: ViT-B-32"),
    (NO_EMBED_DIM, "the inline student config has no embed_dim"),
    (CSV_DATA, "has no column 'title'"),
], ids=["locked-tokenizer", "unknown-student", "unknown-teacher", "no-embed-dim", "csv-without-captions"])
def test_bad_input_is_one_line_and_exit_2(teacher_folder, tmp_path, capsys, recipe, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "images.csv").write_text("filepath\na.png\n")  # images only, no caption column
    code = main(["distill", str(write_recipe(tmp_path, teacher_folder, recipe)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
