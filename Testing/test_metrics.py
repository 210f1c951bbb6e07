"""diffusionreg.metrics on hand-made label maps, landmarks and fields with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusionreg import fields, metrics


def cube(shape, start, size, label=1, dtype=np.int16) -> np.ndarray:
    volume = np.zeros(shape, dtype=dtype)
    volume[tuple(slice(s, s + size) for s in start)] = label
    return volume


# ----------------------------------------------------------------------------- Dice


def test_dice_of_two_cubes_with_known_overlap():
    fixed = cube((16, 16, 16), (2, 2, 2), 4)  # 64 voxels
    warped = cube((16, 16, 16), (3, 2, 2), 4)  # shifted by one: overlap 3 * 4 * 4 = 48
    fixed += cube((16, 16, 16), (9, 9, 9), 5, label=2)  # 125 voxels
    warped += cube((16, 16, 16), (9, 9, 9), 5, label=2)
    warped[13, 9:14, 9:14] = 0  # label 2 loses one 5x5 face: 100 voxels left
    scores = metrics.dice_per_label(fixed, warped)
    assert sorted(scores) == [1, 2]
    assert scores[1] == pytest.approx(2 * 48 / (64 + 64), abs=1e-12)
    assert scores[2] == pytest.approx(2 * 100 / (125 + 100), abs=1e-12)
    assert metrics.dice_per_label(fixed, fixed) == {1: 1.0, 2: 1.0}


def test_dice_missing_labels():
    fixed = cube((8, 8, 8), (1, 1, 1), 3, label=4)
    warped = cube((8, 8, 8), (1, 1, 1), 3, label=5)
    # default: the labels of the fixed map only (label 5 exists only in the warped map)
    assert metrics.dice_per_label(fixed, warped) == {4: 0.0}
    scores = metrics.dice_per_label(fixed, warped, labels=[4, 5, 9])
    assert scores[4] == 0.0 and scores[5] == 0.0
    assert math.isnan(scores[9])  # absent from both maps
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice_per_label(fixed, warped[:-1])


# ----------------------------------------------------------------------------- HD95


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_a_cube_shifted_by_three_voxels(axis):
    # The far face of the shifted cube (36 of its 152 surface voxels, well over 5%) lies exactly
    # 3 voxels from the original surface and no surface voxel lies farther, in both directions:
    # HD95 = 3 * spacing along the shift.
    spacing = (2.0, 1.0, 0.5)
    fixed = cube((20, 20, 20), (5, 5, 5), 6)
    start = [5, 5, 5]
    start[axis] += 3
    warped = cube((20, 20, 20), tuple(start), 6)
    scores = metrics.hd95_per_label(fixed, warped, spacing)
    assert scores == {1: pytest.approx(3 * spacing[axis], abs=1e-9)}
    assert metrics.hd95_per_label(fixed, fixed, spacing) == {1: 0.0}


def brute_force_hd(fixed: np.ndarray, warped: np.ndarray, spacing, percentile: float) -> float:
    """Surfaces by explicit 6-neighbour tests and all pairwise distances (independent reference)."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        outside_neighbour = np.zeros_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                outside_neighbour |= ~np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & outside_neighbour) * np.asarray(spacing)

    a, b = surface_points(fixed), surface_points(warped)
    distances = np.linalg.norm(a[:, None] - b[None], axis=2)
    return max(np.percentile(distances.min(axis=1), percentile), np.percentile(distances.min(axis=0), percentile))


def test_hd95_matches_brute_force_on_irregular_shapes():
    rng = np.random.default_rng(7)
    spacing = (1.5, 0.8, 1.2)
    fixed = np.zeros((14, 15, 16), dtype=np.int32)
    warped = np.zeros_like(fixed)
    # blobs touching the array border check that outside the array counts as background
    fixed[0:9, 3:12, 2:10] = 3
    warped[2:12, 4:15, 0:9] = 3
    fixed[rng.random(fixed.shape) < 0.05] = 0
    warped[rng.random(warped.shape) < 0.05] = 0
    score = metrics.hd95_per_label(fixed, warped, spacing)[3]
    expected = brute_force_hd(fixed == 3, warped == 3, spacing, 95.0)
    assert score == pytest.approx(expected, abs=1e-9)
    assert score > 1.0
    full = metrics.hd95_per_label(fixed, warped, spacing, percentile=100.0)[3]
    assert full == pytest.approx(brute_force_hd(fixed == 3, warped == 3, spacing, 100.0), abs=1e-9)


