"""The deformable pipeline on CUDA gives the CPU's result (marked ``gpu``; skipped without CUDA).

Each test registers one small real pair twice, on the CPU and on CUDA, through the same public
call (:func:`diffusionreg.deformable.register.register_deformable`: network, instance
optimisation, velocity refinement with the sparse L1 support, output fields on the fixed grid,
inverse solved against them, quality metrics) and compares what a user gets: the written
fields (LPS mm) and the task's accuracy. CUDA convolutions run in TF32 by default (10-bit
mantissa), so the results agree to rounding, not bit for bit; the tolerances are stated per test
and are far below the pipelines' own accuracy (TRE ~2 mm, voxels of 2-3.6 mm). The measured
differences are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionreg import metrics
from diffusionreg.deformable.register import load_model, register_deformable
from diffusionreg.image import Image, read_image, resample, resized_grid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample"


@pytest.fixture(autouse=True)
def _cpu_threads():
    """The CPU reference run uses the machine's cores (a GPU machine has many; conftest keeps 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


def on_both_devices(fixed: Image, moving: Image, model_name: str, refine: dict | None = None, **options):
    """``(cpu result, cuda result)`` of the same registration (``refine``: settings replaced in
    the model's refinement config)."""
    results = []
    for device in ("cpu", "cuda"):
        model = load_model(model_name, device=device)
        if refine:
            inference = model.cfg.inference
            inference = dataclasses.replace(inference, refine=dataclasses.replace(inference.refine, **refine))
            model.cfg = dataclasses.replace(model.cfg, inference=inference)
        results.append(register_deformable(fixed, moving, model, want_inverse=True, **options))
    return results


def field_difference(a: Image, b: Image, where: np.ndarray | None = None) -> dict[str, float]:
    """``|a - b|`` (mm) of two displacement images, over ``where`` (a mask) or everywhere."""
    d = np.linalg.norm(a.array.astype(np.float64) - b.array.astype(np.float64), axis=-1)
    if where is not None:
        d = d[where]
    return {"mean_mm": float(d.mean()), "p99_mm": float(np.percentile(d, 99)), "max_mm": float(d.max())}


def brain_sample() -> tuple[Image, Image, Image, Image]:
    return tuple(
        read_image(SAMPLE / name)
        for name in ("sample_fixed.nii.gz", "sample_moving.nii.gz", "sample_fixed_labels.nii.gz", "sample_moving_labels.nii.gz")
    )


def dice(fixed_labels: Image, moving_labels: Image, forward) -> float:
    warped = resample(moving_labels, fixed_labels.grid, forward, "nearest")
    labels = [int(v) for v in np.unique(fixed_labels.array) if v != 0]
    return float(np.nanmean(list(metrics.dice_per_label(fixed_labels.array, warped.array, labels).values())))


def test_network_only_on_cuda_matches_cpu():
    """brain-mri (SITReg, its fixed-point inversions) on the 2 mm sample pair, network only: the
    forward field within 0.02 mm mean / 0.2 mm max of the CPU's, the solved inverse within 0.02 mm
    mean / 0.05 mm p99 (a few voxels whose preimage leaves the fixed grid keep their best iterate,
    which rounding can move by ~0.4 mm; CPU emulation of TF32 convolutions: 0.0025 mean, 0.025 max,
    inverse p99 0.0064 mm)."""
    fixed, moving, _, _ = brain_sample()
    cpu, cuda = on_both_devices(fixed, moving, "brain-mri", io_steps=0, refine_iterations=0)
    forward = field_difference(cpu.forward.field, cuda.forward.field)
    inverse = field_difference(cpu.inverse.field, cuda.inverse.field)
    print(f"network only, brain sample: forward {forward}, inverse {inverse}")
    assert cuda.u.device.type == "cpu" and cuda.metrics["folding_percent"] == cpu.metrics["folding_percent"]
    assert forward["mean_mm"] < 0.02 and forward["max_mm"] < 0.2
    assert inverse["mean_mm"] < 0.02 and inverse["p99_mm"] < 0.05


