"""CLIP training and distillation: losses (a registry of named-term losses), the word-level tokenizer, teachers and
students (models), weight inheritance, the teacher-embedding cache, export, and the clip-distill pipeline (runner)."""

from vlkd.clip.losses import (LOSSES, AffinityKLLoss, ClipContrastiveLoss, ClipLossMethod, FeatureDistillationLoss,
                              InteractiveContrastiveLoss, build_loss, contrastive_loss, register_loss)

__all__ = ["LOSSES", "AffinityKLLoss", "ClipContrastiveLoss", "ClipLossMethod", "FeatureDistillationLoss",
           "InteractiveContrastiveLoss", "build_loss", "contrastive_loss", "register_loss"]
