"""Our real trainings on a GPU (marked ``gpu``): the same first steps as on the CPU.

A split iteration draws every random number on the CPU, so with the same seed the GPU run sees
the CPU run's batches; the losses agree to float tolerance (cuDNN's convolutions sum in another
order). Each training runs a few steps through the command line, with and without batch workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = 4


def _train(repo_root: Path, out: Path, device: str, args: list[str], workers: int = 0) -> list[float]:
    command = [sys.executable, "-m", "diffusionreg", "train", *args, "--output", str(out), "--steps", str(STEPS)]
    command += ["--val-every", "0", "--device", device, "--data-workers", str(workers), "--progress", "none"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    final = lines[-1]["validation"]
    # the first step's loss, the running average over every step, the validation loss at the end
    return [lines[0]["loss"], final["loss_avg"], final["val_loss"]]


def _midline_args(data: Path) -> list[str]:
    heads = data / "headct"
    return ["midline", "--stage", "diffusion-all", "--template-dir", str(heads), "--threads", "1"]


def _affine_args(data: Path) -> list[str]:
    brain, heads = data / "brain", data / "headct"
    return [
        "affine", "--data", str(brain / "oasis_A_norm.nii.gz"), "--modality", "mri",
        "--data", str(heads / "scct_head_template_2mm.nii.gz"), "--modality", "ct", "--config", "compact", "--threads", "1",
    ]  # fmt: skip


@pytest.mark.parametrize("training", ["midline", "affine"])
def test_the_first_steps_match_the_cpu(tmp_path, repo_root, shared_data, training):
    args = _midline_args(shared_data) if training == "midline" else _affine_args(shared_data)
    cpu = _train(repo_root, tmp_path / "cpu", "cpu", args)
    gpu = _train(repo_root, tmp_path / "gpu", "cuda", args)
    assert gpu == pytest.approx(cpu, rel=2e-3, abs=1e-5)
    assert (tmp_path / "gpu" / "model.safetensors").is_file()


def test_batch_workers_feed_a_gpu_training(tmp_path, repo_root, shared_data):
    losses = _train(repo_root, tmp_path / "gpu", "cuda", _midline_args(shared_data), workers=2)
    assert all(loss == loss and 0 < loss < 2 for loss in losses)  # finite and in the range of an epsilon MSE
