"""The synthetic mass effect: known shift recovered exactly from its own field and landmarks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from diffusionreg.image import Grid
from diffusionreg.midline.config import compact
from diffusionreg.midline.headframe import midline_column, slice_affine
from diffusionreg.midline.losses import field_at
from diffusionreg.midline.phantom import phantom_head
from diffusionreg.midline.readout import read_slice
from diffusionreg.midline.synthetic import (
    Acquisition,
    MassEffect,
    NormalHead,
    measured_levels,
    slice_landmarks,
    synth_case,
    synth_slices,
)

CFG = compact()
FRAME = CFG.frame


def _effect(peak: float, side: int, y0: float = 2.0 * 3.6 - 98.4 + 3.6 * 30, z0: float = 10.0) -> MassEffect:
    return MassEffect(
        peak_mm=peak,
        side=side,
        shift_y_mm=y0,
        shift_z_mm=z0,
        sigma_z_mm=20.0,
        half_width_mm=CFG.synth.skull_half_width_mm,
        falx_y_mm=CFG.synth.falx_y_mm,
        midline_x_mm=FRAME.midline_x_mm,
        lesion_centre_mm=(-side * 35.0, y0, z0),
        lesion_radius_mm=15.0,
        lesion_hu=70.0,
    )


def _row_y(j: int) -> float:
    return float((slice_affine(FRAME, 0.0) @ [0, j, 0, 1])[1])


@pytest.mark.parametrize("side", [1, -1])
@pytest.mark.parametrize("peak", [0.0, 3.7, 12.5])
def test_landmarks_recover_the_peak_exactly(peak: float, side: int) -> None:
    effect = _effect(peak, side, y0=_row_y(30), z0=10.0)
    marks = slice_landmarks(effect, FRAME, 10.0)
    assert marks["mls_mm"] == pytest.approx(peak, abs=1e-6)
    column = midline_column(FRAME)
    assert marks["normal"][0] == pytest.approx(column, abs=1e-6)  # the normal position is on the midline
    if peak > 0:
        assert np.sign(marks["shifted"][0] - column) == side  # +i is the patient's left
        assert marks["shifted"][1] == 30
    for name in ("anterior_falx", "posterior_falx"):
        assert marks[name][0] == pytest.approx(column, abs=1e-6)  # zero displacement at the attachments


def test_field_is_a_diffeomorphism_fading_to_zero() -> None:
    effect = _effect(15.0, 1)
    assert effect.max_expansion() < 1.0
    x = torch.linspace(-100, 100, 2001, dtype=torch.float64)
    for y, z in [(-20.0, 10.0), (40.0, 30.0), (0.0, -10.0)]:
        q = torch.stack([x, torch.full_like(x, y), torch.full_like(x, z)])[None, :, :]
        mapped = effect.apply(q)[0, 0]
        assert torch.all(torch.diff(mapped) > 0)  # monotone along x: one-to-one
    edges = torch.tensor([[[66.0, -66.0, 0.0, 10.0], [0.0, 0.0, -70.0, 104.0], [10.0, 10.0, 10.0, 10.0]]], dtype=torch.float64)
    assert torch.allclose(effect.displacement_x(edges), torch.zeros(1, 4, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("side", [1, -1])
def test_readout_of_the_true_field(side: int) -> None:
    """The read-out on the pixel-sampled true field finds the shift (interpolation error only)."""
    effect = _effect(9.0, side, y0=_row_y(30), z0=10.0)
    n = FRAME.slice_size
    ii, jj = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    pixels = torch.stack([ii, jj, torch.zeros_like(ii), torch.ones_like(ii)]).reshape(4, -1)
    world = torch.as_tensor(slice_affine(FRAME, 10.0)) @ pixels
    u_i = effect.displacement_x(world[:3][None])[0].reshape(n, n) / FRAME.pixel_mm
    u = torch.stack([u_i, torch.zeros_like(u_i)]).numpy()
    reading = read_slice(u, midline_column(FRAME), (10, 55), (FRAME.pixel_mm, FRAME.pixel_mm), FRAME.midline_band_mm)
    truth = slice_landmarks(effect, FRAME, 10.0)
    assert reading.mls_mm == pytest.approx(9.0, abs=0.05)
    assert reading.shifted[0] == pytest.approx(truth["shifted"][0], abs=0.02)


@pytest.fixture(scope="module")
def phantom() -> NormalHead:
    grid = Grid(
        (100, 120, 100),
        np.diag([2.0, 2.0, 2.0, 1.0]) @ np.array([[1, 0, 0, -99], [0, 1, 0, -102], [0, 0, 1, -90], [0, 0, 0, 1.0]]),
    )
    image = phantom_head(grid)
    return NormalHead("phantom", torch.from_numpy(image.array), image.affine, np.eye(4))


def test_training_slices_carry_consistent_truth(phantom: NormalHead) -> None:
    gen = torch.Generator().manual_seed(3)
    synth = dataclasses.replace(CFG.synth, zero_fraction=0.0)
    batch = synth_slices([phantom], FRAME, synth, gen, 4, z_range=(5.0, 20.0))
    assert batch.x.shape == (4, 1, FRAME.slice_size, FRAME.slice_size)
    assert float(batch.x.min()) >= -1 and float(batch.x.max()) <= 1
    moved = torch.linalg.vector_norm(batch.landmarks[:, 3] - batch.landmarks[:, 2], dim=1) * FRAME.pixel_mm
    assert torch.allclose(moved, batch.slice_mls_mm, atol=1e-4)
    assert torch.all(batch.slice_mls_mm <= batch.mls_mm + 1e-4)  # no slice beats the case's peak
    # the whole true field agrees with every supervised pair (bilinear reading, 64^2 pixels)
    pairs = batch.midline[:, :, 1] - batch.midline[:, :, 0]
    assert torch.allclose(field_at(batch.field, batch.midline[:, :, 0]), pairs, atol=0.02)
    assert float(pairs.abs().max()) > 0.5  # the check is not vacuous
    unshifted = synth_slices([phantom], FRAME, synth, gen, 2, shifted_fraction=0.0)
    assert torch.equal(unshifted.field, torch.zeros_like(unshifted.field))


def test_synth_case_truth_in_world_coordinates(phantom: NormalHead) -> None:
    """A pitched, rolled synthetic CT: the truth's landmarks are in its world, distances in mm."""
    effect = _effect(8.0, -1, z0=15.0)
    acquisition = Acquisition(
        rotation_deg=(12.0, 0.0, 6.0), pixel_mm=2.5, slice_mm=5.0, size=96, z_range_mm=(-40.0, 70.0), noise_hu=0.0
    )
    image, truth = synth_case(phantom, effect, FRAME, acquisition, torch.Generator().manual_seed(0))
    assert truth["case_mls_mm"] == pytest.approx(8.0)
    assert truth["side"] == "right"
    best = max(truth["slices"], key=lambda s: s["mls_mm"])
    assert best["mls_mm"] == pytest.approx(8.0, rel=0.02)
    assert len(truth["slices"]) == len(measured_levels(FRAME))
    # the scan's own geometry: its voxel -> world map puts the skull where the landmarks say it is
    inverse = np.linalg.inv(image.affine)
    for s in truth["slices"]:
        for name in ("anterior_falx", "posterior_falx", "shifted", "normal"):
            index = inverse @ np.r_[s[name], 1.0]
            assert np.all(index[:3] > -1) and np.all(index[:3] < np.asarray(image.shape))
    # the landmarks are |MLS| apart and the falx points lie on the midsagittal plane in the scan's world
    anterior, posterior = np.asarray(best["anterior_falx"]), np.asarray(best["posterior_falx"])
    assert np.linalg.norm(np.subtract(best["shifted"], best["normal"])) == pytest.approx(best["mls_mm"], abs=1e-6)
    assert math.isfinite(float(np.linalg.norm(posterior - anterior)))