def test_hd95_missing_labels_are_nan():
    fixed = cube((10, 10, 10), (2, 2, 2), 3, label=1) + cube((10, 10, 10), (6, 6, 6), 2, label=2)
    warped = cube((10, 10, 10), (2, 2, 2), 3, label=1)
    scores = metrics.hd95_per_label(fixed, warped, (1.0, 1.0, 1.0), labels=[1, 2, 3])
    assert scores[1] == 0.0
    assert math.isnan(scores[2]) and math.isnan(scores[3])
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95_per_label(fixed, warped, (1.0, 1.0))


# ----------------------------------------------------------------------------- landmarks


def test_target_registration_error_of_known_points():
    fixed_points = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 2.0], [1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    offsets = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    result = metrics.target_registration_error(fixed_points, fixed_points + offsets)
    np.testing.assert_allclose(result.distances_mm, [5.0, 2.0, 0.0, 3.0], atol=1e-12)
    assert result.mean_mm == pytest.approx(2.5)
    assert result.median_mm == pytest.approx(2.5)
    assert result.max_mm == pytest.approx(5.0)
    assert result.std_mm == pytest.approx(math.sqrt((2.5**2 + 0.5**2 + 2.5**2 + 0.5**2) / 4))
    with pytest.raises(ValueError, match="equal shape"):
        metrics.target_registration_error(fixed_points, fixed_points[:2])


# ----------------------------------------------------------------------------- regularity


def test_folding_fraction_and_sdlogj():
    det = np.ones((4, 5, 6))
    det[0, 0, :3] = [-0.5, 0.0, -2.0]  # det <= 0 counts as folded
    det[1, 1, 1] = 1e-3
    assert metrics.folding_fraction(det) == pytest.approx(3 / 120)
    mask = np.zeros(det.shape, dtype=bool)
    mask[0] = True  # 30 voxels, 3 of them folded
    assert metrics.folding_fraction(torch.from_numpy(det), mask=mask) == pytest.approx(0.1)
    assert metrics.std_log_jacobian(np.full((3, 3, 3), 2.0)) == pytest.approx(0.0, abs=1e-12)
    values = np.array([math.e, 1.0 / math.e] * 4).reshape(2, 2, 2)
    assert metrics.std_log_jacobian(values) == pytest.approx(1.0)


def test_ndv_percent_of_a_reflection_and_of_a_smooth_field():
    shape = (8, 8, 8)
    grid = np.indices(shape).astype(np.float64)
    # phi_0 = c - 0.5 (x0 - c): det = -0.5, every interior voxel scores 0.5 voxel of NDV
    u = np.zeros((3, *shape))
    u[0] = -1.5 * (grid[0] - 3.5)
    mask = np.zeros(shape, dtype=bool)
    mask[1:-1, 1:-1, 1:-1] = True
    assert metrics.ndv_percent(u, mask=mask) == pytest.approx(50.0, abs=1e-9)
    assert metrics.ndv_percent(u) > 0
    assert metrics.folding_fraction(fields.jacobian_determinant(torch.from_numpy(u)[None])) == 1.0
    smooth = 0.3 * np.sin(grid / 3.0)
    assert metrics.ndv_percent(smooth) == 0.0


def test_inverse_consistency_summary_in_mm():
    shape = (6, 6, 6)
    forward = np.zeros((3, *shape))
    forward[0] = 1.5
    inverse = -forward.copy()
    inverse[2, :3] = 0.5  # half the voxels miss by 0.5 voxel along axis 2 (3 mm each)
    summary = metrics.inverse_consistency_summary(forward, inverse, spacing=(1.0, 1.0, 6.0))
    assert summary.mean_mm == pytest.approx(1.5, abs=1e-6)
    assert summary.max_mm == pytest.approx(3.0, abs=1e-6)
    assert summary.p95_mm == pytest.approx(3.0, abs=1e-6)
    mask = np.zeros(shape, dtype=bool)
    mask[3:] = True
    masked = metrics.inverse_consistency_summary(forward, inverse, spacing=(1.0, 1.0, 6.0), mask=mask)
    assert masked.max_mm == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy")
def test_hd95_agrees_with_monai():
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(11)
    spacing = (1.5, 0.8, 1.2)
    fixed = np.zeros((14, 15, 16), dtype=np.int32)
    warped = np.zeros_like(fixed)
    fixed[1:9, 3:12, 2:10] = 1
    warped[2:12, 4:14, 1:9] = 1
    fixed[rng.random(fixed.shape) < 0.05] = 0
    warped[rng.random(warped.shape) < 0.05] = 0
    expected = monai_metrics.compute_hausdorff_distance(
        torch.from_numpy(warped == 1)[None, None],
        torch.from_numpy(fixed == 1)[None, None],
        percentile=95,
        spacing=spacing,
    ).item()
    assert metrics.hd95_per_label(fixed, warped, spacing)[1] == pytest.approx(expected, rel=1e-6)
