"""The training engine: 2 gloo ranks with resume after a kill, hooks, exports, progress lines.

The toy training (a linear regression with EMA, warm-up/cosine schedule and validation) is defined
here; run as a script (``torchrun Testing/test_training_engine.py --output DIR ...``) it is the
program the multi-process tests launch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress
from diffusionreg.training.ema import EMA
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.lr import warmup_cosine
from diffusionreg.training.options import RunOptions

TRUE_WEIGHTS = torch.tensor([[1.0, -2.0, 0.5, 3.0]])


def toy_task(run: RunOptions, step_sleep: float = 0.0) -> TrainingTask:
    """Linear regression onto ``TRUE_WEIGHTS`` from random batches drawn with the engine's generator."""
    torch.manual_seed(7)
    net = torch.nn.Linear(4, 1)
    val_x = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))

    def step(module: torch.nn.Module, gen: torch.Generator):
        if step_sleep:
            time.sleep(step_sleep)  # leaves time to kill the run mid-way; changes no number
        x = torch.randn(8, 4, generator=gen)
        y = x @ TRUE_WEIGHTS.T + 0.01 * torch.randn(8, 1, generator=gen)
        loss = ((module(x) - y) ** 2).mean()
        return loss, {"rmse": float(loss.detach().sqrt())}

    def validate(model: torch.nn.Module) -> dict:
        with torch.no_grad():
            return {"val_mse": float(((model(val_x) - val_x @ TRUE_WEIGHTS.T) ** 2).mean())}

    return TrainingTask(
        name="affine",
        network=net,
        config_json=json.dumps({"name": "toy"}),
        seed=5,
        modality="mri",
        optimizer=torch.optim.Adam(net.parameters(), lr=0.2),
        step=step,
        lr_factor=lambda s: warmup_cosine(s, 3, run.steps),
        ema=EMA(net, 0.9, 0.75, 2),
        validate=validate,
        score=lambda m: m["val_mse"],
        description="toy regression",
        data=["toy-data"],
        val_data=["toy-val"],
    )


def _launch(out: Path, steps: int, *extra: str, step_sleep: float = 0.0) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--output",
        str(out),
        "--steps",
        str(steps),
        "--step-sleep",
        str(step_sleep),
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # own session for torchrun (its ranks get sessions of their own: they are killed by pid)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_two_gloo_ranks_resume_after_a_kill_as_if_never_stopped(tmp_path):
    steps, every = 24, 4
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    first = _launch(straight, steps, "--checkpoint-every", str(every))
    # the other run is killed (SIGKILL: no clean-up at all) once a mid-way checkpoint exists
    pids = tmp_path / "pids"
    victim = _launch(killed, steps, "--checkpoint-every", str(every), "--pid-dir", str(pids), step_sleep=0.25)
    deadline = time.monotonic() + 240
    seen = 0
    while time.monotonic() < deadline and victim.poll() is None:
        if (killed / "checkpoint.pt").exists():
            seen = int(_checkpoint(killed)["step"])
            if seen >= 2 * every:
                break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed: " + victim.communicate()[1][-2000:]
    for rank in (0, 1):
        os.kill(int((pids / f"rank{rank}").read_text()), signal.SIGKILL)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    _finish(first)
    at_kill = _checkpoint(killed)
    assert every <= at_kill["step"] < steps and at_kill["step"] % every == 0

    stdout = _finish(_launch(killed, steps, "--checkpoint-every", str(every), "--resume"))
    assert f"start step {at_kill['step']}/{steps}" in stdout and "world 2" in stdout
    resumed, reference = _checkpoint(killed), _checkpoint(straight)
    assert resumed["step"] == reference["step"] == steps and len(resumed["rng"]) == 2
    for key in ("model", "ema", "optim", "lr_schedule", "rng"):
        _assert_same_tensors(resumed[key], reference[key], key)
    # history continues after the checkpoint step (lines of the lost steps are repeated, not skipped)
    logged = [r["step"] for r in map(json.loads, (killed / "history.jsonl").read_text().splitlines()) if "step" in r]
    assert logged[-1] == steps and at_kill["step"] + 1 in logged
    # and the regression was learnt (the EMA weights approach the true ones)
    torch.manual_seed(7)
    initial = torch.nn.Linear(4, 1).weight.detach()
    weight = resumed["ema"]["weight"]
    assert (weight - TRUE_WEIGHTS).norm() < 0.5 * (initial - TRUE_WEIGHTS).norm(), weight


