"""The evaluation harness: FID/KID (``fid``), zero-shot accuracy (``zeroshot``), image sources (``sources``) and
latency (``speed``). Models and folders in, plain numbers out."""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use: `vlkd --help` imports vlkd.eval.commands, which must not pay for torch.
# The function fid() is not re-exported: its name is taken by the submodule vlkd.eval.fid.
_EXPORTS = {
    "FeatureExtractor": "fid", "FeatureStats": "fid", "FidResult": "fid", "InceptionExtractor": "fid",
    "compute_features": "fid", "compute_statistics": "fid", "frechet_distance": "fid",
    "get_extractor": "fid", "kid": "fid",
    "DatasetSource": "sources", "FolderSource": "sources", "ImageSource": "sources", "PipelineSource": "sources",
    "TensorSource": "sources", "open_source": "sources", "quantize_images": "sources",
    "ClipAdapter": "zeroshot", "as_clip": "zeroshot", "load_clip": "zeroshot", "zero_shot": "zeroshot",
    "image_encoder_latency": "speed", "measure_latency": "speed", "measure_peak_memory": "speed", "throughput": "speed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlkd.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vlkd.eval.{_EXPORTS[name]}"), name)
