"""What the pipelines need to know about running on several processes (``accelerate launch``, ``torchrun``).

The training loop shards each global batch across processes; everything else in a run (folders, exports,
evaluation) happens on the main process while the others wait, so exactly one process writes files.
"""

from __future__ import annotations

import os

import torch

from vlkd.errors import LaunchError


def _state():
    from accelerate import PartialState

    # accelerate chooses gloo over CPU processes only when told it runs on the CPU; without CUDA it always does.
    return PartialState(cpu=not torch.cuda.is_available())


def check_launch() -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` without MPI, which starts one process, not N.

    accelerate's CPU launcher spawns processes only through ``mpirun`` (``--mpirun_hostfile``); otherwise it runs
    the command once with MASTER_ADDR set and no WORLD_SIZE. Training the whole batch on one process while the
    user asked for several would be silently different, so say how to get N processes instead.
    """
    ranked = any(name in os.environ for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ and not ranked:
        raise LaunchError("`accelerate launch --cpu --num_processes N` started 1 process (accelerate spawns CPU "
                          "processes only through mpirun: add --mpirun_hostfile FILE); or use `accelerate launch "
                          "--multi_gpu --num_processes N` or `torchrun --nproc_per_node N -m vlkd ...`, which run N CPU "
                          "processes when there is no GPU")


def num_processes() -> int:
    """How many processes this run has (1 without ``accelerate launch``)."""
    return _state().num_processes


def is_main_process() -> bool:
    """Whether this process is the one that writes files."""
    return _state().is_main_process


def wait_for_everyone() -> None:
    """A barrier: no process passes before all reach it (a no-op on one process)."""
    _state().wait_for_everyone()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0, in rank order, with gradients flowing back to each.

    Losses over a whole batch (contrastive, affinity KL) need all of it; each process then computes the same
    global loss, and all_gather's backward sums the gradients of every copy, which the data-parallel average of
    the parameters' gradients divides again: the result equals a one-process run over the global batch.
    """
    if num_processes() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0, without gradients (teacher outputs, tokens)."""
    if num_processes() == 1:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
