"""The written inverse field solved against the written forward field (deformable/inverse_field.py)."""

from __future__ import annotations

import numpy as np

from diffusionreg.deformable.inverse_field import solve_inverse
from diffusionreg.image import Image, centred_grid, grid_points
from diffusionreg.spaces import apply_affine, rotation_about_axis
from diffusionreg.transforms import DisplacementFieldTransform


def smooth_displacement(points: np.ndarray) -> np.ndarray:
    """A smooth, invertible displacement (mm) of up to ~3 mm with gradients up to ~0.5."""
    x, y, z = points.T
    return np.stack(
        [
            2.0 * np.sin(y / 6.0) + 0.5 * np.cos(z / 5.0),
            1.5 * np.sin(z / 7.0 + x / 9.0),
            -2.0 * np.cos(x / 5.0) * np.sin(y / 11.0),
        ],
        axis=1,
    )


def test_solved_inverse_inverts_the_written_forward_field_as_itk_reads_it() -> None:
    fixed_grid = centred_grid((30, 28, 26), (1.2, 1.0, 1.1), (0.0, 0.0, 0.0), rotation_about_axis((1.0, 1.0, 0.0), 20.0))
    moving_grid = centred_grid((22, 24, 20), (1.0, 1.3, 1.0), (1.0, -0.5, 0.5), rotation_about_axis((0.0, 1.0, 1.0), -15.0))
    p = grid_points(fixed_grid)
    forward = Image(smooth_displacement(p).reshape(fixed_grid.shape + (3,)).astype(np.float32), fixed_grid.affine)
    # A crude start: minus the forward displacement at the moving voxels (first-order inverse).
    q = grid_points(moving_grid)
    start = -smooth_displacement(q).reshape(moving_grid.shape + (3,))
    transform = DisplacementFieldTransform(forward)

    def errors(inverse: np.ndarray) -> np.ndarray:
        mapped = q + inverse.reshape(-1, 3)
        index = apply_affine(np.linalg.inv(fixed_grid.affine), mapped)
        inside = np.all((index >= 0) & (index <= np.asarray(fixed_grid.shape) - 1), axis=1)
        return np.linalg.norm(transform.map_points(mapped[inside]) - q[inside], axis=1)

    assert errors(start).mean() > 0.2  # the start is far off, so the test can fail
    solved, residual = solve_inverse(forward, start, moving_grid, iterations=20, tolerance_mm=1e-4)
    final = errors(solved)
    assert final.size > 0.5 * q.shape[0]
    assert final.max() < 1e-3, final.max()
    assert residual.max_mm < 1e-3 and residual.voxels == final.size
    assert solved.dtype == np.float32 and solved.shape == moving_grid.shape + (3,)


def test_slabs_give_the_whole_volume_result() -> None:
    """The solve runs slab by slab (memory); slab edges must not change the result."""
    fixed_grid = centred_grid((16, 14, 12), 1.5, (0.0, 0.0, 0.0))
    moving_grid = centred_grid((12, 10, 9), 1.7, (0.5, 0.0, -0.5), rotation_about_axis((1.0, 0.0, 1.0), 10.0))
    forward = Image(
        smooth_displacement(grid_points(fixed_grid)).reshape(fixed_grid.shape + (3,)).astype(np.float32), fixed_grid.affine
    )
    start = -smooth_displacement(grid_points(moving_grid)).reshape(moving_grid.shape + (3,))
    whole, _ = solve_inverse(forward, start, moving_grid, iterations=3, tolerance_mm=1e-6)
    slabs, _ = solve_inverse(forward, start, moving_grid, iterations=3, tolerance_mm=1e-6, slab_points=2 * 10 * 9)
    np.testing.assert_array_equal(slabs, whole)
