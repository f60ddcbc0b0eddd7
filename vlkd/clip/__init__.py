"""CLIP training and distillation: losses (a registry of named-term losses) and the word-level tokenizer."""

from vlkd.clip.losses import LOSSES, ClipContrastiveLoss, ClipLossMethod, build_loss, contrastive_loss, register_loss

__all__ = ["LOSSES", "ClipContrastiveLoss", "ClipLossMethod", "build_loss", "contrastive_loss", "register_loss"]
