"""Anisotropic network grids (issue 16, OCT): per-axis shape and spacing in the config, one grid
for training and inference, exact LPS geometry (checked against SimpleITK), and cubic models
unchanged bit for bit. Synthetic retina-like volumes: curved bright and dark layers in depth (the
second array axis), a foveal pit, vessel shadows, multiplicative speckle, 0.125 x 0.02 x 0.125 mm
voxels (a 6 x 1.9 x 6 mm scan, the shape of the spec's 245 x 384 x 245 OCT volumes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from diffusionreg.affine.config import AffineConfig, compact, get_config, retinal_oct
from diffusionreg.affine.gabor import GaborBinarize
from diffusionreg.affine.network import AffineDiffusionNet
from diffusionreg.affine.preprocess import network_grid, sampling_spacing, to_network
from diffusionreg.affine.register import build_model, register_affine
from diffusionreg.affine.sampling import warp
from diffusionreg.affine.schedule import Schedule
from diffusionreg.affine.training import TrainingSet, TrainOptions, load_subject, make_batch, train
from diffusionreg.errors import InputError
from diffusionreg.image import Image, centred_grid, resample, write_image
from diffusionreg.spaces import (
    apply_affine,
    centred_affine,
    itk_geometry,
    normalized_from_world_transform,
    rotation_about_axis,
    world_transform_from_normalized,
)
from diffusionreg.training.options import RunOptions

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.125, 0.02, 0.125)  # mm: en face, depth, en face
SHAPE = (48, 96, 48)


def retina_layers(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Noise-free retina-like volume (0-255): layers of alternating brightness whose inner
    surface is a tilted bowl with a foveal pit off centre, vessel shadows (dark columns under
    curved en-face lines) that make the en-face position identifiable, dark vitreous above."""
    i, j, k = [np.arange(n, dtype=np.float64) * s for n, s in zip(shape, spacing)]
    x, z = np.meshgrid(i - i.mean(), k - k.mean(), indexing="ij")  # en-face mm from the centre
    top = 0.45 + 0.025 * (x**2 + z**2) + 0.04 * x - 0.15 * np.exp(-((x - 0.6) ** 2 + (z + 0.4) ** 2) / 0.25)
    depth = j[None, :, None] - top[:, None, :]  # mm below the inner surface
    volume = np.full(shape, 15.0)
    edge = np.zeros_like(top)[:, None, :]
    for thickness, level in zip((0.06, 0.10, 0.05, 0.12, 0.04, 0.15, 0.08), (200, 90, 170, 60, 230, 110, 180)):
        volume = np.where((depth >= edge) & (depth < edge + thickness), level, volume)
        edge = edge + thickness
    volume = np.where(depth >= edge, 50.0, volume)  # choroid and below
    for a, b, c in ((0.3, -1.0, 0.8), (-0.5, 1.2, -1.1), (0.15, 0.4, 1.6)):
        vessel = np.abs(z - (a * x**2 + b * x + c)) < 0.15  # large vessels: ~0.3 mm shadows
        volume = np.where(vessel[:, None, :] & (depth > 0.05), volume * 0.3, volume)
    return volume.astype(np.float32)


def speckle(volume: np.ndarray, seed: int) -> np.ndarray:
    """Multiplicative gamma speckle (mean 1, std 0.35), clipped to 8-bit range."""
    rng = np.random.default_rng(seed)
    return np.clip(volume * rng.gamma(8.0, 1.0 / 8.0, size=volume.shape), 0.0, 255.0).astype(np.float32)


def tiny_oct(**overrides) -> AffineConfig:
    """The ``oct`` preset on a 16 x 24 x 16 grid of (0.375, 0.08, 0.375) mm (the synthetic scan's
    6 x 1.9 x 6 mm) with a tiny network; its registration defaults are the preset's."""
    settings = dict(
        name="tiny-oct",
        grid_size=(16, 24, 16),
        spacing_mm=(0.375, 0.08, 0.375),
        widths=(2, 4, 4, 8),
        norm_groups=2,
        time_dim=8,
        time_hidden=16,
        timesteps=4,
        batch_size=2,
        warmup_steps=1,
    )
    settings.update(overrides)
    return dataclasses.replace(retinal_oct(), **settings)


