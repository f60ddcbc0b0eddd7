"""The parts of a small Stable Diffusion-style text-to-image teacher, and the two losses that train them.

- ``text_encoder_from_clip``: an open_clip CLIP's text tower as a transformers ``CLIPTextModel`` (through
  vlkd.clip.export's converters), with a ``CLIPTokenizer`` whose ids index its embedding rows, so that
  ``StableDiffusionPipeline``'s own ``tokenizer(prompt, padding="max_length", max_length=model_max_length,
  truncation=True)`` call gives the hidden states the CLIP teacher computes on its own token ids.
- ``build_vae`` / ``build_unet`` / ``build_scheduler``: an ``AutoencoderKL``, a cross-attention
  ``UNet2DConditionModel`` and Stable Diffusion's 1,000-step DDPM schedule (epsilon, scaled-linear betas).
- ``AutoencoderLoss`` (phase 1) and ``TextToImageDenoisingLoss`` (phase 2): methods for ``vlkd.train.fit``.

The tokenizer. A word-level vocabulary (vlkd.clip.tokenizer: ``[PAD]`` 0, ``[UNK]`` 1, ``[SOS]`` 2, the words,
``[EOS]``) becomes a CLIP BPE in which every word is one token ``word</w>`` with the teacher's id. The merges
build each word from its end: ``d</w>``, ``e d</w>`` -> ``ed</w>``, ``r ed</w>`` -> ``red</w>``. Every merge
joins one character to a token that ends the word, so in any word at most one merge applies at a time (the
character before the end token): merges of different words can never interleave, whatever their order, and
a vocabulary word always ends as its single token. The characters and word endings the merges pass through
need ids of their own (the tokenizers library looks every BPE symbol up); they get rows appended after the
teacher's, copies of ``[UNK]``'s row, as do characters outside the vocabulary (through ``unk_token``). So an
unknown word reads as ``[UNK]`` embeddings (several, where the teacher reads one), or ends in a vocabulary word
when it ends in one ("zebra" -> ``[UNK]`` x 4 + ``a</w>``: that is BPE); the teacher also drops punctuation,
which CLIP's pre-tokenizer keeps (as ``[UNK]``). Captions in the vocabulary give the teacher's ids exactly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlkd import rng
from vlkd.diffusion.schedule import NoiseSchedule

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "[PAD]", "[UNK]"
WORD_END = "</w>"
# Stable Diffusion 1.x/2.x's training schedule (its scheduler_config.json, as a DDPMScheduler).
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


# ---------------------------------------------------------------------------------------------------- tokenizer


def word_merges(words: list[str]) -> list[str]:
    """BPE merges that assemble each word right to left into ``word</w>`` (see the module docstring)."""
    merges: dict[str, None] = {}
    for word in words:
        for k in range(len(word) - 2, -1, -1):
            merges[f"{word[k]} {word[k + 1:]}{WORD_END}"] = None
    return list(merges)


def word_bpe_vocabulary(word_ids: dict[str, int], first_free_id: int) -> tuple[dict[str, int], list[str]]:
    """``word</w>`` -> the word's id; the characters and word endings the merges pass through -> new ids from
    ``first_free_id`` on. Returns the vocabulary and the new tokens in id order."""
    vocab = {f"{word}{WORD_END}": index for word, index in word_ids.items()}
    extra: dict[str, None] = {}
    for word in word_ids:
        for k in range(len(word)):
            pieces = [word[k] + (WORD_END if k == len(word) - 1 else ""), word[k:] + WORD_END]
            extra.update({piece: None for piece in pieces if piece not in vocab})
    extra_tokens = list(extra)
    vocab.update({token: first_free_id + i for i, token in enumerate(extra_tokens)})
    return vocab, extra_tokens


def word_bpe_tokenizer(word_ids: dict[str, int], special_ids: dict[str, int], first_free_id: int,
                       context_length: int) -> tuple[Any, list[str]]:
    """A transformers ``CLIPTokenizer`` (from ``vocab.json`` + ``merges.txt``, which every transformers version
    reads) in which each of ``word_ids`` is one token with its id. ``special_ids`` gives the ids of BOS, EOS,
    PAD and UNK. Returns the tokenizer and the appended tokens (ids ``first_free_id`` on)."""
    from transformers import CLIPTokenizer

    vocab, extra = word_bpe_vocabulary(word_ids, first_free_id)
    vocab.update(special_ids)
    if len(set(vocab.values())) != len(vocab):
        raise ValueError("word_bpe_tokenizer: two tokens share an id")
    with tempfile.TemporaryDirectory() as folder:
        write_bpe_files(Path(folder), vocab, word_merges(list(word_ids)))
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=context_length, bos_token=BOS,
                                                  eos_token=EOS, pad_token=PAD, unk_token=UNK)
    return tokenizer, extra


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """``vocab.json`` and ``merges.txt`` (its first line is a header that CLIP's slow tokenizer skips)."""
    (folder / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda item: item[1]))))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, completed for transformers 4's slow ``CLIPTokenizer``: ``vocab.json`` and
    ``merges.txt`` (transformers 5 may write only ``tokenizer.json``), and no ``backend`` key in the config
    (a transformers 5 name that transformers 4 cannot resolve)."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    write_bpe_files(folder, tokenizer.get_vocab(), merges)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("backend", "is_local", "local_files_only"):  # the last two: from_pretrained's own arguments
        config.pop(key, None)
    config["tokenizer_class"] = "CLIPTokenizer"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- text encoder


