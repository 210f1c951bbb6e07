"""The generator's fixed frame: pairs of vessel maps as two-channel volumes with exact geometry.

A training pair (``case_XXX_1`` fixed, ``case_XXX_2`` moving; both on one grid, as Lung250M-4B
writes them) becomes a ``(2, *frame.shape)`` float32 array of vessel *probabilities* in [0, 1]
and the frame's voxel-to-LPS matrix:

1. labels are binarised (> 0, spec 1.3) -- a probability map is kept as it is;
2. box-averaged over the frame spacing (the reference's average pooling), so thin vessels become
   fractional instead of vanishing;
3. sampled (linear) on the frame grid: the image's own axes without obliquity, the frame's
   spacing, centred on the image centre plus ``offset_voxels`` (the reference's off-centre W
   window), zero outside.

Every decoded volume is written with the frame matrix, so geometry is exact (LPS mm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from diffusionreg.errors import InputError
from diffusionreg.image import (
    Grid,
    Image,
    as_probability,
    centred_grid,
    nearest_axis_direction,
    read_image,
    require_same_grid,
    resample,
)
from diffusionreg.spaces import apply_affine

from .config import FrameConfig


@dataclass
class FramedPair:
    """One pair in the frame: ``volumes`` (2, *shape) float32 [fixed, moving] and the frame grid."""

    name: str
    volumes: np.ndarray
    grid: Grid


def frame_grid(image: Image, frame: FrameConfig) -> Grid:
    """The frame grid of ``image``: its axes (un-obliqued), frame spacing, centred on the image
    centre shifted by ``offset_voxels`` frame voxels (towards the high-index end)."""
    extent = np.asarray(image.shape, dtype=np.float64)
    limit_mm = np.asarray(frame.max_extent_mm, dtype=np.float64)
    # an over-long scan is framed on its first max_extent_mm (the reference's case 035)
    limit = np.where(limit_mm > 0, np.minimum(limit_mm / np.maximum(image.spacing, 1e-6), extent), extent)
    centre_index = (limit - 1.0) / 2.0
    direction = nearest_axis_direction(image.grid.direction)
    offset_mm = direction @ (np.asarray(frame.offset_voxels, dtype=np.float64) * frame.spacing_mm)
    centre = apply_affine(image.affine, centre_index) + offset_mm
    return centred_grid(frame.shape, frame.spacing_mm, centre, direction)


def to_frame(image: Image, grid: Grid, frame: FrameConfig) -> np.ndarray:
    """Vessel probability of ``image`` box-averaged to the frame spacing and sampled on ``grid``."""
    probability = as_probability(image.array if image.array.ndim == 3 else image.array[..., 0])
    window = np.maximum(np.rint(frame.spacing_mm / np.maximum(image.spacing, 1e-6)).astype(int), 1)
    if np.any(window > 1):
        probability = ndimage.uniform_filter(probability, size=tuple(int(w) for w in window), mode="constant")
    return resample(Image(probability, image.affine), grid, None, "linear", default=0.0).array.astype(np.float32)


def load_framed_pair(fixed_path: Path, moving_path: Path, frame: FrameConfig) -> FramedPair:
    """Read a pair (same grid required) and place it in the frame."""
    fixed = read_image(fixed_path, what="fixed vessel map")
    moving = read_image(moving_path, what="moving vessel map")
    require_same_grid(fixed, moving, f"fixed vessel map {fixed_path.name}", f"moving vessel map {moving_path.name}")
    grid = frame_grid(fixed, frame)
    volumes = np.stack([to_frame(fixed, grid, frame), to_frame(moving, grid, frame)])
    if volumes[0].max() <= 0 or volumes[1].max() <= 0:
        raise InputError(f"pair {fixed_path.name}: no vessel voxels inside the frame")
    name = fixed_path.name.split(".")[0].removesuffix("_1")
    return FramedPair(name, volumes, grid)


def canonical_grid(grids: list[Grid], frame: FrameConfig) -> Grid:
    """The grid generated pairs are written on: the first training pair's axes, the frame's
    spacing, centred on the mean centre of the training frames (LPS mm)."""
    if not grids:
        raise InputError("no training pairs to place generated volumes")
    centre = np.mean([g.centre_world() for g in grids], axis=0)
    return centred_grid(frame.shape, frame.spacing_mm, centre, grids[0].direction)
