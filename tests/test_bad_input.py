"""Bad input: each case is one line on stderr naming what was wrong and what to do, exit code 2, no traceback, and
nothing written or lost (every file that existed is unchanged; no output or run folder appears)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_fixtures import make_tiny_teacher
from PIL import Image
from safetensors.torch import load_file, save_file
from test_diffusion_runner import save_teacher

from vlkd.cli import main

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


class MarkerPickle:
    """Unpickling this object creates ``path``: proof that a loader ran code from a file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expect_error(tmp_path: Path, capsys, argv: list[str], *words: str, allowed_new: tuple[str, ...] = ()) -> str:
    """Run ``vlkd argv``: exit 2, one error line holding ``words``, and no file under ``tmp_path`` changed, lost
    or added (except paths starting with one of ``allowed_new``)."""
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    # Progress bars may precede it; the error is the last line, on a line of its own, and the only one.
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("vlkd: error: "), captured.err
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in captured.err + captured.out
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed or went"
    added = [k for k in after if k not in before and not k.startswith(allowed_new)]
    assert not added, added
    return lines[-1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "ddpm")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path_factory.getbasetemp() / "vlkd-cache"))


def write_recipe(tmp_path: Path, teacher: Path | str, data: str = "digits:8@all", **method) -> str:
    method = method or {"teacher_steps": 4, "student_steps": 1}
    lines = ["pipeline: progressive", f"teacher: {teacher}", f"data: {data}", "method:"]
    lines += [f"  {key}: {value}" for key, value in method.items()]
    lines += ["train: {steps: 2, batch_size: 8}", "eval: {enabled: false}"]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def distill(recipe: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["distill", recipe, "--out", str(tmp_path / "out"), *extra]


def copy_teacher(teacher: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(teacher, tmp_path / "teacher"))


def test_missing_teacher_path(tmp_path, capsys):
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, tmp_path / "nowhere"), tmp_path),
                 "nowhere", "no such folder")


def test_teacher_folder_without_a_unet(tmp_path, teacher, capsys):
    folder = copy_teacher(teacher, tmp_path)
    shutil.rmtree(folder / "unet")
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, folder), tmp_path), "no UNet")


def test_corrupt_safetensors_weights(tmp_path, teacher, capsys):
    folder = copy_teacher(teacher, tmp_path)
    weights = folder / UNET_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, folder), tmp_path), str(folder))


def test_pickle_weights_are_refused_and_never_run(tmp_path, teacher, capsys):
    folder = copy_teacher(teacher, tmp_path)
    (folder / UNET_WEIGHTS).unlink()
    marker = tmp_path / "pickle-code-ran"
    with open(folder / "unet" / "diffusion_pytorch_model.bin", "wb") as handle:
        pickle.dump({"conv_in.weight": MarkerPickle(marker)}, handle)
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, folder), tmp_path), str(folder))
    assert not marker.exists()


def test_pickle_checkpoint_is_refused_on_resume_and_never_run(tmp_path, teacher, capsys):
    recipe = write_recipe(tmp_path, teacher)
    # A run folder of this recipe holding a stranger's "checkpoint" for its first round: refused, not unpickled.
    run = tmp_path / "out.run"
    checkpoints = run / "train" / "steps-2" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (run / "recipe.json").write_text(json.dumps(_identity(recipe)))
    marker = tmp_path / "pickle-code-ran"
    with open(checkpoints / "step-00000002.pt", "wb") as handle:
        pickle.dump({"step": MarkerPickle(marker)}, handle)
    expect_error(tmp_path, capsys, [*distill(recipe, tmp_path), "--resume"], "cannot be read", "step-00000002.pt")
    assert not marker.exists()


def _identity(recipe: str) -> dict:
    from vlkd.recipes import load_recipe
    from vlkd.runs import recipe_identity

    return recipe_identity(load_recipe(recipe, []))


def test_recipe_with_an_unknown_key(tmp_path, teacher, capsys):
    recipe = Path(write_recipe(tmp_path, teacher))
    recipe.write_text(recipe.read_text().replace("train: {steps: 2", "train: {stepz: 2, steps: 2"))
    expect_error(tmp_path, capsys, distill(str(recipe), tmp_path), "stepz", str(recipe))


def test_recipe_with_a_wrong_type(tmp_path, teacher, capsys):
    recipe = Path(write_recipe(tmp_path, teacher))
    recipe.write_text(recipe.read_text().replace("steps: 2,", "steps: many,"))
    expect_error(tmp_path, capsys, distill(str(recipe), tmp_path), "train.steps", "many")