def text_encoder_from_clip(teacher: Any) -> tuple[Any, Any]:
    """A CLIP teacher's text tower (vlkd.clip.models.ClipTeacher of an open_clip word-level CLIP) as a
    ``CLIPTextModel`` and ``CLIPTokenizer`` pair: same hidden states at every position for the same text."""
    from transformers import CLIPTextModel

    from vlkd.clip.export import transformers_config, transformers_state_dict

    hf = teacher.tokenizer.tokenizer.tokenizer  # ClipTeacher -> TextTokenizer -> open_clip HFTokenizer -> HF
    special = {"bos": hf.bos_token, "eos": hf.eos_token, "pad": hf.pad_token, "unk": hf.unk_token}
    teacher_vocab = hf.get_vocab()
    word_ids = {w: i for w, i in sorted(teacher_vocab.items(), key=lambda item: item[1])
                if w not in special.values()}
    text_cfg = teacher.model_cfg["text_cfg"]
    context_length = int(text_cfg.get("context_length", 77))
    rows = int(text_cfg["vocab_size"])
    special_ids = {BOS: teacher_vocab[special["bos"]], EOS: teacher_vocab[special["eos"]],
                   PAD: teacher_vocab[special["pad"]], UNK: teacher_vocab[special["unk"]]}
    tokenizer, extra = word_bpe_tokenizer(word_ids, special_ids, rows, context_length)

    config = transformers_config(teacher.model_cfg, teacher.tokenizer, with_text=True).text_config
    config.vocab_size = rows + len(extra)
    # Pooling finds the first end token (not the highest id: the appended rows come after [EOS]).
    config.eos_token_id = special_ids[EOS]
    state = transformers_state_dict(teacher.model.state_dict(), with_text=True)
    state = {k: v for k, v in state.items() if k.startswith("text_model.")}
    table = state["text_model.embeddings.token_embedding.weight"]
    appended = table[special_ids[UNK]].expand(len(extra), -1)
    state["text_model.embeddings.token_embedding.weight"] = torch.cat([table, appended]).contiguous()
    model = CLIPTextModel(config)
    # transformers 4 names the weights text_model.*, transformers 5 without the prefix.
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    state = {prefix + k[len("text_model."):]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text encoder conversion: weights do not line up ({(missing + unexpected)[0]})")
    return model.eval(), tokenizer


@torch.no_grad()
def open_clip_hidden_states(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text tower up to ``ln_final`` (``encode_text`` before pooling): (N, context, width)."""
    x = clip.token_embedding(tokens) + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    return clip.ln_final(x)


@torch.no_grad()
def text_encoder_difference(teacher: Any, text_encoder: nn.Module, tokenizer: Any, captions: list[str]) -> float:
    """Largest |difference| between the converted encoder's ``last_hidden_state`` (ids from ``tokenizer``) and the
    CLIP teacher's per-token hidden states (its own ids); raises if the two tokenizers give different ids."""
    teacher_ids = teacher.tokenizer(captions)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    if not torch.equal(ids, teacher_ids):
        row = int((ids != teacher_ids).any(dim=1).nonzero()[0])
        raise ValueError(f"tokenizers differ on {captions[row]!r}: {ids[row].tolist()} vs {teacher_ids[row].tolist()}")
    expected = open_clip_hidden_states(teacher.model, teacher_ids)
    return float((text_encoder(ids).last_hidden_state - expected).abs().max())


# ------------------------------------------------------------------------------------------- VAE, UNet, scheduler


def build_vae(image_size: int, channels: tuple[int, ...], latent_channels: int = 4, layers_per_block: int = 1):
    """An ``AutoencoderKL`` that downsamples ``2 ** (len(channels) - 1)`` times (32 px, 3 levels -> 8x8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         layers_per_block=layers_per_block, latent_channels=latent_channels,
                         norm_num_groups=min(32, channels[0] // 2), sample_size=image_size)


def build_unet(latent_size: int, channels: tuple[int, ...], cross_attention_dim: int, latent_channels: int = 4,
               layers_per_block: int = 2, heads: int = 4, top_attention: bool = True):
    """SD's UNet layout at small size: cross-attention at every level but the lowest, and in the middle; without
    ``top_attention``, none at the highest resolution either, as SDXL does (there attention costs most: at 16x16
    latents it doubles a training step)."""
    from diffusers import UNet2DConditionModel

    attention = [True] * (len(channels) - 1) + [False]  # per level, highest resolution first
    attention[0] = attention[0] and top_attention
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    # diffusers reads attention_head_dim as the number of heads (a naming it keeps for compatibility).
    return UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=channels, layers_per_block=layers_per_block,
                                down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=heads, norm_num_groups=min(32, channels[0] // 2))


def build_scheduler():
    """SD's 1,000-step DDPM training schedule: epsilon prediction, scaled-linear betas, no clipping."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, **SD_BETAS, prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


# ------------------------------------------------------------------------------------------------------ losses


class AutoencoderLoss:
    """Phase 1, the LDM autoencoder without its perceptual and GAN terms: L1 + L2 reconstruction of a posterior
    sample, plus ``kl_weight`` x KL(q(z|x) || N(0, I)) per latent element, which keeps the latents smooth."""

    def __init__(self, kl_weight: float = 1e-3):
        self.kl_weight = kl_weight

    def __call__(self, vae: nn.Module, teacher: None, batch: dict) -> dict[str, torch.Tensor]:
        # fit passes the model itself in one process; under DDP .encode would bypass the wrapper's gradient sync.
        x = batch["pixel_values"]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * rng.randn(batch, posterior.mean.shape[1:], "latent", x.device)
        reconstruction = vae.decode(z).sample
        return {"l1": (reconstruction - x).abs().mean(), "mse": F.mse_loss(reconstruction, x),
                "kl": self.kl_weight * posterior.kl().mean() / z[0].numel()}


class FrozenParts(nn.Module):
    """The frozen VAE and text encoder, passed to ``fit`` as its ``teacher`` (so fit freezes and places them)."""

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any):
        super().__init__()
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.latent_channels, image_size // factor, image_size // factor)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A posterior sample (as SD's training draws one), times the VAE's scaling factor."""
        posterior = self.vae.encode(pixels).latent_dist
        return (posterior.mean + posterior.std * noise) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The pipeline's text conditioning: ``last_hidden_state`` of ids padded to the context length."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device)).last_hidden_state


def drop_captions(batch: dict, probability: float) -> list[str]:
    """The batch's captions with each replaced by "" with ``probability`` (per-sample seeded draws): the empty
    prompt is the unconditional input of classifier-free guidance in SD pipelines."""
    keep = rng.rand(batch, (), "caption_dropout") >= probability
    return [caption if kept else "" for caption, kept in zip(batch["caption"], keep.tolist())]


class TextToImageDenoisingLoss:
    """Phase 2: SD's objective. Encode images to scaled latents and captions (some dropped) to hidden states
    with the frozen parts, noise the latents at a uniform timestep, regress the scheduler's target.

    Latents are encoded on the fly, not precomputed for a fixed pool: the shapes train stream is unlimited, so
    every step sees new images and a posterior sample of each, and the frozen encoder's forward pass costs little
    (batch 64, one thread: 0.09 s against 0.45 s for the default UNet's forward and backward, 0.59 s a step)."""

    def __init__(self, schedule: NoiseSchedule, caption_dropout: float = 0.1):
        self.schedule, self.caption_dropout = schedule, caption_dropout

    def __call__(self, unet: nn.Module, frozen: FrozenParts, batch: dict) -> dict[str, torch.Tensor]:
        pixels = batch["pixel_values"]
        shape = frozen.latent_shape(pixels.shape[-1])
        latents = frozen.encode_images(pixels, rng.randn(batch, shape, "latent", pixels.device))
        text = frozen.encode_text(drop_captions(batch, self.caption_dropout))
        t = rng.randint(batch, 0, self.schedule.num_train_timesteps, "timestep", pixels.device)
        eps = rng.randn(batch, shape, "noise", pixels.device)
        output = unet(self.schedule.add_noise(latents, eps, t), t, encoder_hidden_states=text).sample
        return {"mse": F.mse_loss(output.float(), self.schedule.target(latents, eps, t).float())}


# --------------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def latent_std(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator, batch_size: int = 256) -> float:
    """Standard deviation of posterior samples of ``pixels`` (SD's scaling factor is 1 / this)."""
    samples = []
    for chunk in pixels.split(batch_size):
        posterior = vae.encode(chunk).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        samples.append(posterior.mean + posterior.std * noise)
    return float(torch.cat(samples).double().std())


@torch.no_grad()
def vae_reconstructions(vae: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior-mean reconstructions of ``pixels`` (NCHW in [-1, 1]) as uint8 NCHW images, as samples are saved:
    what the decoder, which every sample passes through, makes of the latents of real images."""
    from vlkd.eval.sources import quantize_images

    return torch.cat([quantize_images(vae.decode(vae.encode(chunk).latent_dist.mode()).sample)
                      for chunk in pixels.split(batch_size)])


def reconstruction_psnr(reconstructions: torch.Tensor, pixels: torch.Tensor) -> float:
    """PSNR in dB of uint8 ``reconstructions`` (``vae_reconstructions``) against ``pixels`` quantised the same way."""
    from vlkd.eval.sources import quantize_images

    difference = reconstructions.double() - quantize_images(pixels).double()
    mse = float(difference.pow(2).mean())
    return float("inf") if mse == 0 else float(10 * torch.log10(torch.tensor(255.0**2 / mse)))
