"""Runs that are killed and resumed end where an uninterrupted run ends; killed runs leave no output folder;
several processes train what one process trains.

A kill is a real SIGKILL of a child process running `vlkd distill`, sent from inside it at a chosen moment (the
Nth call of a function: in the middle of an optimizer step, half-way through writing a checkpoint, while a stage
or the output folder is being written), so the moments are exact and the test is repeatable.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from clip_fixtures import make_tiny_teacher
from test_clip_runner import TINY
from safetensors.torch import load_file
from test_diffusion_runner import save_teacher

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Kill:
    """SIGKILL the run at the ``nth`` call of ``target`` (module.attribute): ``before`` it runs, ``after`` it
    returns, or ``partial`` (torch.save only): half of the bytes written and synced, then the kill."""

    target: str
    nth: int
    mode: str = "before"


def _install(kill: Kill) -> None:
    module_name, attribute = kill.target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, attribute)
    calls = [0]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != kill.nth:
            return real(*args, **kwargs)
        if kill.mode == "before":
            die()
        if kill.mode == "partial":
            obj, handle = args[0], args[1]
            buffer = io.BytesIO()
            real(obj, buffer, **kwargs)
            data = buffer.getvalue()
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
            die()
        result = real(*args, **kwargs)
        die()
        return result

    setattr(module, attribute, wrapper)


def child_main() -> None:
    """Entry point of a killed run's process: ``python -c ... KILL_JSON ARGV...``."""
    spec = json.loads(sys.argv[1])
    if spec is not None:
        _install(Kill(**spec))
    from vlkd.cli import main

    raise SystemExit(main(sys.argv[2:]))


def run_vlkd(argv: list[str], kill: Kill | None = None) -> int:
    """`vlkd` in a fresh process (a forked one can inherit a lock another thread held, and hang); its exit code,
    or minus the signal that ended it."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_reliability; " \
           "test_reliability.child_main()"
    spec = json.dumps(None if kill is None else {"target": kill.target, "nth": kill.nth, "mode": kill.mode})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code, spec, *argv], env=env, cwd=REPO, timeout=600,
                          capture_output=True, text=True)
    return done.returncode


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder``, keyed by file and name."""
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            found[f"{path.relative_to(folder)}:{name}"] = tensor.float()
    return found


def assert_same_weights(a: Path, b: Path, tolerance: float = 1e-6) -> None:
    first, second = weights(a), weights(b)
    assert first and first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst <= tolerance, worst


def kill_and_resume(tmp_path: Path, argv: list[str], kills: list[Kill]) -> Path:
    """Run ``argv`` killed at each of ``kills`` in turn (resuming after each), then to the end; the output."""
    out = tmp_path / "killed"
    command = [*argv, "--out", str(out)]
    for number, kill in enumerate(kills):
        code = run_vlkd(command + ["--resume"] * (number > 0), kill)
        assert code == -signal.SIGKILL, f"kill {number + 1} ({kill}) did not happen: exit code {code}"
        assert not out.exists(), f"a killed run left {out} (kill {number + 1}: {kill})"
    assert run_vlkd(command + ["--resume"]) == 0
    assert not out.with_name(out.name + ".run").exists()
    return out


MID_STEP = "vlkd.train._check_finite"  # called in every micro-step, between the forward and the backward pass
CHECKPOINT_WRITE = "torch.save"  # only checkpoints are written with torch.save


def diffusion_recipe(tmp_path: Path, teacher: Path, pipeline: str, method: dict) -> str:
    lines = [f"pipeline: {pipeline}", f"teacher: {teacher}", "data: digits:8@all", "method:"]
    lines += [f"  {key}: {value}" for key, value in method.items()]
    lines += ["train: {steps: 4, batch_size: 8, checkpoint_every: 2, seed: 3}", "eval: {enabled: false}"]
    path = tmp_path / f"{pipeline}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "ddpm")


