"""The optional test-time refinement: recovers a known affine on a real brain from a rough start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import random_rotation

from diffusionreg.affine.preprocess import foreground_centroid
from diffusionreg.affine.refine import RefineConfig, refine_affine
from diffusionreg.image import centred_grid, read_image, resample
from diffusionreg.transforms import AffineTransform


def _brain(shared_data: Path):
    image = read_image(shared_data / "brain/oasis_B_norm.nii.gz")
    # 2 mm keeps the test quick; the refinement itself works on its own 6 and 3 mm grids.
    grid = centred_grid((100, 100, 100), 2.0, image.grid.centre_world(), image.grid.direction)
    return resample(image, grid)


def test_refinement_recovers_known_affine(shared_data: Path) -> None:
    fixed = _brain(shared_data)
    centre = foreground_centroid(fixed)
    rng = np.random.default_rng(4)
    truth = np.eye(4)
    truth[:3, :3] = random_rotation(rng, 20) @ np.diag([1.05, 0.95, 1.02])
    truth[:3, 3] = centre - truth[:3, :3] @ centre + [6.0, -4.0, 3.0]
    moving = resample(fixed, fixed.grid, AffineTransform(truth).inverse())  # fixed -> moving map is `truth`
    error = np.eye(4)
    error[:3, :3] = random_rotation(rng, 3)
    error[:3, 3] = [2.0, -2.5, 1.5]
    start = AffineTransform(truth @ error)
    result = refine_affine(fixed, moving, start, centre)

    brain = np.argwhere(fixed.array[::3, ::3, ::3] > 0.1 * fixed.array.max()) * 3.0
    points = brain @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    before = np.linalg.norm(start.map_points(points) - points @ truth[:3, :3].T - truth[:3, 3], axis=1).mean()
    after = np.linalg.norm(result.transform.map_points(points) - points @ truth[:3, :3].T - truth[:3, 3], axis=1).mean()
    assert before > 2.0
    assert after < 0.6, (before, after)
    assert result.score_after > result.score_before


def test_no_levels_returns_the_start_unchanged(shared_data: Path) -> None:
    fixed = _brain(shared_data)
    start = AffineTransform(np.eye(4))
    result = refine_affine(fixed, fixed, start, foreground_centroid(fixed), RefineConfig(levels=()))
    np.testing.assert_array_equal(result.transform.matrix, start.matrix)


def test_mutual_information_refinement_works_across_contrasts(shared_data: Path) -> None:
    """The default metric is mutual information: a moving image with inverted brain contrast
    (a stand-in for another modality) is still brought onto the fixed one."""
    fixed = _brain(shared_data)
    centre = foreground_centroid(fixed)
    truth = np.eye(4)
    truth[:3, :3] = random_rotation(np.random.default_rng(5), 8)
    truth[:3, 3] = centre - truth[:3, :3] @ centre + [3.0, 2.0, -3.0]
    moving = resample(fixed, fixed.grid, AffineTransform(truth).inverse())
    a = moving.array
    inverted = np.where(a > 0.05 * a.max(), a.max() * 1.1 - a, 0.0).astype(np.float32)
    moving = moving.with_array(inverted)
    start = AffineTransform(np.eye(4))
    result = refine_affine(fixed, moving, start, centre)

    brain = np.argwhere(fixed.array[::3, ::3, ::3] > 0.1 * fixed.array.max()) * 3.0
    points = brain @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    before = np.linalg.norm(points - points @ truth[:3, :3].T - truth[:3, 3], axis=1).mean()
    after = np.linalg.norm(result.transform.map_points(points) - points @ truth[:3, :3].T - truth[:3, 3], axis=1).mean()
    assert before > 4.0
    assert after < 1.0, (before, after)


def test_with_iterations_sets_every_level() -> None:
    cfg = RefineConfig().with_iterations(7)
    assert [l.iterations for l in cfg.levels] == [7] * len(RefineConfig().levels)
    assert RefineConfig().with_iterations(0).levels == ()
