"""scripts/train_teacher_ddpm.py and scripts/train_teacher_clip.py at toy sizes: they write a folder that loads,
and training.json's training time covers every leg of a resumed run, not only the last process."""

from __future__ import annotations

import json

import torch
from script_modules import load_script

from vlkd.train import list_checkpoints, load_checkpoint

FIRST_LEG_SECONDS = 600.0  # written into the first leg's checkpoint: a toy leg is too quick to tell apart from 0


def train_twice(script: str, tmp_path, sizes: list[str]) -> tuple[dict, dict]:
    """Train 2 steps, then resume the same run to 4; the two training.json files."""
    module = load_script(script)
    run_dir, common = tmp_path / "run", ["--threads", "1", "--batch-size", "8", *sizes]
    module.main(["--out", str(tmp_path / "first"), "--run-dir", str(run_dir), "--steps", "2", *common])
    last = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(last)
    history = json.loads(state["history"])
    state["history"] = json.dumps([{**h, "seconds": FIRST_LEG_SECONDS * (i + 1) / len(history)}
                                   for i, h in enumerate(history)])
    torch.save(state, last)
    module.main(["--out", str(tmp_path / "second"), "--run-dir", str(run_dir), "--steps", "4", "--resume", *common])
    return tuple(json.loads((tmp_path / name / "training.json").read_text()) for name in ("first", "second"))


def check_clock(first: dict, second: dict) -> None:
    assert first["optimizer_steps"] == 2 and "resumed_at_step" not in first and first["training_minutes"] >= 0
    assert second["optimizer_steps"] == 4 and second["resumed_at_step"] == 2
    # The resumed run's time is the first leg's plus its own, not its own process's alone.
    assert FIRST_LEG_SECONDS / 60 <= second["training_minutes"] < FIRST_LEG_SECONDS / 60 + 1
    assert 0 <= second["minutes_this_process"] < 1


def test_ddpm_teacher_script_records_the_whole_training_time(tmp_path):
    from diffusers import DDIMPipeline

    first, second = train_twice("train_teacher_ddpm", tmp_path, ["--channels", "16,16"])
    check_clock(first, second)
    pipe = DDIMPipeline.from_pretrained(tmp_path / "second")
    assert list(pipe.unet.config.block_out_channels) == [16, 16] and second["parameters"] == pipe.unet.num_parameters()


def test_clip_teacher_script_records_the_whole_training_time(tmp_path):
    sizes = ["--vision-width", "64", "--vision-layers", "1", "--text-width", "64", "--text-layers", "1",
             "--embed-dim", "32"]
    first, second = train_twice("train_teacher_clip", tmp_path, sizes)
    check_clock(first, second)
    assert set(second["zero_shot_at_export"]) == {"shape", "color", "shape_color"}
    assert (tmp_path / "second" / "open_clip_model.safetensors").is_file()