@pytest.fixture(scope="module")
def clip_teacher(tmp_path_factory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_progressive_killed_five_times_ends_as_an_uninterrupted_run(tmp_path, ddpm_teacher):
    argv = ["distill", diffusion_recipe(tmp_path, ddpm_teacher, "progressive", {"teacher_steps": 8,
                                                                                "student_steps": 2})]
    assert run_vlkd([*argv, "--out", str(tmp_path / "whole")]) == 0
    killed = kill_and_resume(tmp_path, argv, [
        Kill(MID_STEP, 3),  # round 1, step 3
        Kill(CHECKPOINT_WRITE, 1, "partial"),  # round 1, half-way through the step-4 checkpoint
        Kill("vlkd.diffusion.workspace.save_student", 1, "after"),  # round 1's student saved, not yet renamed
        Kill(MID_STEP, 3),  # round 2, step 3
        Kill("vlkd.diffusion.workspace.write_info", 2),  # round 2 exported; assembling the output folder
    ])
    assert_same_weights(tmp_path / "whole", killed)


def test_consistency_killed_five_times_ends_as_an_uninterrupted_run(tmp_path, ddpm_teacher):
    argv = ["distill", diffusion_recipe(tmp_path, ddpm_teacher, "consistency", {"num_solver_steps": 10}),
            "--set", "train.steps=8", "--set", "train.ema_decay=0.9"]
    assert run_vlkd([*argv, "--out", str(tmp_path / "whole")]) == 0
    killed = kill_and_resume(tmp_path, argv, [
        Kill(MID_STEP, 3),
        Kill(CHECKPOINT_WRITE, 1, "partial"),  # the step-4 checkpoint
        Kill(MID_STEP, 4),  # step 6, after the step-4 checkpoint was written this time
        Kill("vlkd.diffusion.workspace.save_student", 1, "after"),
        Kill("vlkd.diffusion.workspace.write_info", 2),
    ])
    assert_same_weights(tmp_path / "whole", killed)


# The CLIP runner tests' tiny recipe, checkpointed every 2 steps and with a variable length, no evaluation.
CLIP_RECIPE = TINY.replace("train: {{steps: 3, batch_size: 16, lr: 1e-3}}",
                           "train: {{steps: {steps}, batch_size: 16, lr: 1e-3, checkpoint_every: 2}}"
                           ).replace("eval: {{num_samples: 40, batch_size: 40}}", "eval: {{enabled: false}}")


def clip_recipe(tmp_path: Path, teacher: Path, steps: int = 8) -> str:
    path = tmp_path / "clip.yaml"
    path.write_text(CLIP_RECIPE.format(teacher=teacher, cache=tmp_path / "cache", steps=steps))
    return str(path)


def test_clip_killed_five_times_ends_as_an_uninterrupted_run(tmp_path, clip_teacher):
    argv = ["distill", clip_recipe(tmp_path, clip_teacher)]
    assert run_vlkd([*argv, "--out", str(tmp_path / "whole")]) == 0
    shutil.rmtree(tmp_path / "cache")  # the killed run must fill its own teacher cache
    killed = kill_and_resume(tmp_path, argv, [
        Kill("safetensors.torch.save", 1),  # while the teacher-embedding cache is being written
        Kill(MID_STEP, 3),
        Kill(CHECKPOINT_WRITE, 1, "partial"),
        Kill(MID_STEP, 3),  # step 5, after the step-4 checkpoint was written this time
        Kill("vlkd.clip.export.write_student", 1, "after"),  # the student written, the output not yet renamed
    ])
    assert_same_weights(tmp_path / "whole", killed)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _two_processes(launcher: str, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The three ways to start 2 CPU processes: accelerate through torchrun (--multi_gpu, which without a GPU runs
    CPU processes), accelerate through Open MPI (--cpu, its documented CPU launch), and torchrun itself."""
    port = str(_free_port())
    accelerate = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if launcher == "accelerate":
        command = [*accelerate, "--multi_gpu"]
    elif launcher == "accelerate-mpirun":
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        command = [*accelerate, "--cpu", "--mpirun_hostfile", str(hostfile)]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # containers often run as root
    else:
        command = ["torchrun", "--nproc_per_node", "2", "--master_port", port]
    return subprocess.run([*command, "-m", "vlkd", *argv], capture_output=True, text=True, env=env, timeout=600,
                          cwd=REPO)


@pytest.mark.parametrize("pipeline, launcher", [
    ("progressive", "accelerate"),
    ("clip-distill", "torchrun"),
    pytest.param("consistency", "accelerate-mpirun", marks=pytest.mark.skipif(
        shutil.which("mpirun") is None, reason="needs Open MPI's mpirun (apt install openmpi-bin)")),
])
def test_two_processes_train_what_one_process_trains(tmp_path, ddpm_teacher, clip_teacher, pipeline, launcher):
    if pipeline == "clip-distill":
        argv, history = ["distill", clip_recipe(tmp_path, clip_teacher, steps=20)], "training/history.jsonl"
    else:
        method = {"teacher_steps": 4, "student_steps": 2} if pipeline == "progressive" else {"num_solver_steps": 10}
        name = "steps-2" if pipeline == "progressive" else "student"
        argv = ["distill", diffusion_recipe(tmp_path, ddpm_teacher, pipeline, method), "--set", "train.steps=20"]
        history = f"training/{name}-history.jsonl"
    assert run_vlkd([*argv, "--out", str(tmp_path / "one")]) == 0
    two = _two_processes(launcher, [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # only the main process reports (and writes)
    one_losses, two_losses = _history(tmp_path / "one" / history), _history(tmp_path / "two" / history)
    assert len(one_losses) == len(two_losses) == 20
    for a, b in zip(one_losses, two_losses):
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds"}:  # the training clock is wall time, not a result
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_accelerate_cpu_launch_that_starts_one_process_is_refused(tmp_path, ddpm_teacher, monkeypatch, capsys):
    from vlkd.cli import main

    # What `accelerate launch --cpu --num_processes 2` (no mpirun) sets for the one process it starts.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = diffusion_recipe(tmp_path, ddpm_teacher, "progressive", {"teacher_steps": 4, "student_steps": 2})
    assert main(["distill", recipe, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--multi_gpu" in err[0] and "torchrun" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()
