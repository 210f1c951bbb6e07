"""The head frame: where a model slice lies in template space, and how a head is sampled into it.

Template space is the SCCT head template's world (MNI, LPS mm). A model slice is the plane
``z = const`` of that space, ``slice_size`` square pixels of ``pixel_mm``, array axes (i, j) =
(+x towards the left, +y posterior), centred on ``centre_mm``. A head CT enters the frame through
its pose: a point map ``T`` (template LPS -> CT LPS, the ITK direction, :mod:`midline.pose`), so a
slice pixel ``p`` takes the CT's value at ``T(p)``. Every slice tensor is ``(B, 1, N, N)``; the
sampling goes through :func:`diffusionreg.spaces.sample` on the CT's own world grid.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from diffusionreg.spaces import sample, world_space

from .config import HeadFrame

#: Sub-planes averaged across a slice's thickness (partial volume).
THICKNESS_SAMPLES = 5


def slice_affine(frame: HeadFrame, z_mm: float) -> np.ndarray:
    """4x4 map from slice pixel ``(i, j, 0)`` to template LPS mm for the slice at ``z_mm``."""
    half = (frame.slice_size - 1) / 2.0
    matrix = np.diag([frame.pixel_mm, frame.pixel_mm, 1.0, 1.0])
    matrix[:3, 3] = [frame.centre_mm[0] - half * frame.pixel_mm, frame.centre_mm[1] - half * frame.pixel_mm, z_mm]
    return matrix


def midline_column(frame: HeadFrame) -> float:
    """Pixel column ``i`` (fractional) of the template's midsagittal plane."""
    half = (frame.slice_size - 1) / 2.0
    return half + (frame.midline_x_mm - frame.centre_mm[0]) / frame.pixel_mm


def slice_points(frame: HeadFrame, z_mm: torch.Tensor, thickness_mm: torch.Tensor, samples: int = THICKNESS_SAMPLES):
    """Template LPS points of slices: ``(B, 3, N, N, samples)`` (float64), ``samples`` planes evenly
    across each slice's thickness (centred on ``z_mm``)."""
    n = frame.slice_size
    half = (n - 1) / 2.0
    axis = (torch.arange(n, dtype=torch.float64) - half) * frame.pixel_mm
    x = (axis + frame.centre_mm[0]).view(1, n, 1, 1).expand(len(z_mm), n, n, samples)
    y = (axis + frame.centre_mm[1]).view(1, 1, n, 1).expand(len(z_mm), n, n, samples)
    fractions = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples - 0.5
    z = z_mm.double().view(-1, 1, 1, 1) + thickness_mm.double().view(-1, 1, 1, 1) * fractions.view(1, 1, 1, samples)
    return torch.stack([x, y, z.expand(len(z_mm), n, n, samples)], dim=1)


def map_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply 4x4 point maps ``(B, 4, 4)`` (or one ``(4, 4)``) to points ``(B, 3, ...)``."""
    if matrix.dim() == 2:
        matrix = matrix[None].expand(points.shape[0], 4, 4)
    flat = points.reshape(points.shape[0], 3, -1)
    out = matrix[:, :3, :3].to(points.dtype) @ flat + matrix[:, :3, 3:].to(points.dtype)
    return out.reshape(points.shape)


#: HU of air: what lies beyond a CT's grid.
AIR_HU = -1000.0


def sample_hu(
    volume: torch.Tensor, affine: np.ndarray, points: torch.Tensor, outside_hu: float = AIR_HU, referenced: bool = False
) -> torch.Tensor:
    """HU of a CT ``volume`` ``(D0, D1, D2)`` (world grid ``affine``) at LPS ``points`` ``(B, 3, ...)``,
    ``outside_hu`` beyond the grid; returns ``(B, 1, ...)`` float32. ``referenced``: ``volume``
    already holds ``HU - outside_hu`` (saves a copy per call)."""
    shifted = volume.float() if referenced else volume.float() - outside_hu
    shifted = shifted[None, None].expand(points.shape[0], 1, *volume.shape)
    values = sample(shifted, points, world_space(tuple(volume.shape), affine), padding_mode="zeros")
    return values + outside_hu


def slab_hu(volume: torch.Tensor, affine: np.ndarray, pose: torch.Tensor, frame: HeadFrame, z_mm, thickness_mm) -> torch.Tensor:
    """Slices ``(B, 1, N, N)`` in HU of a CT seen through ``pose`` (template -> CT, 4x4), each the
    mean over its thickness."""
    points = map_points(pose, slice_points(frame, torch.as_tensor(z_mm), torch.as_tensor(thickness_mm)))
    return sample_hu(volume, affine, points).mean(dim=-1)


def window(hu: torch.Tensor, frame: HeadFrame) -> torch.Tensor:
    """HU -> the network's intensity: the window linearly onto [-1, 1], clipped (spec 2.2)."""
    low, high = frame.window_hu
    return ((hu - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)


def head_mask(hu: np.ndarray) -> np.ndarray:
    """Spec 2.2's head mask of one slice: above 0 HU, largest component, holes filled."""
    above = hu > 0.0
    labels, count = ndimage.label(above)
    if count == 0:
        return above
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(largest)


#: Bone and brain thresholds of the intracranial mask (HU).
BONE_HU = 150.0
TISSUE_HU = -20.0


def intracranial_mask(hu: np.ndarray) -> np.ndarray:
    """Inside the skull of one slice: holes of the bone ring that are soft tissue (HU above
    :data:`TISSUE_HU`); the largest such region. Empty when the slice has no closed skull."""
    bone = ndimage.binary_closing(hu > BONE_HU, iterations=2)
    inside = ndimage.binary_fill_holes(bone) & ~bone & (hu > TISSUE_HU)
    labels, count = ndimage.label(inside)
    if count == 0:
        return inside
    return labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
