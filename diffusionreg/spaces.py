"""Coordinate spaces and the exact affine algebra between them.

The one place that says how coordinates are laid out:

* **World** is **LPS, millimetres**, inside the whole backend (the ITK/DICOM convention, so
  transform files and displacement fields need no conversion). RAS appears only at the edges
  (nibabel, Slicer) through :data:`LPS_FROM_RAS`.
* **Voxel** coordinates are array indices ``(i, j, k)`` of ``Image.array`` (nibabel order:
  SimpleITK's ``GetArrayFromImage`` transposed). Voxel centres sit at integer indices.
* **Torch-normalised** coordinates are those of ``torch.nn.functional.affine_grid`` and
  ``grid_sample`` for a tensor ``(B, C, D0, D1, D2)`` holding axes ``(i, j, k)``: the vector is
  ``(x, y, z)`` = axes ``(k, j, i)``. Network matrices use ``align_corners=False``:
  ``n = (2 * index + 1) / size - 1``.

All matrices here are 4x4 homogeneous float64 and act on column vectors.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

WORLD = "LPS"
"""The internal world convention (LPS mm)."""

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Converts RAS points to LPS points (and back: it is its own inverse)."""


def homogeneous(linear: np.ndarray, translation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Build a 4x4 matrix from a 3x3 linear part and a 3-vector translation."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(linear, dtype=np.float64)
    matrix[:3, 3] = np.asarray(translation, dtype=np.float64)
    return matrix


def rotation_about_axis(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (any length; right-hand rule, Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


def centred_affine(
    centre: Sequence[float], linear: np.ndarray, translation: Sequence[float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """4x4 point map ``x -> L (x - c) + c + t`` (mm, in whatever world ``c`` is given: LPS here)."""
    centre = np.asarray(centre, dtype=np.float64)
    linear = np.asarray(linear, dtype=np.float64)
    return homogeneous(linear, centre + np.asarray(translation, dtype=np.float64) - linear @ centre)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points ``(..., 3)`` through a 4x4 matrix (row-vector points, column-vector algebra)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Re-express a voxel-to-RAS matrix (nibabel, Slicer IJKToRAS) as voxel-to-LPS."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64)


def lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ras_to_lps` for voxel-to-world matrices (``LPS_FROM_RAS`` is involutive)."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64)


def lps_to_ras_transform(matrix: np.ndarray) -> np.ndarray:
    """Re-express an LPS->LPS point map as the same physical map in RAS->RAS."""
    return LPS_FROM_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_FROM_RAS


def affine_from_itk(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Voxel-to-LPS matrix from ITK geometry (origin mm, spacing mm, row-major 3x3 direction)."""
    direction_matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return homogeneous(direction_matrix @ np.diag(np.asarray(spacing, dtype=np.float64)), origin)


def itk_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Split a voxel-to-LPS matrix into ITK (origin, spacing, row-major direction)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("voxel-to-world matrix has a zero-length axis")
    direction = linear / spacing
    return tuple(affine[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def voxel_to_normalized(shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Matrix mapping voxel ``(i, j, k)`` to torch-normalised ``(x, y, z) = f(k, j, i)``.

    ``align_corners=False`` (network matrices): ``n = (2 index + 1) / size - 1``, so the
    outer voxel *faces* sit at -1 and +1. ``align_corners=True``: voxel *centres* at -1, +1.
    """
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"expected a 3D shape, got {shape}")
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for out_axis, array_axis in enumerate((2, 1, 0)):
        size = shape[array_axis]
        if align_corners:
            scale = 2.0 / max(size - 1, 1)
            offset = -1.0
        else:
            scale = 2.0 / size
            offset = 1.0 / size - 1.0
        matrix[out_axis, array_axis] = scale
        matrix[out_axis, 3] = offset
    return matrix


def normalized_to_voxel(shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Inverse of :func:`voxel_to_normalized`."""
    return np.linalg.inv(voxel_to_normalized(shape, align_corners))


def world_to_normalized(affine: np.ndarray, shape: Sequence[int], align_corners: bool = False) -> np.ndarray:
    """Matrix from LPS world to the torch-normalised coordinates of a grid (affine, shape)."""
    return voxel_to_normalized(shape, align_corners) @ np.linalg.inv(affine)


def world_transform_from_normalized(
    theta: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    moving_affine: np.ndarray,
    moving_shape: Sequence[int],
    align_corners: bool = False,
) -> np.ndarray:
    """Turn an ``affine_grid`` matrix into an exact LPS point map (fixed world -> moving world).

    ``theta`` (3x4 or 4x4) maps normalised output coordinates of the fixed network grid to
    normalised sampling coordinates of the moving network grid, as ``affine_grid`` does.
    The result maps fixed LPS points to moving LPS points (ITK resampling convention):
    ``T = W_mov N_mov^-1 theta N_fix W_fix^-1``.
    """
    theta4 = np.eye(4)
    theta4[:3, :] = np.asarray(theta, dtype=np.float64)[:3, :]
    fixed_to_norm = world_to_normalized(fixed_affine, fixed_shape, align_corners)
    norm_to_moving = np.linalg.inv(world_to_normalized(moving_affine, moving_shape, align_corners))
    return norm_to_moving @ theta4 @ fixed_to_norm


def normalized_from_world_transform(
    transform: np.ndarray,
    fixed_affine: np.ndarray,
    fixed_shape: Sequence[int],
    moving_affine: np.ndarray,
    moving_shape: Sequence[int],
    align_corners: bool = False,
) -> np.ndarray:
    """Inverse of :func:`world_transform_from_normalized`: an LPS point map as a 3x4 ``theta``."""
    fixed_to_norm = world_to_normalized(fixed_affine, fixed_shape, align_corners)
    moving_to_norm = world_to_normalized(moving_affine, moving_shape, align_corners)
    theta4 = moving_to_norm @ np.asarray(transform, dtype=np.float64) @ np.linalg.inv(fixed_to_norm)
    return theta4[:3, :]
