"""Train the shipped shapes CLIP teacher (assets/teachers/clip-shapes) with vlkd's training loop.

An open_clip CLIP from a custom config, trained with CLIP's contrastive loss (learned temperature, initialised
at 1/0.07 and capped at 100) on `shapes:32` train captions drawn on the fly. The folder loads with open_clip
alone: `create_model_and_transforms("local-dir:assets/teachers/clip-shapes")` and
`get_tokenizer("local-dir:assets/teachers/clip-shapes")`. Measure it afterwards with scripts/evaluate_teacher.py.

Choices, and why:
- Tokenizer: word-level over the caption vocabulary (vlkd.clip.tokenizer), saved as `tokenizer.json`, which
  open_clip reads through transformers' AutoTokenizer when `text_cfg.hf_tokenizer_name` is set (for a
  local-dir it always reads the folder). open_clip's BPE would put 6.3M parameters into the text embedding at
  width 128; a first try spent that way reached 100% on colour but 50% on shape. The text tower here is small
  and the parameters go to the image tower: 32x32 input, patch 4 (64 tokens), where shape is the hard part.
- Captions: half as drawn ("a small red star in the top left corner"); half reduced to a random subset of
  their attributes (size, colour, shape, position; colour or shape always stays), sometimes without the
  article, with up to three unknown words inserted. Zero-shot prompts name only a colour and/or a shape in
  words the vocabulary lacks ("a drawing of a red star."); the model never sees those prompts, only the
  means to read them.
- Identical captions in a batch count as matches in the contrastive loss (vlkd.clip.losses): they are common
  with a few dozen words.
- Preprocessing: mean = std = 0.5, so vlkd's [-1, 1] pixels are the model input as they are.

    python scripts/train_teacher_clip.py --out assets/teachers/clip-shapes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vlkd.clip.losses import ClipContrastiveLoss, ClipLossMethod
from vlkd.clip.tokenizer import build_word_tokenizer, caption_words, save_word_tokenizer
from vlkd.data import build_dataset
from vlkd.bench import script_command
from vlkd.files import check_output, staged_folder, write_json
from vlkd.recipes import TrainConfig
from vlkd.train import fit

TASKS = ("shape", "color", "shape_color")
ATTRIBUTES = ("size", "color", "shape", "position")
FULL_CAPTION_PROB = 0.5
KEEP_ATTRIBUTE_PROB = 0.5
DROP_ARTICLE_PROB = 0.2
MAX_UNKNOWN_WORDS = 3


def model_config(args: argparse.Namespace, vocab_size: int, image_size: int) -> dict:
    """open_clip's `model_cfg` for the teacher."""
    return {
        "embed_dim": args.embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": args.patch_size, "width": args.vision_width,
                       "layers": args.vision_layers, "head_width": 64, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": args.context_length, "vocab_size": vocab_size, "width": args.text_width,
                     "heads": args.text_width // 64, "layers": args.text_layers, "pool_type": "argmax",
                     "hf_tokenizer_name": "vlkd-shapes-words"},
    }


