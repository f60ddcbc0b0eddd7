"""The one training loop. It owns devices, precision, accumulation, EMA, checkpoints and resume.

A method is any callable ``method(student, teacher, batch) -> dict[str, Tensor]`` of named loss terms; the
loop sums them, backpropagates and logs each. A method that is an ``nn.Module`` (for example one holding a
consistency target network) is moved to the device and checkpointed with the run; one with an
``after_step(student)`` hook has it called after every optimizer step. The loop never knows which method runs.

Data order is a pure function of (seed, step): batch ``s`` holds the samples at positions
``[s * B, (s + 1) * B)`` of a seeded stream of epochs, split across processes, so a resumed or multi-process
run sees exactly the samples an uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vlkd.errors import CheckpointError, NonFiniteLossError, VlkdError
from vlkd.files import atomic_file
from vlkd.recipes import TrainConfig
from vlkd.rng import sample_seed

Method = Callable[[nn.Module, Any, dict], dict]
_CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")


@dataclass
class FitState:
    """What a callback sees after an optimizer step (on the main process only)."""

    step: int
    total_steps: int
    student: nn.Module  # unwrapped
    ema: Any  # diffusers EMAModel or None
    losses: dict[str, float]
    run_dir: Path


@dataclass
class FitResult:
    """The trained student (unwrapped, online weights), its EMA, the loss history and the training clock.

    ``resumed_from`` is the step this process started at.
    """

    student: nn.Module
    ema: Any
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0

    @property
    def seconds(self) -> float | None:
        """Wall time from the first optimizer step to the last, over every leg of a resumed run (the checkpoints
        and callbacks between them included); None when an earlier leg did not record it."""
        return self.history[-1].get("seconds") if self.history else None

    def clock(self, started: float, key: str = "minutes") -> dict[str, Any]:
        """The training time for a run's record: ``key`` in minutes over every leg, None when an earlier leg kept no
        clock; a resumed fit adds the step it resumed at and this process's own minutes since ``started``."""
        facts: dict[str, Any] = {key: None if self.seconds is None else round(self.seconds / 60, 2)}
        if self.resumed_from:
            facts.update(resumed_at_step=self.resumed_from, minutes_this_process=round((time.time() - started) / 60, 2))
        return facts

    def final_model(self) -> nn.Module:
        """The student with EMA weights copied in when there is an EMA (the weights to export)."""
        if self.ema is not None:
            self.ema.copy_to(self.student.parameters())
        return self.student


def describe_clock(facts: dict[str, Any], key: str = "minutes") -> str:
    """The training time that ``FitResult.clock(..., key=key)`` recorded, in words for a report or a model card."""
    if facts[key] is not None:
        return f"{facts[key]:.1f} training minutes"
    return (f"resumed at step {facts['resumed_at_step']:,}; {facts['minutes_this_process']:.1f} minutes from there "
            "to the end (the earlier leg did not record its time)")


def freeze(model: nn.Module | None) -> nn.Module | None:
    """Put a teacher in eval mode with gradients off: done here, not in each method."""
    if model is not None:
        model.eval().requires_grad_(False)
    return model


_ACCELERATOR = None


def get_accelerator(mixed_precision: str = "no"):
    """One accelerate ``Accelerator`` per process (accelerate keeps global state; reuse it across rounds)."""
    global _ACCELERATOR
    from accelerate import Accelerator

    if _ACCELERATOR is None:
        # cpu=True without CUDA: accelerate then joins CPU processes (torchrun) with gloo instead of ignoring them.
        _ACCELERATOR = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    elif _ACCELERATOR.mixed_precision != mixed_precision:
        raise VlkdError(
            f"mixed_precision {mixed_precision!r} differs from this process's earlier {_ACCELERATOR.mixed_precision!r}"
        )
    return _ACCELERATOR


class _StepBatchSampler(Sampler[list[int]]):
    """Yields, for each micro-batch from ``start_step`` on, this process's stream positions."""

    def __init__(self, micro_batch: int, accum: int, processes: int, rank: int, start_step: int, steps: int):
        self.micro_batch, self.accum = micro_batch, accum
        self.processes, self.rank = processes, rank
        self.start_step, self.steps = start_step, steps

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        local = self.micro_batch // self.processes
        for micro in range(self.start_step * self.accum, self.steps * self.accum):
            first = micro * self.micro_batch + self.rank * local
            yield list(range(first, first + local))


class _PositionedDataset(Dataset):
    """Maps a stream position to a dataset index (seeded epoch permutations) and adds the sample's seed."""

    def __init__(self, dataset: Dataset, seed: int, unlimited: bool):
        self.dataset, self.seed, self.unlimited = dataset, seed, unlimited
        self.length = len(dataset)  # type: ignore[arg-type]
        if self.length == 0:
            raise VlkdError(f"dataset {getattr(dataset, 'spec', '')!r} is empty; nothing to train on")
        self._permutation_epoch = -1
        self._permutation: np.ndarray | None = None

    def index(self, position: int) -> int:
        if self.unlimited:
            return position % self.length
        epoch, offset = divmod(position, self.length)
        if epoch != self._permutation_epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            self._permutation_epoch = epoch
        return int(self._permutation[offset])  # type: ignore[index]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, position: int) -> dict:
        sample = dict(self.dataset[self.index(position)])
        sample["seed"] = sample_seed(self.seed, position)
        return sample