@pytest.fixture(scope="module")
def scan() -> Image:
    return Image(speckle(retina_layers(), 0), np.diag([*SPACING, 1.0]))


def retina_error_mm(estimate: np.ndarray, truth: np.ndarray, image: Image) -> np.ndarray:
    """Mean |T_est(x) - T_true(x)| per LPS axis (mm) over the bright layers of ``image``."""
    idx = np.argwhere(retina_layers()[::3, ::3, ::3] > 100) * 3.0
    points = apply_affine(image.affine, idx)
    return np.abs(apply_affine(estimate, points) - apply_affine(truth, points)).mean(0)


# --- the config ---------------------------------------------------------------------------------
def test_grid_is_a_cube_or_a_box_in_the_config():
    assert compact().grid_shape == (64, 64, 64) and compact().grid_spacing == (3.5, 3.5, 3.5)
    cfg = get_config("oct")
    assert (cfg.grid_shape, cfg.grid_spacing, cfg.feature_shape) == ((64, 96, 64), (0.094, 0.02, 0.094), (1, 2, 1))
    assert cfg.class_names == ("oct",) and cfg.global_rotation_axes == "y"
    data = json.loads(cfg.to_json())
    assert data["grid_size"] == [64, 96, 64] and data["spacing_mm"] == [0.094, 0.02, 0.094]
    assert AffineConfig.from_dict(data) == cfg
    for key, value, phrase in (
        ("grid_size", [64, 0, 64], "affine config.grid_size [64, 0, 64]: use an integer >= 2 or three"),
        ("grid_size", 1, "affine config.grid_size 1"),
        ("grid_size", [64, 96], "affine config.grid_size"),
        ("spacing_mm", [0.1, -1.0, 0.1], "affine config.spacing_mm [0.1, -1.0, 0.1]: use a number > 0"),
        ("spacing_mm", "0.1", "affine config.spacing_mm"),
    ):
        with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
            AffineConfig.from_dict({**data, key: value})
    net = AffineDiffusionNet(tiny_oct(zero_init_head=False)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 2, 16, 24, 16) * 2 - 1, torch.tensor([1, 3]), None, "oct")
    assert out.shape == (2, 3, 4) and torch.isfinite(out).all()


def test_cubic_models_are_unchanged_bit_for_bit():
    """The shipped brain-mri config parses as before; its grids and network input are exactly the
    cube of before; the same cube written per axis gives the same bits through registration."""
    data = json.loads((ROOT / "Resources" / "Models" / "brain-mri" / "config.json").read_text(encoding="utf-8"))
    cfg = AffineConfig.from_dict(data)
    assert (cfg.grid_size, cfg.spacing_mm, cfg.grid_shape) == (64, 3.5, (64, 64, 64))
    centre, turn = np.array([3.25, -11.0, 20.5]), rotation_about_axis([1, 2, 3], 40)
    assert np.array_equal(network_grid(cfg, centre).affine, centred_grid((64,) * 3, 3.5, centre).affine)
    assert np.array_equal(network_grid(cfg, centre, turn).affine, centred_grid((64,) * 3, 3.5, centre, turn).affine)
    assert np.array_equal(network_grid(cfg, centre, oversample=2).affine, centred_grid((128,) * 3, 1.75, centre).affine)
    image = Image(retina_layers(), np.diag([1.1, 0.9, 1.3, 1.0]))
    assert sampling_spacing(image, cfg, turn) == 3.5  # the anti-aliasing target of before
    if (ROOT / "Resources" / "Models" / "brain-mri" / "model.safetensors").exists():
        from diffusionreg.affine.register import load_model

        assert load_model("brain-mri").net.head.weight.shape[2:] == (1, 1, 1)
    # the same cube, written per axis: every step of the anisotropic code path gives the same bits
    from tiny_models import tiny_affine_config

    cube = tiny_affine_config()
    box = dataclasses.replace(cube, grid_size=(16, 16, 16), spacing_mm=(12.0, 12.0, 12.0))
    fixed = Image(retina_layers(), np.diag([2.0, 1.5, 2.5, 1.0]))
    moving = Image(retina_layers()[:, ::-1].copy(), np.diag([2.0, 1.5, 2.5, 1.0]))
    grid_cube, grid_box = network_grid(cube, centre, turn), network_grid(box, centre, turn)
    assert np.array_equal(grid_cube.affine, grid_box.affine)
    assert np.array_equal(to_network(fixed, grid_cube, cube).array, to_network(fixed, grid_box, box).array)
    torch.manual_seed(0)
    net = build_model(cube)
    results = []
    for cfg_ in (cube, box):
        model = build_model(cfg_, net.net.state_dict())
        results.append(register_affine(fixed, moving, model, steps=2, refine_iterations=2, pose_search=False))
    assert np.array_equal(results[0].theta, results[1].theta)
    assert np.array_equal(results[0].transform.matrix, results[1].transform.matrix)


