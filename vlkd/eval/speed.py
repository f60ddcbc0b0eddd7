"""Latency, throughput and peak memory of a callable, measured the same way for every report.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above what was allocated before the call. On the CPU it
is the high-water resident set size (RSS) above the RSS before the call, sampled by a background thread every
``CPU_SAMPLE_S`` seconds with psutil: allocations shorter than that can be missed. (``getrusage``'s ``ru_maxrss``
is a lifetime maximum, so it says nothing about a call made after a bigger one.)
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

from vlkd.errors import EvalError

CPU_SAMPLE_S = 0.002


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Wall-clock seconds per call of ``fn`` after ``warmup`` untimed calls; CUDA work is synchronised per call."""
    if repeats < 1 or warmup < 0:
        raise EvalError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - began)
    return {
        "median_s": statistics.median(times),
        "p90_s": float(np.percentile(times, 90)),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "repeats": repeats,
    }


class _RssSampler(threading.Thread):
    """Records the highest RSS of this process while running."""

    def __init__(self) -> None:
        import psutil

        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(CPU_SAMPLE_S):
            self.peak = max(self.peak, self.process.memory_info().rss)


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Bytes of memory ``fn`` needed above what was in use before it ran (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    sampler = _RssSampler()
    sampler.start()
    try:
        fn()
    finally:
        sampler.done.set()
        sampler.join()
    sampler.peak = max(sampler.peak, sampler.process.memory_info().rss)
    return int(sampler.peak - sampler.baseline)


def throughput(fn: Callable[[], Any], items_per_call: int, *, warmup: int = 2, repeats: int = 10,
               device: str | torch.device = "cpu") -> dict[str, float]:
    """Items per second of ``fn`` (which processes ``items_per_call`` items), from its median latency."""
    latency = measure_latency(fn, warmup=warmup, repeats=repeats, device=device)
    return {**latency, "items_per_s": items_per_call / latency["median_s"], "items_per_call": items_per_call}


def _image_encoder(model: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None, torch.device]:
    """The image-embedding function of a CLIP model (or a plain module), its input size and its device."""
    from vlkd.eval.zeroshot import ClipAdapter, as_clip

    if isinstance(model, ClipAdapter) or hasattr(model, "get_image_features") or hasattr(model, "encode_image"):
        clip = as_clip(model)
        return clip.encode_image, clip.image_size[0], clip.device
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return model, getattr(model, "image_size", None), parameter.device if parameter is not None else torch.device("cpu")


def image_encoder_latency(model: Any, batch_size: int = 64, image_size: int | None = None, *, channels: int = 3,
                          warmup: int = 2, repeats: int = 10) -> dict[str, Any]:
    """Latency, images/s and peak memory of one forward pass of an image encoder on a random batch.

    ``model``: a CLIP model (open_clip, transformers, ClipAdapter; its image tower is timed) or any module taking
    NCHW float input. ``image_size`` defaults to the model's own.
    """
    from vlkd.eval.zeroshot import ClipAdapter

    encode, own_size, device = _image_encoder(model)
    size = image_size or own_size
    if size is None:
        raise EvalError(f"cannot tell the input size of {type(model).__name__}; pass image_size=")
    module = model.model if isinstance(model, ClipAdapter) else model
    dtype = next(module.parameters()).dtype if isinstance(module, torch.nn.Module) else torch.float32
    pixels = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def forward() -> None:
        with torch.inference_mode():
            encode(pixels)

    timing = throughput(forward, batch_size, warmup=warmup, repeats=repeats, device=device)
    return {
        "batch_size": batch_size,
        "image_size": size,
        "device": str(device),
        "median_s": timing["median_s"],
        "p90_s": timing["p90_s"],
        "images_per_s": timing["items_per_s"],
        "peak_memory_bytes": measure_peak_memory(forward, device),
    }