def test_brain_default_on_cuda_matches_cpu():
    """brain-mri's default (network + 30 dense-NCC refinement iterations, 20 on the coarse grid):
    Dice of the sample's 13 structures within 0.005, the forward field within 0.1 mm mean of the
    CPU's (Adam's normalised steps amplify rounding: CPU emulation of TF32 gave 0.031 mm mean)."""
    fixed, moving, fixed_labels, moving_labels = brain_sample()
    cpu, cuda = on_both_devices(fixed, moving, "brain-mri")
    assert cuda.metrics["refine_iterations"] == 30
    forward = field_difference(cpu.forward.field, cuda.forward.field)
    dice_cpu, dice_cuda = dice(fixed_labels, moving_labels, cpu.forward), dice(fixed_labels, moving_labels, cuda.forward)
    print(f"default, brain sample: forward {forward}, Dice cpu {dice_cpu:.4f} cuda {dice_cuda:.4f}")
    assert abs(dice_cuda - dice_cpu) < 0.005
    assert forward["mean_mm"] < 0.1
    assert cuda.metrics["folding_percent"] == 0.0


def test_lung_io_and_sparse_refinement_on_cuda_matches_cpu(shared_data):
    """lung-vessels on the sample pair (case 054) at half resolution (2 mm): 5 instance-optimisation
    steps and 12 refinement iterations with the sparse L1 support (9 on the blurred coarse grids,
    the default's share), every supported voxel carried (``sample_fraction`` 1: the drawn subset
    depends on the support's size, which rounding on another device may change by a voxel). Landmark TRE within 0.1 mm of the CPU's, forward field within 0.3 mm mean
    over the vessels, the same support share within 1 % (Adam on the network's weights amplifies
    rounding; CPU emulation of TF32 convolutions: TRE 1.831 vs 1.838 mm, 0.092 mm mean over the
    vessels, support 0.2920 vs 0.2922)."""
    from diffusionreg.evaluation import read_landmarks

    full_fixed = read_image(SAMPLE / "lung_vessels_fixed.nii.gz")
    full_moving = read_image(SAMPLE / "lung_vessels_moving.nii.gz")
    half = resized_grid(full_fixed.grid, tuple(s // 2 for s in full_fixed.shape))
    fixed = resample(full_fixed, half, None, "linear")
    moving = resample(full_moving, half, None, "linear")
    folder = shared_data / "lung" / "vessels_val_cc_by"
    landmarks = read_landmarks(folder / "case_054_landmarks_voxel.csv", full_fixed.grid, full_moving.grid)
    cpu, cuda = on_both_devices(fixed, moving, "lung-vessels", {"sample_fraction": 1.0}, io_steps=5, refine_iterations=12)
    assert cuda.metrics["instance_optimization_steps"] == 5 and cuda.metrics["refine_coarse_iterations"] == 9
    vessels = fixed.array > 0
    forward = field_difference(cpu.forward.field, cuda.forward.field, vessels)
    tre = [float(np.linalg.norm(r.forward.map_points(landmarks.fixed) - landmarks.moving, axis=1).mean()) for r in (cpu, cuda)]
    print(
        f"IO + sparse refinement, lung 054 at 2 mm: forward over vessels {forward}, TRE cpu {tre[0]:.3f} cuda {tre[1]:.3f} mm, "
        f"support {cpu.metrics['refine_support_fraction']:.3f} / {cuda.metrics['refine_support_fraction']:.3f}"
    )
    assert abs(tre[1] - tre[0]) < 0.1
    assert forward["mean_mm"] < 0.3
    assert abs(cuda.metrics["refine_support_fraction"] - cpu.metrics["refine_support_fraction"]) < 0.01
    assert cuda.metrics["folding_percent"] == 0.0
