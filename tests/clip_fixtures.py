"""A tiny open_clip teacher saved as a local dir, standing in for assets/teachers/clip-shapes in tests.

Its shape follows the shipped teacher (ViT image tower at 32 px, the word-level tokenizer over the shapes caption
words, mean = std = 0.5 so [-1, 1] pixels are its input) at a size that trains in seconds on one CPU core.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TEACHER_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 0, "width": 64, "heads": 2, "layers": 1, "mlp_ratio": 2.0,
                 "pool_type": "argmax", "hf_tokenizer_name": "vlkd-shapes-words"},
}
PREPROCESS_CFG = {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "shortest"}


def shapes_word_tokenizer(context_length: int = 16):
    """The word-level tokenizer over every word a shapes caption or zero-shot prompt template uses."""
    from vlkd.clip.tokenizer import build_word_tokenizer, caption_words
    from vlkd.data.builtin_shapes import shapes_vocabulary

    vocab = shapes_vocabulary()
    texts = [vocab.caption, *vocab.sizes, *vocab.colors, *vocab.shapes, *vocab.positions]
    return build_word_tokenizer(caption_words(texts), context_length)


def make_tiny_teacher(folder: Path, seed: int = 0, quick_gelu: bool = False) -> Path:
    """Write a randomly initialised tiny open_clip CLIP with the shapes word tokenizer into ``folder``."""
    import open_clip
    from safetensors.torch import save_file

    from vlkd.clip.tokenizer import save_word_tokenizer

    tokenizer = shapes_word_tokenizer()
    cfg = json.loads(json.dumps(TINY_TEACHER_CFG))
    cfg["text_cfg"]["vocab_size"] = len(tokenizer)
    if quick_gelu:
        cfg["quick_gelu"] = True
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    save_word_tokenizer(tokenizer, folder)
    return folder
