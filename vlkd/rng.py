"""Per-sample random numbers that depend only on (run seed, sample position, stream).

Methods draw their noise, timesteps and guidance scales through these functions instead of the global RNG,
so a run gives the same draws whether the global batch runs in one process or is split across several, and
after a resume. The loop puts a ``seed`` tensor (one int64 per sample) into every batch.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64 finaliser: spreads nearby integers over the whole 64-bit range."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(run_seed: int, position: int) -> int:
    """The base seed of the sample at ``position`` in the run's stream of samples (63 bits)."""
    return _mix(_mix(run_seed & _MASK64) ^ position) >> 1


def _generators(batch: dict, stream: str) -> list[torch.Generator]:
    if "seed" not in batch:
        raise KeyError("batch has no 'seed' entry; batches from vlkd.train.fit carry one per sample")
    salt = zlib.crc32(stream.encode())
    return [torch.Generator().manual_seed(_mix(int(s) ^ salt) >> 1) for s in batch["seed"].tolist()]


def randn(batch: dict, shape: Sequence[int], stream: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal draws of ``shape`` per sample: a (batch, *shape) tensor."""
    draws = [torch.randn(tuple(shape), generator=g) for g in _generators(batch, stream)]
    return torch.stack(draws).to(device)


def rand(batch: dict, shape: Sequence[int], stream: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` per sample: a (batch, *shape) tensor."""
    draws = [torch.rand(tuple(shape), generator=g) for g in _generators(batch, stream)]
    return torch.stack(draws).to(device)


def randint(batch: dict, low: int, high: int, stream: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """One integer in [low, high) per sample: a (batch,) int64 tensor."""
    draws = [torch.randint(low, high, (1,), generator=g) for g in _generators(batch, stream)]
    return torch.cat(draws).to(device)