def test_step_counts_not_reachable_by_halving(tmp_path, teacher, capsys):
    recipe = write_recipe(tmp_path, teacher, teacher_steps=12, student_steps=8)
    expect_error(tmp_path, capsys, distill(recipe, tmp_path), "not reachable by halving")


def test_empty_dataset(tmp_path, teacher, capsys):
    (tmp_path / "images" / "train").mkdir(parents=True)
    recipe = write_recipe(tmp_path, teacher, data=f"imagefolder:{tmp_path / 'images'}")
    expect_error(tmp_path, capsys, distill(recipe, tmp_path), "images")


def test_images_whose_channels_do_not_match_the_teacher(tmp_path, capsys):
    folder = save_teacher(tmp_path / "rgb-teacher", channels=3)
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, folder), tmp_path), "1x8x8", "3x8x8")


def test_csv_without_the_caption_column(tmp_path, capsys):
    teacher = make_tiny_teacher(tmp_path / "clip")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    table = tmp_path / "train.csv"
    table.write_text(f"filepath\tlabel\n{image}\t0\n")  # open_clip's layout: tab-separated
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(f"pipeline: clip-distill\nteacher: local-dir:{teacher}\ndata: csv:{table}\n"
                      "student: {embed_dim: 16, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}}\n"
                      "train: {steps: 2, batch_size: 2}\neval: {enabled: false}\n")
    expect_error(tmp_path, capsys, ["distill", str(recipe), "--out", str(tmp_path / "out")], "title", "csv_caption_key")


def test_zero_shot_with_one_class(tmp_path, capsys):
    teacher = make_tiny_teacher(tmp_path / "clip")
    (tmp_path / "images" / "test" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "images" / "test" / "cat" / "a.png")
    expect_error(tmp_path, capsys, ["eval", "zeroshot", "--model", f"local-dir:{teacher}", "--dataset",
                                    f"imagefolder:{tmp_path / 'images'}", "--out", str(tmp_path / "r.json")],
                 "1 class", "at least 2")


def test_fid_with_one_image(tmp_path, capsys):
    (tmp_path / "samples").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "samples" / "a.png")
    expect_error(tmp_path, capsys, ["eval", "fid", "--samples", str(tmp_path / "samples"), "--reference",
                                    "digits:8@all", "--features", "digits-classifier", "--no-cache", "--out",
                                    str(tmp_path / "fid.json")], "at least 2 images", "got 1")


def test_existing_output_without_overwrite(tmp_path, teacher, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, teacher), tmp_path), "--overwrite")


def test_resume_without_a_checkpoint(tmp_path, teacher, capsys):
    expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, teacher), tmp_path, "--resume"),
                 "--resume", "run without --resume")


def test_non_finite_loss_names_the_step_and_term_and_keeps_the_last_checkpoint(tmp_path, teacher, capsys):
    folder = copy_teacher(teacher, tmp_path)
    weights = load_file(folder / UNET_WEIGHTS)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, folder / UNET_WEIGHTS)
    line = expect_error(tmp_path, capsys, distill(write_recipe(tmp_path, folder), tmp_path), "step 1",
                        "'x_mse'", "nan", allowed_new=("out.run",))
    assert "no checkpoint was written yet" in line and not (tmp_path / "out").exists()


def test_pickle_clip_weights_are_refused_and_never_run(tmp_path, capsys):
    teacher = make_tiny_teacher(tmp_path / "clip")
    (teacher / "open_clip_model.safetensors").unlink()
    marker = tmp_path / "pickle-code-ran"
    with open(teacher / "open_clip_pytorch_model.bin", "wb") as handle:
        pickle.dump({"logit_scale": MarkerPickle(marker)}, handle)
    expect_error(tmp_path, capsys, ["eval", "zeroshot", "--model", f"local-dir:{teacher}", "--dataset",
                                    "shapes:32:color", "--num", "8"], str(teacher))
    assert not marker.exists()


REPO = Path(__file__).resolve().parents[1]
UNSAFE = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)"),
    "yaml.load without a safe loader": re.compile(r"yaml\.(unsafe_load|full_load)\(|yaml\.load\((?![^)]*Loader="
                                                  r"(RecipeLoader|yaml\.SafeLoader)\))"),
    "pickle.load": re.compile(r"pickle\.loads?\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "eval/exec of text": re.compile(r"(?<![.\w])(eval|exec)\("),
}


def test_no_unsafe_loading_in_the_library_or_scripts():
    found = []
    for path in sorted([*REPO.glob("vlkd/**/*.py"), *REPO.glob("scripts/*.py")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(REPO)}:{number}: {what}" for what, pattern in UNSAFE.items()
                      if pattern.search(line)]
    assert not found, found