class CaptionCollate:
    """Stack pixels, keep int labels, and turn captions into token ids (augmented when training)."""

    def __init__(self, tokenizer, caption_format: str, context_length: int, augment: bool):
        self.tokenizer, self.context_length, self.augment = tokenizer, context_length, augment
        pattern = re.escape(caption_format)
        for name in ATTRIBUTES:
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>.+?)")
        self.caption_pattern = re.compile(pattern)
        self.caption_format = caption_format

    def reduced_caption(self, caption: str, rng: np.random.Generator) -> list[int]:
        """Token ids of the caption with a random subset of its attributes, maybe no article, unknown words added."""
        match = self.caption_pattern.fullmatch(caption)
        if match is None:
            raise ValueError(f"caption {caption!r} does not follow the format {self.caption_format!r}")
        kept = {name: match[name] if rng.random() < KEEP_ATTRIBUTE_PROB else "" for name in ATTRIBUTES}
        if not (kept["color"] or kept["shape"]):
            name = ("color", "shape")[rng.integers(2)]
            kept[name] = match[name]
        text = " ".join(self.caption_format.format(**kept).split())
        if rng.random() < DROP_ARTICLE_PROB:
            text = text.split(" ", 1)[1] if " " in text else text
        ids = self.tokenizer(text)["input_ids"]
        for _ in range(rng.integers(MAX_UNKNOWN_WORDS + 1)):
            ids.insert(int(rng.integers(1, len(ids))), self.tokenizer.unk_token_id)
        return ids

    def token_ids(self, samples: list[dict]) -> torch.Tensor:
        rows = []
        for sample in samples:
            rng = np.random.default_rng(int(sample["seed"]))
            if self.augment and rng.random() >= FULL_CAPTION_PROB:
                ids = self.reduced_caption(sample["caption"], rng)
            else:
                ids = self.tokenizer(sample["caption"])["input_ids"]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + ids[-1:]  # keep [EOS]: the text tower pools there
            rows.append(ids + [self.tokenizer.pad_token_id] * (self.context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64)

    def __call__(self, samples: list[dict]) -> dict:
        batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
                 "text": self.token_ids(samples)}
        for key in ("shape", "color", "shape_color", "seed"):
            batch[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
        return batch


def zero_shot_figures(folder: Path) -> dict:
    """Zero-shot top-1/top-5 of the saved folder on the 2,000 `shapes:32` test images, per task."""
    from vlkd.eval.zeroshot import load_clip, zero_shot

    clip = load_clip(f"local-dir:{folder}", device="cpu")
    test = build_dataset("shapes:32", split="test")
    figures = {}
    for task in TASKS:
        # The templates name the class `{c}`; callables fill it in without relying on str.format's keywords.
        templates = [lambda c, t=t: t.replace("{c}", c) for t in test.task_templates[task]]
        result = zero_shot(clip, test, task, templates, batch_size=500)
        figures[task] = {"top1": round(result["top1"], 4), "top5": None if result["top5"] is None else round(result["top5"], 4)}
    return figures


def parameter_counts(model: torch.nn.Module) -> dict:
    visual = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"image_tower": visual, "text_tower": total - visual - model.logit_scale.numel(), "total": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/teachers/clip-shapes")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=128)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0, help="data-drawing processes")
    parser.add_argument("--save-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--run-dir", default="runs/teacher-clip")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    check_output(args.out, args.overwrite)

    import open_clip

    dataset = build_dataset(f"shapes:{args.size}", split="train", seed=args.seed)
    vocab = dataset.vocab
    words = caption_words([vocab.caption.format(**{name: "" for name in ATTRIBUTES}),
                           *vocab.sizes, *vocab.colors, *vocab.shapes, *vocab.positions])
    tokenizer = build_word_tokenizer(words, args.context_length)
    cfg = model_config(args, len(tokenizer), args.size)
    preprocess_cfg = {"size": [args.size, args.size], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**cfg)
    open_clip.set_model_preprocess_cfg(model, preprocess_cfg)
    counts = parameter_counts(model)
    print(f"parameters: {counts}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         adam_betas=(0.9, 0.98), lr_schedule="cosine", warmup_steps=args.warmup_steps,
                         seed=args.seed, checkpoint_every=100, max_grad_norm=1.0, num_workers=args.num_workers)
    collate = CaptionCollate(tokenizer, vocab.caption, args.context_length, augment=True)

    load_before = os.getloadavg()
    start = time.time()
    result = fit(ClipLossMethod([ClipContrastiveLoss()]), model, dataset, config, args.run_dir, resume=args.resume,
                 collate_fn=collate, desc="clip teacher")
    clock = result.clock(start, key="training_minutes")  # every leg of a resumed run
    load_after = os.getloadavg()
    final = result.final_model().eval()
    state = {k: v.detach().cpu().to(getattr(torch, args.save_dtype)).contiguous() for k, v in final.state_dict().items()}
    with staged_folder(args.out, overwrite=args.overwrite) as folder:
        (folder / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n")
        save_file(state, folder / "open_clip_model.safetensors")
        save_word_tokenizer(tokenizer, folder)
        figures = zero_shot_figures(folder)
        write_json(folder / "training.json", {
            "data": f"shapes:{args.size} train captions, drawn on the fly (seed {args.seed})",
            "model_cfg": cfg, "parameters": counts, "vocabulary": len(tokenizer),
            "loss": "CLIP contrastive, identical captions as matches; logit scale init 1/0.07, capped at 100",
            "caption_augmentation": {"full_caption_prob": FULL_CAPTION_PROB, "keep_attribute_prob": KEEP_ATTRIBUTE_PROB,
                                     "drop_article_prob": DROP_ARTICLE_PROB, "max_unknown_words": MAX_UNKNOWN_WORDS},
            "optimizer_steps": result.steps, "batch_size": args.batch_size, "lr": args.lr,
            "lr_schedule": f"cosine, {args.warmup_steps} warmup steps", "weight_decay": args.weight_decay,
            "adam_betas": [0.9, 0.98], "seed": args.seed, "saved_dtype": args.save_dtype,
            **clock,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} torch threads; load average {load_before[0]:.1f} before, "
                       f"{load_after[0]:.1f} after",
            "command": script_command("train_teacher_clip.py", argv),
            "final_logit_scale": round(math.exp(final.logit_scale.item()), 2),
            "final_loss": result.history[-1] if result.history else None,
            "zero_shot_at_export": figures,
        })
    print(f"wrote {args.out} after {result.steps} steps in {clock['training_minutes']} training minutes; "
          f"zero-shot {figures}")


if __name__ == "__main__":
    main()
