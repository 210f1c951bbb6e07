"""Split iterations (draw + loss): batches drawn in the loop or by worker processes, the device.

The toy regression of ``test_training_engine`` is written both ways; the split one must give the
same numbers as the single-step one without workers, deterministic numbers with workers, and
(on a GPU) the same training within float tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_training_engine import toy_task

from diffusionreg.errors import InputError, ParameterError
from diffusionreg.training.batches import BatchSource, to_device, training_device, worker_seed
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.options import RunOptions


def split_toy_task(run: RunOptions) -> TrainingTask:
    """The engine test's toy regression with its step split into a draw and a loss."""
    task = toy_task(run)
    true_weights = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def draw(gen: torch.Generator):
        x = torch.randn(8, 4, generator=gen)
        return {"x": x, "y": x @ true_weights.T + 0.01 * torch.randn(8, 1, generator=gen)}

    def loss(module: torch.nn.Module, batch: dict):
        value = ((module(batch["x"]) - batch["y"]) ** 2).mean()
        return value, {"rmse": float(value.detach().sqrt())}

    val_x = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))  # the engine test's validation set

    def validate(model: torch.nn.Module) -> dict:
        with torch.no_grad():
            x = val_x.to(next(model.parameters()).device)
            return {"val_mse": float(((model(x) - x @ true_weights.T.to(x.device)) ** 2).mean())}

    return dataclasses.replace(task, step=None, draw=draw, loss=loss, validate=validate)


def _losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def _train(out: Path, make, steps: int = 12, **run_fields) -> dict:
    run = RunOptions(output=out, steps=steps, val_every=6, history_every=1, device="cpu", **run_fields)
    return run_training(make(run), run)


def test_split_iteration_without_workers_repeats_the_single_step(tmp_path):
    single = _train(tmp_path / "single", toy_task)
    split = _train(tmp_path / "split", split_toy_task)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "single")
    assert split["val_mse"] == single["val_mse"]


def test_workers_are_deterministic_and_draw_their_own_batches(tmp_path):
    a = _train(tmp_path / "a", split_toy_task, data_workers=2)
    b = _train(tmp_path / "b", split_toy_task, data_workers=2)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a["val_mse"] == b["val_mse"]
    _train(tmp_path / "none", split_toy_task)
    assert _losses(tmp_path / "a") != _losses(tmp_path / "none")
    losses = _losses(tmp_path / "a")
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])  # the regression is learnt from the workers' batches


def test_a_resumed_run_with_workers_continues_with_fresh_batches(tmp_path):
    out = tmp_path / "run"
    _train(out, split_toy_task, steps=6, data_workers=2)
    first = _losses(out)
    _train(out, split_toy_task, steps=12, data_workers=2, resume=True)
    resumed = _losses(out)[len(first) :]
    assert len(resumed) == 6
    assert resumed != first  # not the start's batches again
    assert worker_seed(5, 0, 0) != worker_seed(5, 6, 0) != worker_seed(5, 6, 1)


def test_batch_source_takes_workers_in_turn():
    def draw(gen):
        return torch.rand(1, generator=gen)

    source = BatchSource(draw, torch.Generator().manual_seed(0), workers=2, seed=3, start_step=0)
    drawn = [float(source.next()) for _ in range(4)]
    source.close()
    expected = []
    gens = [torch.Generator().manual_seed(worker_seed(3, 0, w)) for w in (0, 1)]
    for _ in range(2):
        expected += [float(draw(g)) for g in gens]
    assert drawn == expected


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    Pair = namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        name: str

    value = {"batch": Batch(torch.ones(2), "mri"), "pair": Pair(torch.zeros(1), 3), "list": [torch.ones(1), "ct"]}
    assert to_device(value, torch.device("cpu")) is value
    moved = to_device(value, torch.device("meta"))  # a device every torch has, without a GPU
    assert moved["batch"].x.device.type == "meta" and moved["batch"].name == "mri"
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device.type == "meta" and moved["pair"].b == 3
    assert moved["list"][0].device.type == "meta" and moved["list"][1] == "ct"
    assert value["batch"].x.device.type == "cpu"  # the input is untouched


def test_training_device_choices():
    assert training_device("cpu", split=False, what="x").type == "cpu"
    assert training_device("auto", split=False, what="x").type == "cpu"  # a single-step training stays on the CPU
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="CUDA is not available"):
            training_device("cuda", split=True, what="x")
    else:
        with pytest.raises(InputError, match="runs on the CPU only"):
            training_device("cuda", split=False, what="the toy training")


def test_bad_data_workers_is_refused(tmp_path):
    with pytest.raises(InputError, match="--data-workers"):
        RunOptions(output=tmp_path, data_workers=-1)
    result = subprocess.run(
        [sys.executable, "-m", "diffusionreg", "train", "midline", "--stage", "diffusion-normal", "--template-dir", str(tmp_path),
         "--output", str(tmp_path / "run"), "--data-workers", "-2", "--progress", "none"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --data-workers must be >= 0"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_training_on_a_gpu(tmp_path, workers):
    cpu = _train(tmp_path / "cpu", split_toy_task, data_workers=workers)
    run = RunOptions(output=tmp_path / "gpu", steps=12, val_every=6, history_every=1, device="cuda", data_workers=workers)
    gpu = run_training(split_toy_task(run), run)
    assert _losses(tmp_path / "gpu") == pytest.approx(_losses(tmp_path / "cpu"), rel=1e-4, abs=1e-6)
    assert gpu["val_mse"] == pytest.approx(cpu["val_mse"], rel=1e-3, abs=1e-6)
    # a checkpoint written from the GPU resumes on the CPU
    more = RunOptions(
        output=tmp_path / "gpu", steps=14, val_every=6, history_every=1, device="cpu", resume=True, data_workers=workers
    )
    assert run_training(split_toy_task(more), more)["step"] == 14


def _nothing(*args):
    return None


@pytest.mark.parametrize(
    "parts",
    [
        {"draw": None, "loss": None},  # no iteration
        {"loss": None},  # a draw without a loss
        {"draw": None},  # a loss without a draw
        {"step": _nothing},  # a single step and a split one
    ],
)
def test_a_task_has_one_kind_of_iteration(tmp_path, parts):
    task = split_toy_task(RunOptions(output=tmp_path, device="cpu"))
    with pytest.raises(ValueError, match="either step or both draw and loss"):
        dataclasses.replace(task, **parts)