def default_collate(samples: list[dict]) -> dict:
    """Stack tensors and numbers; keep strings as lists."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float, bool, np.integer, np.floating)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of an interrupted write are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHECKPOINT.match(p.name))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(run_dir: Path, step: int, payload: dict, keep: int) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step-{step:08d}.pt"
    with atomic_file(path) as handle:
        torch.save(payload, handle)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint safely (``weights_only=True``: tensors and plain data, never code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle safely is the same user-facing problem
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}); delete it to resume "
                              "from the one before") from None


def _install_attention(models: Sequence[nn.Module | None], backend: str) -> None:
    try:
        from vlkd.kernels import use_attention
    except ImportError:  # kernels are optional for the loop's own tests
        return
    for model in models:
        if model is not None:
            use_attention(model, backend=backend, strict=False)  # an MLP student has none


def fit(
    method: Method,
    student: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    teacher: nn.Module | None = None,
    resume: bool = False,
    collate_fn: Callable[[list[dict]], dict] | None = None,
    callbacks: Sequence[Callable[[FitState], None]] = (),
    desc: str = "distill",
) -> FitResult:
    """Train ``student`` with ``method`` for ``config.steps`` optimizer steps; checkpoint into ``run_dir``.

    With ``resume`` the run continues from the newest complete checkpoint in ``run_dir/checkpoints``.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    accelerator = get_accelerator(config.mixed_precision)
    run_dir = Path(run_dir)
    processes, rank = accelerator.num_processes, accelerator.process_index
    micro_batch, remainder = divmod(config.batch_size, config.grad_accum)
    if remainder or micro_batch % processes:
        raise VlkdError(
            f"train.batch_size {config.batch_size} must split evenly into grad_accum {config.grad_accum} "
            f"micro-batches across {processes} process(es)"
        )
    checkpoints = list_checkpoints(run_dir)
    if resume and not checkpoints:
        raise CheckpointError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; run without --resume")
    if not resume and checkpoints:
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue or --overwrite")

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    freeze(teacher)
    _install_attention([student, teacher], config.attention)
    device = accelerator.device
    if teacher is not None:
        teacher.to(device)
    if isinstance(method, nn.Module):
        method.to(device)

    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise VlkdError("the student has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=tuple(config.adam_betas),
                                  weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.steps)
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay else None
    # The LR scheduler is not prepared: accelerate would step it once per process, but our steps are global.
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    model = accelerator.unwrap_model(wrapped)
    if ema is not None:
        ema.to(device)

    start_step, history = 0, []
    if resume:
        state = load_checkpoint(checkpoints[-1])
        model.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if isinstance(method, nn.Module):
            method.load_state_dict(state["method"])
        _set_rng_state(state["rng"])
        start_step, history = int(state["step"]), json.loads(state["history"])

    positioned = _PositionedDataset(dataset, config.seed, bool(getattr(dataset, "unlimited", False)))
    sampler = _StepBatchSampler(micro_batch, config.grad_accum, processes, rank, start_step, config.steps)
    loader = DataLoader(positioned, batch_sampler=sampler, collate_fn=collate_fn or default_collate,
                        num_workers=config.num_workers)
    batches = iter(loader)
    # The clock is carried in the history so that a resumed run reports its whole training time, not its last leg.
    earlier = history[-1].get("seconds") if history else 0.0
    clock = time.perf_counter()

    def checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            payload = {
                "step": step,
                "student": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "method": method.state_dict() if isinstance(method, nn.Module) else None,
                "rng": _rng_state(),
                "history": json.dumps(history),
                "config": json.dumps(dataclasses.asdict(config)),
            }
            _save_checkpoint(run_dir, step, payload, config.keep_checkpoints)
        accelerator.wait_for_everyone()

    progress = tqdm(total=config.steps, initial=start_step, desc=desc, disable=not accelerator.is_main_process,
                    dynamic_ncols=True)
    try:
        for step in range(start_step, config.steps):
            totals: dict[str, torch.Tensor] = {}
            for micro in range(config.grad_accum):
                batch = _to_device(next(batches), device)
                sync = micro == config.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                    terms = method(wrapped, teacher, batch)
                    _check_finite(terms, step + 1, accelerator, run_dir)
                    loss = sum(terms.values()) / config.grad_accum
                    accelerator.backward(loss)
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0) + value.detach() / config.grad_accum
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable)
            if hasattr(method, "after_step"):
                method.after_step(model)

            done = step + 1
            losses = {k: accelerator.reduce(v, reduction="mean").item() for k, v in totals.items()}
            record = {"step": done, "loss": sum(losses.values()), **losses, "lr": scheduler.get_last_lr()[0]}
            if earlier is not None:
                record["seconds"] = round(earlier + time.perf_counter() - clock, 3)
            history.append(record)
            progress.update(1)
            if done % config.log_every == 0 or done == config.steps:
                progress.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpoint(done)
            if accelerator.is_main_process:
                state = FitState(done, config.steps, model, ema, losses, run_dir)
                for callback in callbacks:
                    callback(state)
    finally:
        progress.close()  # on an error too, so that its message starts on a line of its own
    if accelerator.is_main_process:
        with atomic_file(run_dir / "history.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in history)
    return FitResult(student=model, ema=ema, history=history, steps=config.steps, resumed_from=start_step)


def _check_finite(terms: dict, step: int, accelerator: Any, run_dir: Path) -> None:
    bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
    flag = torch.tensor(float(bool(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() == 0:
        return
    last = list_checkpoints(run_dir)
    kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    name = bad[0] if bad else "(on another process)"
    value = terms[bad[0]].detach().float().mean().item() if bad else math.nan
    raise NonFiniteLossError(
        f"step {step}: loss term {name!r} is {value}; {kept}. Lower train.lr or check the data, then --resume"
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and CUDA) for code that runs outside ``fit``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
