"""Tiny Stable Diffusion (SD 1.x) and SDXL pipeline folders built from real configs with random weights, standing in
for text-to-image teachers in tests (LCM, LCM-LoRA, the LCM benchmark, teacher evaluation): 32x32 images, 8x8x4
latents, a character-level CLIP tokenizer, so nothing is downloaded."""

from __future__ import annotations

import string

import torch


def tokenizer():
    """A CLIP tokenizer whose vocabulary is the lowercase letters (each word is spelled out): no download."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({letter + suffix: len(vocab) for letter in string.ascii_lowercase})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_encoder(width=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=54, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def save_teacher(folder, sdxl=False, cross_attention_dim=None):
    """A Stable Diffusion (or SDXL) pipeline folder: VAE 32 -> 8x8x4, a two-level UNet, SD's betas and scheduler."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32} if sdxl else {}
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                                norm_num_groups=8, cross_attention_dim=cross_attention_dim or (64 if sdxl else 32),
                                **extra)
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    if sdxl:
        pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(), tokenizer=tokenizer(),
                                             text_encoder_2=text_encoder(projection=True), tokenizer_2=tokenizer(),
                                             unet=unet, scheduler=EulerDiscreteScheduler(**betas))
    else:
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(), tokenizer=tokenizer(), unet=unet,
                                           scheduler=PNDMScheduler(**betas, skip_prk_steps=True),
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