# --- geometry -----------------------------------------------------------------------------------
def test_anisotropic_network_matrices_map_lps_points_as_simpleitk_resamples(scan):
    """A known fixed -> moving LPS affine written as the network's normalised matrix on the
    anisotropic grids: warping the moving network input by it (what the reverse process does)
    equals SimpleITK resampling that input with the LPS affine; and the matrix maps back to the
    same LPS affine as on an isotropic cube."""
    cfg = tiny_oct()
    c = scan.grid.centre_world()
    truth = centred_affine(c, rotation_about_axis([0.3, 1.0, -0.2], 9) @ np.diag([1.04, 0.98, 1.0]), [0.2, 0.05, -0.15])
    g_fix = network_grid(cfg, c + [0.1, -0.02, 0.05])
    g_mov = network_grid(cfg, apply_affine(truth, c[None])[0] + [-0.2, 0.03, 0.1])
    shape = cfg.grid_shape
    theta = normalized_from_world_transform(truth, g_fix.affine, shape, g_mov.affine, shape)
    assert np.allclose(world_transform_from_normalized(theta, g_fix.affine, shape, g_mov.affine, shape), truth, atol=1e-9)
    cube = compact()
    iso_fix, iso_mov = network_grid(cube, c), network_grid(cube, c + [1.0, 2.0, 3.0])
    iso_theta = normalized_from_world_transform(truth, iso_fix.affine, cube.grid_shape, iso_mov.affine, cube.grid_shape)
    assert not np.allclose(iso_theta, theta, atol=1e-3), "the normalised matrix depends on the grid"
    back = world_transform_from_normalized(iso_theta, iso_fix.affine, cube.grid_shape, iso_mov.affine, cube.grid_shape)
    assert np.allclose(back, truth, atol=1e-9)

    m_in = to_network(scan, g_mov, cfg, modality="oct")
    by_torch = warp(torch.from_numpy(m_in.array)[None, None], torch.from_numpy(theta)[None])[0, 0].numpy()

    def as_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
        origin, spacing, direction = itk_geometry(affine)
        image.SetOrigin(origin), image.SetSpacing(spacing), image.SetDirection(direction)
        return image

    transform = sitk.AffineTransform(3)  # ITK: maps output (fixed) points to input (moving) points
    transform.SetMatrix(truth[:3, :3].ravel().tolist())
    transform.SetTranslation(truth[:3, 3].tolist())
    reference = as_sitk(np.zeros(shape, np.float32), g_fix.affine)
    by_sitk = sitk.GetArrayFromImage(
        sitk.Resample(as_sitk(m_in.array, g_mov.affine), reference, transform, sitk.sitkLinear, -1.0, sitk.sitkFloat32)
    ).transpose(2, 1, 0)
    # compare where the sampled point lies a voxel inside the moving grid (edges differ by design:
    # zero padding blends with the background, SimpleITK cuts)
    index = apply_affine(np.linalg.inv(g_mov.affine) @ truth, g_fix.voxel_centres_world())
    inside = np.all((index >= 1) & (index <= np.array(shape) - 2), axis=-1)
    assert inside.mean() > 0.5
    assert np.abs(by_torch - by_sitk)[inside].max() < 1e-4


