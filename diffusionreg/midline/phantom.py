"""An analytic head CT phantom in HU (tests and demos: no data files, exact geometry).

In its own frame (template-like LPS mm, midsagittal plane ``x = 0``): scalp, skull and brain as
nested ellipsoids, two lateral ventricles either side of the septum, a third-ventricle slit on
the midline and a face in front (so that the front-back and up-down directions are defined).
``phantom_head(grid, placement)`` evaluates it on any grid, ``placement`` mapping the phantom frame
into the grid's world (rotation, shift, scale), so a test knows where every structure is.
"""

from __future__ import annotations

import numpy as np

from diffusionreg.image import Grid, Image, grid_points

AIR_HU = -1000.0
SCALP_HU = 30.0
SKULL_HU = 1200.0
BRAIN_HU = 33.0
CSF_HU = 5.0

CENTRE = np.array([0.0, 17.0, 10.0])  # of the head (mm, phantom frame)
OUTER = np.array([76.0, 96.0, 86.0])  # semi-axes of the scalp surface
SCALP_MM = 4.0
SKULL_MM = 6.0
VENTRICLES = ((8.0, 5.0, 15.0), (-8.0, 5.0, 15.0))  # centres of the lateral ventricles
VENTRICLE_AXES = np.array([5.0, 20.0, 9.0])
THIRD_VENTRICLE = ((-1.5, 1.5), (12.0, 28.0), (-2.0, 10.0))  # x, y, z ranges
FACE_CENTRE = np.array([0.0, -88.0, -25.0])
FACE_AXES = np.array([35.0, 25.0, 30.0])


def _inside(points: np.ndarray, centre, axes) -> np.ndarray:
    return np.sum(((points - np.asarray(centre)) / np.asarray(axes)) ** 2, axis=1) <= 1.0


def phantom_values(points: np.ndarray) -> np.ndarray:
    """HU at phantom-frame points ``(M, 3)``."""
    values = np.full(len(points), AIR_HU)
    values[_inside(points, FACE_CENTRE, FACE_AXES)] = SCALP_HU
    values[_inside(points, CENTRE, OUTER)] = SCALP_HU
    values[_inside(points, CENTRE, OUTER - SCALP_MM)] = SKULL_HU
    values[_inside(points, CENTRE, OUTER - SCALP_MM - SKULL_MM)] = BRAIN_HU
    for centre in VENTRICLES:
        values[_inside(points, centre, VENTRICLE_AXES)] = CSF_HU
    (x0, x1), (y0, y1), (z0, z1) = THIRD_VENTRICLE
    slit = (points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)
    values[slit & (points[:, 2] > z0) & (points[:, 2] < z1)] = CSF_HU
    return values


def phantom_head(grid: Grid, placement: np.ndarray | None = None, offset_hu: float = 0.0) -> Image:
    """The phantom on ``grid`` (float32 HU + ``offset_hu``); ``placement``: phantom frame -> world (4x4)."""
    to_frame = np.linalg.inv(np.eye(4) if placement is None else placement)
    world = grid_points(grid)
    points = world @ to_frame[:3, :3].T + to_frame[:3, 3]
    return Image((phantom_values(points) + offset_hu).astype(np.float32).reshape(grid.shape), grid.affine.copy())
