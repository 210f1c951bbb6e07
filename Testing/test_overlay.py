"""Overlay pictures: a valid PNG, grey where images agree, coloured where they do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import REPO
from PIL import Image as PILImage

from diffusionreg.image import read_image, resample
from diffusionreg.overlay import write_overlay, write_png

SAMPLE = REPO / "Resources" / "Sample"


def test_png_encoder_round_trips(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3)).astype(np.uint8)
    path = write_png(tmp_path / "x.png", rgb)
    np.testing.assert_array_equal(np.asarray(PILImage.open(path).convert("RGB")), rgb)


def test_overlay_grey_when_aligned_coloured_when_not(tmp_path: Path) -> None:
    fixed = read_image(SAMPLE / "sample_fixed.nii.gz")
    moving = resample(read_image(SAMPLE / "sample_moving.nii.gz"), fixed.grid)
    path = write_overlay(tmp_path / "overlay.png", fixed, [moving, fixed])
    picture = np.asarray(PILImage.open(path).convert("RGB")).astype(int)
    top, bottom = picture[: picture.shape[0] // 2], picture[picture.shape[0] // 2 :]
    colour = lambda part: np.abs(part[..., 0] - part[..., 1]).mean()  # noqa: E731
    assert colour(bottom) < 0.5  # fixed over itself: grey
    assert colour(top) > 5.0  # the misaligned pair shows magenta/green
    assert picture.shape[0] > 200 and picture.shape[1] > 400
