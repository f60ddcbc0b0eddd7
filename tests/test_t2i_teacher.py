"""The text-to-image teacher's script (scripts/train_teacher_t2i.py): its CLIP text encoder and tokenizer equal the
shapes CLIP teacher's text tower, captions drop at the set rate, and a tiny run trains, resumes and saves a
StableDiffusionPipeline folder that samples with diffusers and transformers alone."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_modules import load_script

from vlkd.rng import sample_seed

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO / "assets" / "teachers" / "clip-shapes"
TINY = ["--vae-channels", "8,16,16", "--unet-channels", "16,32", "--heads", "2", "--vae-batch-size", "4",
        "--batch-size", "4", "--measure-images", "16", "--checkpoint-every", "2", "--threads", "1"]


def all_shapes_captions() -> list[str]:
    from vlkd.data.builtin_shapes import shapes_vocabulary

    vocab = shapes_vocabulary()
    return [vocab.caption.format(size=s, color=c, shape=h, position=p)
            for s, c, h, p in itertools.product(vocab.sizes, vocab.colors, vocab.shapes, vocab.positions)]


@pytest.fixture(scope="module")
def converted():
    """The shipped CLIP teacher, and its text tower as a CLIPTextModel + CLIPTokenizer."""
    from vlkd.clip.models import load_teacher
    from vlkd.diffusion.t2i_build import text_encoder_from_clip

    teacher = load_teacher(str(CLIP))
    text_encoder, tokenizer = text_encoder_from_clip(teacher)
    return teacher, text_encoder, tokenizer


def test_text_encoder_equals_open_clip_text_tower_at_every_position(converted, tmp_path):
    import open_clip
    from transformers import CLIPTokenizer

    from vlkd.diffusion.t2i_build import save_tokenizer

    _, text_encoder, tokenizer = converted
    captions = all_shapes_captions() + [""]
    assert len(captions) == 8 * 8 * 3 * 9 + 1
    # The reference: open_clip alone, its own tokenizer, encode_text's steps before pooling.
    clip = open_clip.create_model(f"local-dir:{CLIP}").eval()
    teacher_ids = open_clip.get_tokenizer(f"local-dir:{CLIP}")(captions)
    with torch.no_grad():
        x = clip.token_embedding(teacher_ids) + clip.positional_embedding
        expected = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))

    save_tokenizer(tokenizer, tmp_path)  # as the pipeline folder holds it
    for loaded in (tokenizer, CLIPTokenizer.from_pretrained(tmp_path)):
        assert loaded.model_max_length == 16
        ids = loaded(captions, padding="max_length", max_length=loaded.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
        assert torch.equal(ids, teacher_ids)
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
    assert hidden.shape == expected.shape == (len(captions), 16, 128)
    assert (hidden - expected).abs().max() < 1e-4


def test_each_caption_word_is_one_token_and_unknown_text_reads_as_unk(converted):
    _, text_encoder, tokenizer = converted
    words = sorted({w for caption in all_shapes_captions() for w in caption.split()})
    for word in words:
        assert len(tokenizer.tokenize(word)) == 1, (word, tokenizer.tokenize(word))
    table = text_encoder.get_input_embeddings().weight
    unk = table[tokenizer.unk_token_id]
    ids = tokenizer("a red dog!", add_special_tokens=False).input_ids
    assert ids[:2] == tokenizer("a red", add_special_tokens=False).input_ids
    assert len(ids) > 2 and all(torch.equal(table[i], unk) for i in ids[2:])
    assert tokenizer.tokenize("zebra")[-1] == "a</w>"  # BPE: an unknown word may end in a vocabulary word
    assert tokenizer.pad_token_id == 0 and tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_caption_dropout_rate_is_seeded():
    from vlkd.diffusion.t2i_build import drop_captions

    def batch(first, count):
        return {"caption": ["a red circle"] * count,
                "seed": torch.tensor([sample_seed(0, p) for p in range(first, first + count)])}

    dropped = drop_captions(batch(0, 20000), 0.1)
    fraction = dropped.count("") / len(dropped)
    assert 0.09 < fraction < 0.11, fraction  # about 5 standard deviations either side
    assert set(dropped) == {"", "a red circle"}
    assert drop_captions(batch(0, 20000), 0.1) == dropped  # same samples, same draws
    assert drop_captions(batch(100, 100), 0.1) == dropped[100:200]  # a sample's draw depends on its position only
    assert drop_captions(batch(0, 100), 0.0) == ["a red circle"] * 100


def test_denoising_loss_conditions_on_dropped_captions(converted):
    from vlkd.diffusion.schedule import NoiseSchedule
    from vlkd.diffusion.t2i_build import (
        FrozenParts,
        TextToImageDenoisingLoss,
        build_scheduler,
        build_unet,
        build_vae,
    )

    _, text_encoder, tokenizer = converted
    seen: list[str] = []

    class Spy(FrozenParts):
        def encode_text(self, captions):
            seen.extend(captions)
            return super().encode_text(captions)

    torch.manual_seed(0)
    frozen = Spy(build_vae(32, (8, 16, 16)), text_encoder, tokenizer).eval()
    unet = build_unet(8, (16, 32), 128, heads=2)
    batch = {"pixel_values": torch.rand(200, 3, 32, 32) * 2 - 1, "caption": ["a red circle"] * 200,
             "seed": torch.tensor([sample_seed(0, p) for p in range(200)])}
    terms = TextToImageDenoisingLoss(NoiseSchedule(build_scheduler().config), caption_dropout=0.1)(unet, frozen,
                                                                                                   batch)
    assert set(terms) == {"mse"} and torch.isfinite(terms["mse"]) and terms["mse"].requires_grad
    assert 8 <= seen.count("") <= 35 and seen.count("a red circle") == 200 - seen.count("")


def test_unet_layout_keeps_attention_off_the_top_level_on_request():
    from vlkd.diffusion.t2i_build import build_unet

    sd = build_unet(16, (16, 32, 32), 128, heads=2, layers_per_block=1)
    sdxl = build_unet(16, (16, 32, 32), 128, heads=2, layers_per_block=1, top_attention=False)
    assert sd.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert sdxl.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert sdxl.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert sdxl.config.mid_block_type == "UNetMidBlock2DCrossAttn"  # the text still reaches the lowest level
    assert sdxl(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 5, 128)).sample.shape == (2, 4, 16, 16)


def test_default_parts_fit_20_megabytes(converted):
    from vlkd.diffusion.t2i_build import build_unet, build_vae

    args = load_script("train_teacher_t2i").parse_args([])
    _, text_encoder, _ = converted
    vae = build_vae(args.size, tuple(int(c) for c in args.vae_channels.split(",")), args.latent_channels)
    levels = len(args.vae_channels.split(","))
    unet = build_unet(args.size // 2 ** (levels - 1), tuple(int(c) for c in args.unet_channels.split(",")), 128,
                      args.latent_channels, args.layers_per_block, args.heads, args.top_attention)
    count = sum(p.numel() for m in (vae, unet, text_encoder) for p in m.parameters())
    assert 4 * count <= 20e6 * 0.98  # fp32 weights; configs and tokenizer take a few kB


def test_tiny_run_trains_resumes_and_samples_without_vlkd(tmp_path, capsys):
    script = load_script("train_teacher_t2i")
    out, run = tmp_path / "t2i", tmp_path / "run"
    # Phase 1's budget is spent at once: it stops at its first checkpoint (step 2 of 6).
    script.main(["--out", str(out), "--run-dir", str(run), "--vae-steps", "6", "--vae-minutes", "0.0001",
                 "--steps", "3", *TINY])
    first = json.loads((out / "training.json").read_text())
    assert first["parts"]["vae"]["optimizer_steps"] == 2 and first["parts"]["vae"]["stopped_by_time_budget"]
    assert first["parts"]["unet"]["optimizer_steps"] == 3 and not first["parts"]["unet"]["stopped_by_time_budget"]
    vae_weights = (run / "vae-final" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "time budget reached" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--resume"):  # an earlier run is never trained over silently
        script.main(["--out", str(tmp_path / "other"), "--run-dir", str(run), *TINY])
    script.main(["--out", str(out), "--run-dir", str(run), "--vae-steps", "6", "--steps", "5", "--resume",
                 "--overwrite", *TINY])
    resumed = json.loads((out / "training.json").read_text())
    assert resumed["parts"]["unet"]["optimizer_steps"] == 5
    assert resumed["parts"]["vae"]["optimizer_steps"] == 2  # phase 1 is not retrained under a trained UNet
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_weights
    vae = resumed["parts"]["vae"]
    assert vae["scaling_factor"] == pytest.approx(1 / vae["latent_std"]) and vae["reconstruction_psnr_db"] > 0
    assert set(vae["reconstruction_fidelity"]) == {"fidelity", "shape_accuracy", "color_accuracy"}
    assert 0 <= vae["reconstruction_fidelity"]["fidelity"] <= vae["reconstruction_fidelity"]["color_accuracy"] <= 1
    saved = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
    assert saved == pytest.approx(vae["scaling_factor"]) and saved != 0.18215  # measured, not SD's default
    assert resumed["parts"]["text_encoder"]["max_abs_difference_vs_open_clip"] < 1e-4
    assert resumed["command"].startswith("python scripts/train_teacher_t2i.py ")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / "tokenizer" / name).is_file()

    code = f"""
