"""CLAHE for venous MRI (issue 16, spec 1.6), on synthetic layered volumes."""

from __future__ import annotations

import dataclasses

import numpy as np

from diffusionreg.affine.clahe import clahe
from diffusionreg.affine.config import compact
from diffusionreg.affine.preprocess import antialias, network_grid, normalise, to_network
from diffusionreg.image import Image, resample


def layered(shape=(48, 48, 48), seed: int = 0) -> np.ndarray:
    """Layers along axis 2: faint (0.30 / 0.34) in the half i < 24, strong (0.2 / 0.9) in the other half."""
    rng = np.random.default_rng(seed)
    stripe = (np.arange(shape[2]) // 4) % 2 == 1
    volume = np.empty(shape, dtype=np.float32)
    volume[: shape[0] // 2] = np.where(stripe, 0.34, 0.30)[None, None]
    volume[shape[0] // 2 :] = np.where(stripe, 0.9, 0.2)[None, None]
    return np.clip(volume + rng.normal(0.0, 0.005, shape), 0.0, 1.0).astype(np.float32)


def stripe_contrast(volume: np.ndarray, half: slice) -> float:
    stripe = (np.arange(volume.shape[2]) // 4) % 2 == 1
    part = volume[half, 8:-8, 8:-8]  # away from the volume's border
    inner = stripe[8:-8]
    return float(part[..., inner].mean() - part[..., ~inner].mean())


def test_one_unclipped_tile_is_global_histogram_equalisation():
    volume = layered()
    out = clahe(volume, volume.shape, clip_limit=1.0, bins=256)
    level = np.minimum((volume * 256).astype(int), 255)
    cdf = np.cumsum(np.bincount(level.ravel(), minlength=256)) / volume.size
    np.testing.assert_allclose(out, cdf[level], atol=1e-6)


def test_faint_layers_gain_contrast_and_the_clip_limits_it():
    volume = layered()
    strong = clahe(volume, (16, 16, 16), clip_limit=1.0)
    clipped = clahe(volume, (16, 16, 16), clip_limit=0.05)
    faint = slice(0, 24)
    assert 0.0 <= float(clipped.min()) and float(clipped.max()) <= 1.0
    before = stripe_contrast(volume, faint)
    assert stripe_contrast(clipped, faint) > 3 * before, "local equalisation lifts the faint layers"
    assert stripe_contrast(strong, faint) > stripe_contrast(clipped, faint), "the clip limit bounds the gain"
    assert stripe_contrast(clipped, slice(24, 48)) > 0.3, "the strong layers keep their order"
    assert np.abs(clipped - volume).mean() < np.abs(strong - volume).mean()


def test_venous_network_input_is_equalised_like_the_spec():
    cfg = dataclasses.replace(compact(), grid_size=32)
    image = Image(layered() * 300.0, np.diag([2.0, 2.0, 2.0, 1.0]))
    grid = network_grid(cfg, image.grid.centre_world())
    window = (float(image.array.min()), float(image.array.max()))
    venous = to_network(image, grid, cfg, window, "venous").array
    mri = to_network(image, grid, cfg, window, "mri").array
    # the spec's order: min-max, CLAHE (32 mm = 16 voxels of 2 mm), then onto the grid (padding -1)
    expected = clahe((normalise(image.array, window) + 1) / 2, (16, 16, 16), cfg.clahe_clip) * 2 - 1
    expected = resample(Image(antialias(expected, image.spacing, cfg.spacing_mm), image.affine), grid, default=-1.0).array
    np.testing.assert_allclose(venous, expected, atol=1e-5)
    assert np.abs(venous - mri).max() > 0.2