def test_registration_recovers_a_known_affine_on_layered_volumes(scan):
    """Moving = SimpleITK-convention resampling of the noise-free layers through a known affine
    (5 deg about an axis near depth, 0.1-0.15 mm shifts), with its own speckle. The tiny model's
    head is zero (untrained): its matrix is the identity, so the diffusion stage gives exactly the
    centroid shift on the anisotropic grids and the preset's per-axis refinement does the rest.
    Tolerance: half a voxel of the scan per axis (0.0625 mm en face, 0.01 mm in depth; measured
    0.049 / 0.007 / 0.048 mm from 0.15 / 0.03 / 0.14 mm), which the start fails on every axis."""
    cfg = tiny_oct()
    model = build_model(cfg)
    c = scan.grid.centre_world()
    truth = centred_affine(c, rotation_about_axis([0.1, 1.0, 0.05], 5), [0.12, 0.03, -0.1])
    clean = Image(retina_layers(), scan.affine)
    moving = resample(clean, clean.grid, np.linalg.inv(truth), default=15.0)  # moving(truth x) = fixed(x)
    moving = moving.with_array(speckle(moving.array, 1))
    result = register_affine(scan, moving, model, modality="oct")
    diffusion = result.diffusion_only.matrix
    assert np.allclose(diffusion[:3, :3], np.eye(3), atol=1e-9), "identity matrix -> pure centroid shift"
    before = retina_error_mm(np.eye(4), truth, scan)
    after = retina_error_mm(result.transform.matrix, truth, scan)
    assert np.all(before > np.array(SPACING) / 2), before  # the start fails the tolerance on every axis
    assert np.all(after <= np.array(SPACING) / 2), (before, after)


# --- training -----------------------------------------------------------------------------------
class FilterCalls:
    """Every call of the real affine network (input shape, train mode, input filter) and every
    output of its Gabor bank."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], bool, str]] = []
        self.gabor: list[torch.Tensor] = []

    def __enter__(self):
        def before(module, args):
            if isinstance(module, AffineDiffusionNet):
                self.calls.append((tuple(args[0].shape[2:]), module.training, args[3] if len(args) > 3 else "none"))

        def after(module, args, output):
            if isinstance(module, GaborBinarize):
                self.gabor.append(output.detach())

        self.handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(before),
            torch.nn.modules.module.register_module_forward_hook(after),
        ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_training_on_the_anisotropic_grid_feeds_the_network_as_inference_does(scan, tmp_path):
    cfg = tiny_oct()
    path = tmp_path / "retina.nii.gz"
    write_image(scan, path)
    subject = load_subject(path, cfg, "oct")
    assert subject.shape == (1, 32, 48, 32)  # the network grid's field of view at half its spacing
    x, *_ = make_batch([subject], cfg, Schedule.from_config(cfg), torch.Generator().manual_seed(0), "oct")
    assert x.shape == (2, 2, 16, 24, 16)
    with FilterCalls() as seen:
        summary = train(
            TrainOptions(datasets=[TrainingSet([str(path)], "oct")], config=cfg, val_recover=1),
            RunOptions(output=tmp_path / "run", steps=3, val_every=0),
        )
    assert summary["step"] == 3 and np.isfinite(summary["recovery_mm_mean"])
    training = [call for call in seen.calls if call[1]]
    assert len(training) == 3 and all(call == ((16, 24, 16), True, "oct") for call in training)
    assert seen.gabor and all(set(out.unique().tolist()) <= {-1.0, 1.0} for out in seen.gabor)
    exported = json.loads((tmp_path / "run" / "config.json").read_text())
    assert exported["grid_size"] == [16, 24, 16] and exported["spacing_mm"] == [0.375, 0.08, 0.375]
    from diffusionreg.affine.register import load_model

    model = load_model(str(tmp_path / "run" / "model.safetensors"), "oct")
    with FilterCalls() as inference:
        register_affine(scan, scan, model, modality="oct", steps=2, refine_iterations=0)
    assert inference.calls and all(call == ((16, 24, 16), False, "oct") for call in inference.calls)
    assert len(inference.gabor) == 2 * len(inference.calls)  # both channels, every step
