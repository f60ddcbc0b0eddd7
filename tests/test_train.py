"""The training loop: deterministic data order, resume equal to an uninterrupted run, atomic checkpoints."""

import json
import math

import pytest
import torch
from torch import nn

from vlkd import rng
from vlkd.errors import CheckpointError, NonFiniteLossError, VlkdError
from vlkd.recipes import TrainConfig
from vlkd.train import _PositionedDataset, _StepBatchSampler, fit, list_checkpoints, load_checkpoint


class Ramp(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"x": torch.full((4,), i / 40.0), "label": i}


class NoisyRegression:
    """A toy method that draws per-sample noise the way real methods do."""

    def __call__(self, student, teacher, batch):
        noise = rng.randn(batch, (4,), "noise", batch["x"].device)
        return {"mse": ((student(batch["x"] + 0.1 * noise) - batch["x"]) ** 2).mean()}


def run(tmp_path, steps, *, resume=False, method=None, **overrides):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    config = TrainConfig(steps=steps, batch_size=8, lr=1e-2, checkpoint_every=3, ema_decay=0.9, log_every=1,
                         **overrides)
    result = fit(method or NoisyRegression(), model, Ramp(), config, tmp_path, resume=resume)
    return result


def test_resume_equals_uninterrupted(tmp_path):
    straight = run(tmp_path / "a", 10)
    run(tmp_path / "b", 7)  # stops after writing a checkpoint at step 6 and the final one at 7
    for path in list_checkpoints(tmp_path / "b")[:-1]:
        path.unlink()
    resumed = run(tmp_path / "b", 10, resume=True)
    for a, b in zip(straight.student.state_dict().values(), resumed.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert [h["mse"] for h in straight.history] == pytest.approx([h["mse"] for h in resumed.history], abs=1e-7)
    assert len(resumed.history) == 10
    # The training clock runs on across the resume: the whole run's time, not the last leg's.
    seconds = [h["seconds"] for h in resumed.history]
    assert resumed.resumed_from == 7 and straight.resumed_from == 0
    assert seconds == sorted(seconds) and resumed.seconds == seconds[-1] >= seconds[6] > 0


def test_resume_without_a_recorded_clock_says_unknown(tmp_path):
    run(tmp_path, 6)
    last = list_checkpoints(tmp_path)[-1]
    state = load_checkpoint(last)
    state["history"] = json.dumps([{k: v for k, v in h.items() if k != "seconds"}
                                   for h in json.loads(state["history"])])  # as written before the clock existed
    torch.save(state, last)
    resumed = run(tmp_path, 8, resume=True)
    assert resumed.seconds is None and resumed.resumed_from == 6


def test_partial_checkpoint_is_never_read(tmp_path):
    run(tmp_path, 6)
    folder = tmp_path / "checkpoints"
    (folder / ".step-00000009.pt.abc.tmp").write_bytes(b"half a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000006.pt"]
    state = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert state["step"] == 6 and "optimizer" in state and "rng" in state and state["ema"] is not None


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run(tmp_path, 3)
    path = list_checkpoints(tmp_path)[-1]
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run(tmp_path, 6, resume=True)


def test_resume_without_checkpoint_and_rerun_into_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        run(tmp_path / "empty", 3, resume=True)
    run(tmp_path / "full", 3)
    with pytest.raises(CheckpointError, match="--resume"):
        run(tmp_path / "full", 3)


def test_non_finite_loss_names_step_and_term(tmp_path):
    class Explodes(NoisyRegression):
        calls = 0

        def __call__(self, student, teacher, batch):
            terms = super().__call__(student, teacher, batch)
            self.calls += 1
            terms["blowup"] = torch.tensor(math.inf if self.calls == 5 else 0.0)
            return terms

    with pytest.raises(NonFiniteLossError, match=r"step 5: loss term 'blowup' is inf.*last good checkpoint"):
        run(tmp_path, 30, method=Explodes())
    assert list_checkpoints(tmp_path)  # what was written before the failure is kept


def test_batch_must_split_evenly(tmp_path):
    with pytest.raises(VlkdError, match="grad_accum"):
        run(tmp_path, 2, grad_accum=3)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    one = run(tmp_path / "one", 4)
    two = run(tmp_path / "two", 4, grad_accum=2)
    for a, b in zip(one.student.parameters(), two.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_process_shards_cover_the_global_batch():
    single = list(_StepBatchSampler(8, 1, 1, 0, start_step=2, steps=4))
    shards = [list(_StepBatchSampler(8, 1, 2, rank, start_step=2, steps=4)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*shards)] == single
    assert single[0] == list(range(16, 24))


def test_epochs_are_permutations_and_seeded():
    data = _PositionedDataset(Ramp(), seed=3, unlimited=False)
    first = [data.index(p) for p in range(40)]
    second = [data.index(p) for p in range(40, 80)]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40)) and first != second
    assert first == [_PositionedDataset(Ramp(), seed=3, unlimited=False).index(p) for p in range(40)]
    assert data[5]["seed"] != data[6]["seed"]


def test_per_sample_draws_do_not_depend_on_batch_split():
    seeds = torch.tensor([rng.sample_seed(0, p) for p in range(6)])
    whole = rng.randn({"seed": seeds}, (3,), "noise")
    halves = torch.cat([rng.randn({"seed": seeds[:3]}, (3,), "noise"), rng.randn({"seed": seeds[3:]}, (3,), "noise")])
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)
    assert not torch.equal(whole, rng.randn({"seed": seeds}, (3,), "other-stream"))