import sys
import numpy as np, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained({str(out)!r})
assert pipe.safety_checker is None and pipe.tokenizer.model_max_length == 16
assert pipe.tokenizer("a red circle").input_ids == [2, 3, 7, 15, 33], pipe.tokenizer("a red circle").input_ids
images = pipe("a small red star at the top", num_inference_steps=2, guidance_scale=3.0, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
assert images.shape == (1, 32, 32, 3), images.shape
assert np.isfinite(images).all()
assert not any(m == "vlkd" or m.startswith("vlkd.") for m in sys.modules), "vlkd imported"
print("ok")
"""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_reconstruction_psnr_counts_uint8_levels():
    """A lossless VAE scores infinity; one whose output is one uint8 level off everywhere scores 20 log10(255)."""
    from types import SimpleNamespace

    from vlkd.diffusion.t2i_build import reconstruction_psnr, vae_reconstructions

    class ShiftVae(torch.nn.Module):
        def __init__(self, shift: float):
            super().__init__()
            self.shift = shift

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            return SimpleNamespace(sample=z + self.shift)

    pixels = torch.arange(0, 250, dtype=torch.float32).reshape(1, 1, 10, 25).div(127.5).sub(1).expand(3, 3, -1, -1)
    assert torch.equal(vae_reconstructions(ShiftVae(0.0), pixels, batch_size=2)[:, :, 0, :3],
                       torch.tensor([0, 1, 2], dtype=torch.uint8).expand(3, 3, 3))
    assert reconstruction_psnr(vae_reconstructions(ShiftVae(0.0), pixels), pixels) == float("inf")
    shifted = vae_reconstructions(ShiftVae(1 / 127.5), pixels, batch_size=2)
    assert reconstruction_psnr(shifted, pixels) == pytest.approx(20 * math.log10(255))
