"""Deformable registration path: exact world geometry, CLI end to end, bad inputs, DDP training."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionreg.deformable.config import DeformableConfig, DeformableInference, ICONConfig, SITRegConfig
from diffusionreg.deformable.register import (
    DeformableModel,
    build_network,
    export_model,
    register_deformable,
    world_field,
    world_field_points,
)
from diffusionreg.image import Image, centred_grid, read_image, write_image
from diffusionreg.spaces import apply_affine
from diffusionreg.transforms import AffineTransform, read_transform, write_transform

REPO = Path(__file__).resolve().parents[1]
TINY_SITREG = DeformableConfig(
    name="test-sitreg",
    method="sitreg",
    grid_shape=(16, 16, 16),
    spacing_mm=12.0,
    sitreg=SITRegConfig(feature_channels=(4, 8, 8), head_channels=(4, 8, 8)),
)
TINY_ICON = DeformableConfig(
    name="test-icon",
    method="icon",
    grid_shape=(16, 16, 16),
    spacing_mm=12.0,
    icon=ICONConfig(channels=(4, 8, 8, 8, 8, 8), smoothing_kernel=3, squarings=6),
    inference=DeformableInference(io_steps=2, io_lr=1e-3),
)


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


@pytest.fixture(scope="module")
def ct(shared_data) -> Image:
    return read_image(shared_data / "lung" / "elastix_lung" / "3DCT_lung_baseline_small.mha")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for cfg in (TINY_SITREG, TINY_ICON):
        torch.manual_seed(0)
        out[cfg.method] = root / cfg.method
        export_model(build_network(cfg), cfg, out[cfg.method])
    return out


def moved_copy(image: Image, matrix: np.ndarray) -> Image:
    """The same voxels placed elsewhere: moving(T x) = fixed(x) for the 4x4 fixed->moving map T."""
    return Image(image.array.copy(), matrix @ image.affine)


def test_identity_network_gives_exactly_the_initial_transform(ct):
    """Untrained SITReg heads are zero: D must be T0 - id on the fixed grid, Dinv its inverse."""
    model = DeformableModel(build_network(TINY_SITREG).eval(), TINY_SITREG)
    t0 = np.eye(4)
    t0[:3, :3] = rotation((1, 2, 3), 7.0)
    t0[:3, 3] = (4.0, -3.0, 2.5)
    moving = moved_copy(ct, t0)
    result = register_deformable(ct, moving, model, AffineTransform(t0), io_steps=0, want_inverse=True, want_jacobian=True)
    assert float(result.u.abs().max()) == 0.0
    fixed_points = ct.grid.voxel_centres_world().reshape(-1, 3)
    expected = apply_affine(t0, fixed_points) - fixed_points
    np.testing.assert_allclose(result.forward.field.array.reshape(-1, 3), expected, atol=2e-4)
    assert result.forward.grid.same_as(ct.grid)
    assert result.inverse.grid.same_as(moving.grid)
    moving_points = moving.grid.voxel_centres_world().reshape(-1, 3)
    expected_inv = apply_affine(np.linalg.inv(t0), moving_points) - moving_points
    np.testing.assert_allclose(result.inverse.field.array.reshape(-1, 3), expected_inv, atol=2e-4)
    np.testing.assert_allclose(result.jacobian.array, 1.0, atol=1e-5)
    assert result.metrics["folding_percent"] == 0.0


def test_network_field_becomes_world_millimetres_exactly():
    """One network voxel along axis 0 is the grid's first column in LPS mm, for an oblique fixed grid."""
    direction = rotation((0, 1, 1), 20.0)
    fixed_grid = centred_grid((10, 12, 9), (1.5, 1.0, 2.0), (10.0, -5.0, 3.0), direction)
    net_grid = centred_grid((16, 16, 16), 3.0, (10.0, -5.0, 3.0), np.eye(3))
    u = torch.zeros(1, 3, 16, 16, 16)
    u[:, 0] = 1.0
    u[:, 2] = -0.5
    d = world_field(u, net_grid, fixed_grid)
    expected = net_grid.affine[:3, 0] * 1.0 - 0.5 * net_grid.affine[:3, 2]
    np.testing.assert_allclose(d.reshape(-1, 3), np.broadcast_to(expected, (d.size // 3, 3)), atol=1e-5)


def test_world_field_with_an_affine_outer_equals_carrying_every_point():
    """The matrix form (affine parts folded in float64, the field resampled over slabs) gives what
    mapping every voxel through G (x + u(x)) and the outer affine gives, slabs and reference included."""
    direction = rotation((1, 2, 0), 25.0)
    target = centred_grid((13, 11, 9), (1.5, 1.0, 2.0), (10.0, -5.0, 3.0), direction)
    net_grid = centred_grid((12, 10, 14), 2.5, (8.0, -4.0, 1.0), rotation((0, 0, 1), 10.0))
    g = torch.Generator().manual_seed(3)
    u = torch.nn.functional.interpolate(torch.randn(1, 3, 3, 3, 3, generator=g) * 2, size=(12, 10, 14), mode="trilinear")
    outer = AffineTransform(np.array([[0.97, 0.06, 0.0, 4.0], [-0.05, 1.02, 0.03, -6.0], [0.0, 0.02, 0.99, 2.5], [0, 0, 0, 1]]))
    reference = target.affine.copy()
    reference[:3, 3] += (1.0, -2.0, 0.5)
    for kwargs in ({}, {"outer": outer}, {"outer": outer, "reference": reference}, {"reference": reference}):
        fast = world_field(u, net_grid, target, slab_points=300, **kwargs)
        slow = world_field_points(u, net_grid, target, slab_points=300, **kwargs)
        assert np.abs(slow).max() > 1.0  # a real displacement, not zeros on both sides
        np.testing.assert_allclose(fast, slow, atol=2e-5)


def test_cli_end_to_end_on_real_ct(ct, tmp_path, cli, model_dirs):
    t0 = np.eye(4)
    t0[:3, 3] = (6.0, -4.0, 3.0)
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nrrd"
    write_image(ct, fixed_path)
    write_image(moved_copy(ct, t0), moving_path)
    write_transform(AffineTransform(t0), tmp_path / "init.h5")
    out = {k: tmp_path / v for k, v in dict(d="D.nii.gz", dinv="Dinv.nii.gz", vol="W.nrrd", jac="J.nii.gz", js="R.json").items()}
    r = cli(
        "deformable",
        "--fixed",
        str(fixed_path),
        "--moving",
        str(moving_path),
        "--initial-transform",
        str(tmp_path / "init.h5"),
        "--output-transform",
        str(out["d"]),
        "--output-inverse-transform",
        str(out["dinv"]),
        "--output-volume",
        str(out["vol"]),
        "--output-jacobian",
        str(out["jac"]),
        "--model",
        str(model_dirs["icon"]),
        "--method",
        "icon",
        "--instance-optimization",
        "2",
        "--refine-iterations",
        "3",
        "--output-json",
        str(out["js"]),
        "--device",
        "cpu",
        "--progress",
        "none",
    )
    assert r.returncode == 0, r.stderr
    assert "inverse consistency" in r.stdout
    d = read_transform(out["d"])
    dinv = read_transform(out["dinv"])
    assert d.grid.same_as(ct.grid, 1e-3)
    assert dinv.grid.same_as(moved_copy(ct, t0).grid, 1e-3)
    # D o Dinv = id on moving points (up to trilinear resampling of both fields)
    q = moved_copy(ct, t0).grid.voxel_centres_world().reshape(-1, 3)[::7]
    p = dinv.map_points(q)
    inside = np.all(
        (apply_affine(np.linalg.inv(ct.affine), p) > 1) & (apply_affine(np.linalg.inv(ct.affine), p) < np.array(ct.shape) - 2),
        axis=1,
    )
    err = np.linalg.norm(d.map_points(p[inside]) - q[inside], axis=1)
    assert np.median(err) < 0.05 and err.max() < 1.0
    # near-identity network: D is close to the initial translation
    assert np.abs(d.field.array.reshape(-1, 3).mean(0) - t0[:3, 3]).max() < 1.0
    result = json.loads(out["js"].read_text())
    for key in ("folding_percent", "ndv_percent", "ice_mean_mm", "ice_max_mm", "seconds_total"):
        assert key in result
    assert result["instance_optimization_steps"] == 2
    assert result["refine_iterations"] == 3 and result["refine_loss_last"] is not None
    assert result["field_grid_shape"] == list(TINY_ICON.grid_shape)
    warped = read_image(out["vol"])
    assert warped.grid.same_as(ct.grid, 1e-3)
    centre = tuple(slice(s // 4, 3 * s // 4) for s in ct.shape)
    assert np.corrcoef(warped.array[centre].ravel(), ct.array[centre].ravel())[0, 1] > 0.95
    assert read_image(out["jac"]).array.min() > 0


@pytest.mark.parametrize("case", ["missing", "suffix", "io", "vector", "model", "dense-inverse"])
def test_bad_inputs_exit_2(case, ct, tmp_path, cli, model_dirs):
    fixed = tmp_path / "f.nii.gz"
    write_image(ct, fixed)
    args = [
        "deformable",
        "--fixed",
        str(fixed),
        "--moving",
        str(fixed),
        "--output-transform",
        str(tmp_path / "D.nii.gz"),
        "--model",
        str(model_dirs["sitreg"]),
        "--progress",
        "none",
    ]
    if case == "missing":
        args[2] = str(tmp_path / "nope.nii.gz")
    elif case == "suffix":
        args[6] = str(tmp_path / "D.txt")
    elif case == "io":
        args += ["--instance-optimization", "-1"]
    elif case == "vector":
        vec = tmp_path / "v.nii.gz"
        write_image(Image(np.zeros(ct.shape + (3,), np.float32), ct.affine), vec)
        args[4] = str(vec)
    elif case == "model":
        args[8] = "no-such-model"
    elif case == "dense-inverse":
        field = tmp_path / "init.nii.gz"
        write_image(Image(np.zeros(ct.shape + (3,), np.float32), ct.affine), field)
        args += ["--initial-transform", str(field), "--output-inverse-transform", str(tmp_path / "Di.nii.gz")]
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    # The model here is an unregistered folder, so its one warning line may precede the error line.
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: unverified model file")]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (tmp_path / "D.nii.gz").exists()


def test_ddp_training_smoke_and_resume(tmp_path):
    """torchrun, 2 processes, gloo: trains, checkpoints, exports and resumes."""
    rng = np.random.default_rng(0)
    idx = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"), -1).astype(np.float32)
    files = []
    for n in range(3):
        c = np.array([10.0, 10.0, 10.0]) + rng.normal(size=3)
        vol = np.exp(-((idx - c) ** 2).sum(-1) / 30.0).astype(np.float32)
        path = tmp_path / f"vol{n}.nii.gz"
        write_image(Image(vol, np.diag([8.0, 8.0, 8.0, 1.0])), path)
        files.append(str(path))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(TINY_SITREG.to_json())
    out = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "diffusionreg",
        "train",
        "deformable",
        "--method",
        "sitreg",
        "--config",
        str(cfg),
        "--pairs",
        *files,
        "--val-pairs",
        f"{files[0]},{files[1]}",
        "--output",
        str(out),
        "--threads",
        "1",
        "--progress",
        "none",
        "--val-every",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(base + ["--steps", "2"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    r = subprocess.run(base + ["--steps", "3", "--resume"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "start step 2/3" in r.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert any("validation" in h for h in history)


def test_shipped_lung_model_improves_landmarks(shared_data):
    """The registered lung-vessels model loads by name (sha256 checked) and, zero-shot on the
    network grid, brings the landmarks of a validation pair closer than the initial TRE."""
    from diffusionreg import models
    from diffusionreg.deformable.register import load_model
    from diffusionreg.deformable.training import landmark_tre, load_pair

    if not any(e.name == "lung-vessels" for e in models.list_models("deformable")):
        pytest.skip("lung-vessels model not registered in Resources/Models.json")
    model = load_model("lung-vessels")
    assert model.cfg.method == "icon"
    folder = shared_data / "lung" / "vessels_val_cc_by"
    pair = load_pair(
        folder / "case_094_1.nii.gz", folder / "case_094_2.nii.gz", folder / "case_094_landmarks_voxel.csv", model.cfg
    )
    with torch.no_grad():
        u, w = model.net(pair.moving, pair.fixed)
    initial = np.linalg.norm(pair.landmarks[0] - pair.landmarks[1], axis=1).mean()
    assert landmark_tre(u, pair.grid, *pair.landmarks).mean() < 0.6 * initial


def test_shipped_brain_model_aligns_a_deformed_brain(shared_data):
    """The registered deformable brain-mri model (SITReg) loads by name with the task filter (the
    affine brain-mri is another entry) and, with its default refinement, undoes most of a smooth
    known deformation of a real brain while staying folding-free and inverse consistent."""
    from diffusionreg import fields, models
    from diffusionreg.deformable.register import load_model

    if not any(e.name == "brain-mri" for e in models.list_models("deformable")):
        pytest.skip("deformable brain-mri model not registered in Resources/Models.json")
    model = load_model("brain-mri")
    assert model.cfg.method == "sitreg" and model.cfg.inference.refine.iterations > 0
    brain = read_image(shared_data / "brain" / "vxm_test_scan_T1.nii.gz")
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(1, 3, 5, 5, 5, generator=g, dtype=torch.float64) * 2.5  # voxels (1 mm)
    u = torch.nn.functional.interpolate(coarse, size=brain.shape, mode="trilinear", align_corners=False)
    volume = torch.from_numpy(brain.array.astype(np.float64))[None, None]
    moving = Image(fields.warp(volume, u)[0, 0].numpy().astype(np.float32), brain.affine)
    result = register_deformable(brain, moving, model, want_inverse=True, refine_iterations=10)
    assert result.metrics["folding_percent"] == 0.0
    assert result.metrics["ice_mean_mm"] < 0.2
    # moving(q) = fixed(q + u(q)), so the inverse field (moving -> fixed) should be q + u(q);
    # mean error over brain voxels in mm (1 mm voxels, so voxel offsets are mm offsets)
    idx = np.argwhere(brain.array[::4, ::4, ::4] > 0.1) * 4
    true_disp = u[0].numpy()[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    points = apply_affine(brain.affine, idx.astype(float))
    mapped = result.inverse.map_points(points)
    true_mapped = apply_affine(brain.affine, idx + true_disp)
    before = np.linalg.norm(points - true_mapped, axis=1).mean()
    after = np.linalg.norm(mapped - true_mapped, axis=1).mean()
    assert after < 0.6 * before, (before, after)


def test_frozen_first_step_instance_optimisation_is_the_fine_step_alone():
    """``io_frozen_steps=1`` (ICON) is instance optimisation of the second step's network only: the
    greedy losses detach the midpoint pair, so the full loss's gradient on that network is its own
    step's, and the result equals Adam on those weights alone with the full loss; the first
    network keeps its weights. The cached midpoint pair is the one the step losses use."""
    from diffusionreg.deformable.register import pair_loss, predict

    torch.manual_seed(1)
    model = DeformableModel(build_network(TINY_ICON).eval(), TINY_ICON)
    g = torch.Generator().manual_seed(2)
    fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 16, 16, 16, generator=g), 3, 1, 1)
    moving = torch.roll(fixed, 2, dims=2)
    cfg = TINY_ICON
    losses = model.net.step_losses(moving, fixed, cfg.similarity, cfg.regularisation_weight, cfg.ncc_window)
    start = model.net.advance(moving, fixed, 1)
    (second,) = model.net.step_losses(*start, cfg.similarity, cfg.regularisation_weight, cfg.ncc_window, first_step=1)
    assert float(second.detach()) == float(losses[1].detach())

    before = copy.deepcopy(model.net.state_dict())
    seconds: dict[str, float] = {}
    u, w, io_losses = predict(model, moving, fixed, io_steps=3, io_lr=1e-2, io_frozen_steps=1, seconds=seconds)
    reference = copy.deepcopy(model.net).train()
    opt = torch.optim.Adam(reference.nets[1].parameters(), lr=1e-2)
    for _ in range(3):
        loss = pair_loss(reference, cfg, moving, fixed)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference.eval()
    with torch.no_grad():
        u_ref, w_ref = reference(moving, fixed)
        u_none, _ = model.net(moving, fixed)
    torch.testing.assert_close(u, u_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    assert (u - u_none).abs().max() > 1e-4, "the fine step's network was optimised"
    assert seconds["instance_optimization"] > 0 and seconds["network"] > 0
    assert len(io_losses) == 3 and io_losses[0] == pytest.approx(float(losses[1].detach()), rel=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items()), "the model is not changed"


def test_frozen_steps_only_for_icon_and_one_step_left():
    from dataclasses import replace

    from diffusionreg.errors import InputError

    with pytest.raises(InputError, match="io_frozen_steps"):
        replace(TINY_SITREG, inference=DeformableInference(io_frozen_steps=1)).validate()
    with pytest.raises(InputError, match="io_frozen_steps"):
        replace(TINY_ICON, inference=DeformableInference(io_frozen_steps=TINY_ICON.icon.steps)).validate()
    replace(TINY_ICON, inference=DeformableInference(io_frozen_steps=TINY_ICON.icon.steps - 1)).validate()
