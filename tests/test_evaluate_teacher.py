"""scripts/evaluate_teacher.py t2i on a tiny text-to-image teacher (lcm_fixtures): the guidance search, the
measured rows (FD, prompt fidelity, seconds per image) in metrics.json, and the model card built from them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lcm_fixtures import save_teacher
from script_modules import load_script

REPO = Path(__file__).resolve().parent.parent


def training_json() -> dict:
    """The parts of scripts/train_teacher_t2i.py's training.json that the model card reads."""
    return {
        "data": "shapes:32 train stream (seed 0), drawn on the fly",
        "parts": {
            "text_encoder": {"class": "CLIPTextModel", "from": "a tiny random text encoder",
                             "tokenizer": "CLIPTokenizer, one token per letter"},
            "vae": {"class": "AutoencoderKL", "block_out_channels": [8, 16, 16], "latent_shape": [4, 8, 8],
                    "loss": "none (random weights)", "batch_size": 4, "optimizer_steps": 0, "scaling_factor": 0.18215,
                    "reconstruction_psnr_db": 0.0, "psnr_images": "not measured",
                    "reconstruction_fidelity": {"fidelity": 0.1234, "shape_accuracy": 0.2, "color_accuracy": 0.3}},
            "unet": {"class": "UNet2DConditionModel", "block_out_channels": [16, 32], "layers_per_block": 1,
                     "attention_heads": 4, "cross_attention_dim": 32, "optimizer_steps": 0, "batch_size": 4,
                     "lr": 0.0, "lr_schedule": "constant", "ema_decay": None, "caption_dropout": 0.1},
            "scheduler": {"class": "PNDMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        },
        "training_minutes": 0.0, "machine": "none", "command": "tests/lcm_fixtures.py save_teacher",
    }


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    """Reference statistics go to one cache per test module, not to the user's."""
    monkeypatch.setenv("VLKD_CACHE", str(tmp_path_factory.getbasetemp() / "vlkd-cache"))


def test_t2i_mode_writes_the_rows_the_guidance_search_and_the_card(tmp_path, capsys):
    folder = save_teacher(tmp_path / "t2i")
    (folder / "training.json").write_text(json.dumps(training_json()))
    script = load_script("evaluate_teacher")
    script.main(["t2i", str(folder), "--num", "4", "--num-guidance-search", "3", "--guidance-scales", "1,3",
                 "--features", "digits-classifier", "--threads", "1"])
    metrics = json.loads((folder / "metrics.json").read_text())
    search, rows, chosen = metrics["guidance"]["search"], metrics["rows"], metrics["guidance"]["chosen"]
    assert [(row["steps"], row["guidance_scale"]) for row in search] == [(25, 1.0), (25, 3.0)]
    assert chosen == script.choose_guidance(search) and chosen in (1.0, 3.0)
    assert [(row["steps"], row["guidance_scale"], row["num_samples"]) for row in rows] == [(25, chosen, 4),
                                                                                        (4, chosen, 4)]
    for row in search + rows:
        assert row["features"] == "digits-classifier" and math.isfinite(row["fd"]) and row["fd"] >= 0
        assert (row["reference"], row["num_reference"]) == ("shapes:32@test", 2000)
        assert all(0 <= row[key] <= 1 for key in ("fidelity", "shape_accuracy", "color_accuracy"))
        assert row["seconds_per_image"] > 0
    assert metrics["ddim_settings"]["timestep_spacing"] == "trailing"
    parameters = metrics["parameters"]
    assert parameters["total"] == parameters["unet"] + parameters["vae"] + parameters["text_encoder"] > 0
    assert metrics["command"].startswith("python scripts/evaluate_teacher.py t2i ")

    card = (folder / "README.md").read_text()
    assert "## Measured" in card and "DDIMScheduler.from_config" in card and 'timestep_spacing="trailing"' in card
    assert f"| UNet | `UNet2DConditionModel` | {parameters['unet']:,} |" in card
    assert "reconstruction PSNR 0.0 dB, prompt fidelity of its reconstructions 12.3% (not measured)" in card
    for row in rows + search:
        line = f"| {row['steps']} | {row['guidance_scale']:g} | {row['fd']:.2f} | {100 * row['fidelity']:.1f} |"
        assert line in card
    [ceiling] = metrics["vae_ceiling"]
    assert (ceiling["features"], ceiling["num_samples"], ceiling["num_reference"]) == ("digits-classifier", 4, 2000)
    assert math.isfinite(ceiling["fd"]) and 0 <= ceiling["fidelity"] <= 1
    assert f"| real latents | - | {ceiling['fd']:.2f} | {100 * ceiling['fidelity']:.1f} |" in card
    assert metrics["batch_seeds"] == [0]  # 4 captions at batch 250: one batch, seeded as the students' are

    # --guidance-from keeps an earlier search and choice, measuring only the rows again.
    earlier = tmp_path / "earlier.json"
    shutil.copy(folder / "metrics.json", earlier)
    script.main(["t2i", str(folder), "--num", "4", "--guidance-scales", "7", "--guidance-from", str(earlier),
                 "--features", "digits-classifier", "--threads", "1"])
    again = json.loads((folder / "metrics.json").read_text())
    assert again["guidance"] == {**metrics["guidance"], "measured": metrics["date"]}
    assert [(row["steps"], row["guidance_scale"]) for row in again["rows"]] == [(25, chosen), (4, chosen)]


class IdentityVae(torch.nn.Module):
    """A VAE whose latents are the images: its reconstructions are the real images themselves."""

    config = SimpleNamespace(sample_size=32)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z)


def test_vae_ceiling_measures_reconstructions_of_the_captions_own_images():
    """A lossless VAE reaches the judge's accuracy on real images (99.95% shape, 100% colour): every one of the
    first 8 test images matches its own caption, which fails if images and captions were misaligned."""
    from vlkd.eval.fidelity import load_judge, shapes_prompts

    script = load_script("evaluate_teacher")
    prompts = shapes_prompts(8)
    [row] = script.measure_vae_ceiling(SimpleNamespace(vae=IdentityVae()), prompts, extractors=["digits-classifier"],
                                       reference="shapes:32@test", judge=load_judge())
    assert (row["fidelity"], row["shape_accuracy"], row["color_accuracy"]) == (1.0, 1.0, 1.0)
    assert row["model"] == "vae reconstruction" and row["num_samples"] == 8 and math.isfinite(row["fd"])


def test_guidance_choice_prefers_fidelity_then_fd():
    choose = load_script("evaluate_teacher").choose_guidance

    def row(scale, fidelity, fd):
        return {"guidance_scale": scale, "fidelity": fidelity, "fd": fd, "num_samples": 300}

    # 3 and 5 follow the prompts equally well within one standard error (0.017 at 300 samples): the lower FD wins.
    assert choose([row(1, 0.40, 10.0), row(3, 0.90, 14.0), row(5, 0.91, 18.0)]) == 3
    # A real gain in fidelity outweighs FD.
    assert choose([row(1, 0.40, 10.0), row(3, 0.80, 14.0), row(5, 0.95, 18.0)]) == 5


def test_t2i_table_gives_fidelity_in_percent():
    row = {"steps": 25, "guidance_scale": 3.0, "features": "inception", "fd": 12.345, "fidelity": 0.5,
           "shape_accuracy": 0.75, "color_accuracy": 0.6, "seconds_per_image": 0.1}
    table = load_script("evaluate_teacher")._t2i_table([row, {**row, "features": "digits-classifier", "fd": 1.0}])
    assert table.splitlines()[0] == ("| DDIM steps | guidance | FID | FD digits-classifier | fidelity % | shape % | "
                                     "colour % | s/image |")
    assert table.splitlines()[2] == "| 25 | 3 | 12.35 | 1.00 | 50.0 | 75.0 | 60.0 | 0.1000 |"


@pytest.mark.parametrize("kind,name", [("ddpm", "ddpm-digits"), ("clip", "clip-shapes"), ("t2i", "t2i-shapes")])
def test_card_only_rewrites_the_card_from_stored_files_and_measures_nothing(tmp_path, kind, name):
    folder = tmp_path / name
    folder.mkdir()
    for file in ("metrics.json", "training.json"):
        shutil.copy(REPO / "assets" / "teachers" / name / file, folder / file)
    metrics = (folder / "metrics.json").read_bytes()
    load_script("evaluate_teacher").main([kind, str(folder), "--card-only", "--threads", "1"])
    assert (folder / "metrics.json").read_bytes() == metrics
    card = (folder / "README.md").read_text()
    # The shipped card is this function of the shipped files: nothing in it was edited by hand.
    assert card.replace(str(folder), f"assets/teachers/{name}") == (REPO / "assets" / "teachers" / name
                                                                      / "README.md").read_text()
    training = json.loads((folder / "training.json").read_text())
    assert f"{training['training_minutes']:.1f} training minutes on {training['machine']}" in card
    if training.get("note"):
        assert f"How it ran: {training['note']}" in card


def test_training_time_says_when_an_earlier_leg_kept_no_clock():
    script = load_script("evaluate_teacher")
    assert script.training_time({"training_minutes": 46.0, "machine": "x86_64, 2 threads"}) == \
        "46.0 training minutes on x86_64, 2 threads"
    unknown = {"training_minutes": None, "resumed_at_step": 1500, "minutes_this_process": 20.5, "machine": "m"}
    assert script.training_time(unknown) == ("resumed at step 1,500; 20.5 minutes from there to the end (the earlier "
                                             "leg did not record its time) on m")


def test_card_only_without_metrics_is_a_one_line_error(tmp_path):
    folder = tmp_path / "ddpm-digits"
    folder.mkdir()
    shutil.copy(REPO / "assets" / "teachers" / "ddpm-digits" / "training.json", folder / "training.json")
    with pytest.raises(SystemExit, match="has no metrics.json to write the card from"):
        load_script("evaluate_teacher").main(["ddpm", str(folder), "--card-only"])
    assert not (folder / "README.md").exists()
