"""Read-out of the midline shift in millimetres (anisotropic pixels, both sides, normals read 0)."""

from __future__ import annotations

import numpy as np
import pytest

from diffusionreg.midline.readout import falx_rows, read_slice


def _band_field(shape, column: float, shift_px: float, rows: tuple[int, int]) -> np.ndarray:
    """A field that moves a region around the midline sideways by ``shift_px`` (u = -shift there)."""
    u = np.zeros((2,) + shape)
    u[0, :, rows[0] : rows[1] + 1] = -shift_px
    return u


@pytest.mark.parametrize("shift_px", [2.5, -2.5])
@pytest.mark.parametrize("spacing", [(0.5, 2.0), (1.2, 0.7)])
def test_uniform_shift_in_mm_through_the_spacing(shift_px: float, spacing) -> None:
    shape = (64, 48)
    column = 31.5
    u = _band_field(shape, column, shift_px, (10, 30))
    reading = read_slice(u, column, (5, 40), spacing, band_mm=20.0)
    assert reading.mls_mm == pytest.approx(abs(shift_px) * spacing[0])
    assert reading.shifted[0] == pytest.approx(column + shift_px)  # the structure moved to +i for positive shifts
    assert reading.normal[0] == pytest.approx(column)


def test_oblique_displacement_uses_both_spacings() -> None:
    u = np.zeros((2, 64, 64))
    u[0] = -2.0
    u[1] = 3.0
    reading = read_slice(u, 31.5, (10, 50), (0.8, 1.5), band_mm=20.0)
    assert reading.mls_mm == pytest.approx(np.hypot(2.0 * 0.8, 3.0 * 1.5))


def test_normal_reads_zero_and_far_displacements_are_ignored() -> None:
    u = np.zeros((2, 64, 64))
    u[:, :5] = 7.0  # a large displacement near the skull, far from the midline
    reading = read_slice(u, 31.5, (10, 50), (1.0, 1.0), band_mm=15.0)
    assert reading.mls_mm == 0.0


def test_falx_rows_are_the_brain_run_less_the_margin() -> None:
    brain = np.zeros((64, 64), dtype=bool)
    brain[20:44, 8:57] = True
    brain[32, 2:5] = True  # a short run elsewhere on the midline column
    assert falx_rows(brain, 31.6, margin_px=3.0) == (11, 53)
    assert falx_rows(np.zeros((64, 64), dtype=bool), 31.5, 2.0) is None