def test_one_process_hooks_best_export_registry_and_json_progress(tmp_path):
    from diffusionreg import models

    out = tmp_path / "toy-run"
    stream = io.StringIO()
    run = RunOptions(
        output=out,
        steps=30,
        val_every=10,
        checkpoint_minutes=60,
        history_every=5,
        registry=tmp_path / "reg" / "Models.json",
        command="diffusionreg train toy",
    )
    summary = run_training(toy_task(run), run, Progress("json", stream=stream))
    assert summary["step"] == 30 and summary["val_mse"] < 1.0

    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    fractions = [r["fraction"] for r in lines if r["stage"] == "train affine"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "step" in h] == [1, 5, 10, 15, 20, 25, 30]
    lrs = [h["lr"] for h in history if "lr" in h]
    assert lrs[0] == pytest.approx(0.2 * warmup_cosine(1, 3, 30)) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    validations = [h["validation"] for h in history if "validation" in h]
    assert [v["step"] for v in validations] == [10, 20, 30]

    entry = models.resolve("toy-run", "affine", registry_path=tmp_path / "reg" / "Models.json")
    models.verify(entry)  # sha256 in the registry matches the file
    assert entry.file.resolve() == (out / "best" / "model.safetensors").resolve() and entry.modality == "mri"
    best = min(validations, key=lambda v: v["val_mse"])
    card = entry.card.read_text()
    assert f"best at step {best['step']} of 30" in card and "diffusionreg train toy" in card
    assert "Seed: 5" in card and "toy-data" in card and models.sha256_file(entry.file) in card
    from safetensors.torch import load_file

    exported = load_file(str(entry.file))
    assert set(exported) == {"weight", "bias"}  # the plain network's keys (EMA weights)
    assert json.loads(entry.config.read_text()) == {"name": "toy"}


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path):
    run = RunOptions(output=tmp_path / "run", steps=10_000, val_every=0, max_minutes=0.5 / 60)
    summary = run_training(toy_task(run, step_sleep=0.02), run)
    state = _checkpoint(tmp_path / "run")
    assert 1 <= summary["step"] == state["step"] < 10_000 and "val_mse" in summary
    assert (tmp_path / "run" / "model.safetensors").exists()
    # a checkpoint also serves as weights (its EMA, under the network's own keys)
    from diffusionreg import models

    weights = models.load_state_dict(models.resolve(tmp_path / "run" / "checkpoint.pt", "affine"))
    assert set(weights) == {"weight", "bias"}
    # nothing lost: the run is continued with resume only, never overwritten
    with pytest.raises(InputError, match="--resume"):
        run_training(toy_task(run), run)
    assert _checkpoint(tmp_path / "run")["step"] == state["step"]


def _tiny_volumes(folder: Path) -> list[str]:
    from diffusionreg.image import Image, write_image

    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1).astype(np.float32)
    files = []
    for n in range(2):
        centre = np.array([10.0, 10.0, 10.0]) + rng.normal(size=3)
        path = folder / f"vol{n}.nii.gz"
        write_image(Image(np.exp(-((idx - centre) ** 2).sum(-1) / 30.0).astype(np.float32), np.diag([8.0, 8.0, 8.0, 1.0])), path)
        files.append(str(path))
    return files


def test_train_deformable_prints_json_progress(tmp_path):
    """``diffusionreg train deformable --progress json``: the lines Slicer's runner reads."""
    from diffusionreg.deformable.config import DeformableConfig, SITRegConfig

    files = _tiny_volumes(tmp_path)
    cfg = tmp_path / "cfg.json"
    tiny = SITRegConfig(feature_channels=(4, 8, 8), head_channels=(4, 8, 8))
    cfg.write_text(
        DeformableConfig(name="tiny", method="sitreg", grid_shape=(16, 16, 16), spacing_mm=12.0, sitreg=tiny).to_json()
    )
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusionreg",
            "train",
            "deformable",
            "--progress",
            "json",
            "--config",
            str(cfg),
            "--pairs",
            *files,
            "--val-pairs",
            f"{files[0]},{files[1]}",
            "--output",
            str(out),
            "--steps",
            "3",
            "--val-every",
            "2",
            "--threads",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    train = [x for x in records if x["stage"] == "train deformable"]
    assert train[0]["fraction"] == 0.0 and train[-1] == {"stage": "train deformable", "fraction": 1.0, "message": "done"}
    assert all(set(x) == {"stage", "fraction", "message"} for x in records)
    assert (out / "best" / "model.safetensors").exists() and (out / "Models.json").exists()


def _main() -> None:
    """The toy training as a program (every rank under torchrun runs this)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pid-dir", type=Path, default=None, help="write this rank's pid there (for a kill)")
    args = parser.parse_args()
    if args.pid_dir is not None:
        args.pid_dir.mkdir(parents=True, exist_ok=True)
        (args.pid_dir / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    run = RunOptions(
        output=args.output,
        steps=args.steps,
        resume=args.resume,
        val_every=8,
        threads=1,
        history_every=1,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=60,
    )
    run_training(toy_task(run, args.step_sleep), run, Progress("none"))


if __name__ == "__main__":
    _main()


def test_a_schedule_added_on_resume_starts_at_the_checkpoint_step(tmp_path):
    """A run checkpointed without a learning-rate schedule, resumed with one: the rate of the first
    resumed step is the schedule's at that step, not at step 0."""
    out = tmp_path / "run"
    first = RunOptions(output=out, steps=4, val_every=0, threads=1)
    task = toy_task(first)
    task.lr_factor = None
    run_training(task, first)
    resumed = RunOptions(output=out, steps=10, val_every=0, threads=1, resume=True)
    task = toy_task(resumed)
    task.lr_factor = lambda s: 1.0 / (1 + s)
    rates = []
    original = task.step

    def step(module, gen):
        rates.append(task.optimizer.param_groups[0]["lr"])
        return original(module, gen)

    task.step = step
    run_training(task, resumed)
    assert rates[0] == pytest.approx(0.2 / 5) and rates[-1] == pytest.approx(0.2 / 10)
