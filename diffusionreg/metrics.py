"""Registration quality metrics on numpy arrays: overlap, surface distance, landmarks, regularity.

Units: distances are millimetres (``spacing`` is the voxel size in mm along array axes
``(i, j, k)``; landmarks are mm in one world space); Dice and fractions are in 0..1; the
non-diffeomorphic volume is reported in percent as in the LUMIR challenge. Displacement fields
follow :mod:`diffusionreg.fields` (``(3, D0, D1, D2)`` or ``(1, 3, D0, D1, D2)`` in voxel
units; numpy arrays or torch tensors are accepted).

Missing data: a label absent from both maps has Dice ``nan``; a label absent from one map has
Dice 0 and HD95 ``nan`` (a surface distance to nothing is undefined). Aggregate with
``np.nanmean`` and report the number of ``nan`` separately.

Errors: arrays of the wrong shape or type break a function's contract (``ValueError``, a bug in
the caller); an empty mask or landmark set is bad input (:class:`~diffusionreg.errors.InputError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from diffusionreg import fields
from diffusionreg.errors import InputError

__all__ = [
    "dice_per_label",
    "hd95_per_label",
    "TargetRegistrationError",
    "target_registration_error",
    "folding_fraction",
    "std_log_jacobian",
    "ndv_percent",
    "InverseConsistencySummary",
    "inverse_consistency_summary",
]

SPATIAL_DIMS = 3
HAUSDORFF_PERCENTILE = 95.0
SUMMARY_PERCENTILE = 95.0
PERCENT = 100.0


# ----------------------------------------------------------------------------- helpers


def _label_pair(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fixed = np.asarray(fixed_labels)
    warped = np.asarray(warped_labels)
    if fixed.shape != warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} vs {warped.shape}")
    return fixed, warped


def _labels_to_score(fixed: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    """The requested labels, or every nonzero label present in the fixed map (sorted)."""
    if labels is None:
        return [int(v) for v in np.unique(fixed) if v != 0]
    return [int(v) for v in labels]


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be {ndim} positive voxel sizes in mm, got {spacing}")
    return values


def _as_field(u: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """A ``(3, D0, D1, D2)`` or ``(1, 3, D0, D1, D2)`` displacement as a ``(1, 3, ...)`` float tensor."""
    tensor = torch.as_tensor(np.ascontiguousarray(u)) if isinstance(u, np.ndarray) else u
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(u).__name__}")
    if tensor.dim() == 1 + SPATIAL_DIMS:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 + SPATIAL_DIMS or tensor.shape[:2] != (1, SPATIAL_DIMS):
        raise ValueError(f"{name} must have shape (3, D0, D1, D2) or (1, 3, D0, D1, D2), got {tuple(tensor.shape)}")
    return tensor if tensor.is_floating_point() else tensor.to(torch.float64)


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _masked(values: np.ndarray, mask: np.ndarray | torch.Tensor | None) -> np.ndarray:
    """The values inside a mask (nonzero = inside) as a flat array; all of them without a mask."""
    if mask is None:
        return values.reshape(-1)
    mask_array = _as_numpy(mask) != 0
    if mask_array.shape != values.shape:
        try:
            mask_array = np.broadcast_to(mask_array, values.shape)
        except ValueError:
            raise ValueError(f"mask shape {mask_array.shape} does not match {values.shape}") from None
    return values[mask_array]


# ----------------------------------------------------------------------------- overlap


def dice_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    labels: Iterable[int] | None = None,
) -> dict[int, float]:
    """Dice ``2 |F ∩ W| / (|F| + |W|)`` per label between two label maps on one grid.

    ``labels`` defaults to every nonzero label present in ``fixed_labels``. A label absent
    from both maps gives ``nan`` (no overlap to measure); absent from one map gives 0.
    """
    fixed, warped = _label_pair(fixed_labels, warped_labels)
    scores: dict[int, float] = {}
    for label in _labels_to_score(fixed, labels):
        in_fixed = fixed == label
        in_warped = warped == label
        total = int(np.count_nonzero(in_fixed)) + int(np.count_nonzero(in_warped))
        if total == 0:
            scores[label] = float("nan")
            continue
        scores[label] = 2.0 * int(np.count_nonzero(in_fixed & in_warped)) / total
    return scores


# ----------------------------------------------------------------------------- surface distance


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a mask with a 6-neighbour outside it (outside the array counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_surface_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from every voxel of ``from_surface`` to the nearest voxel of ``to_surface``."""
    distance_to = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_to[from_surface]


def hd95_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int] | None = None,
    percentile: float = HAUSDORFF_PERCENTILE,
) -> dict[int, float]:
    """Percentile Hausdorff distance (mm) per label, symmetric: the max of both directed percentiles.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: surfaces are the voxels removed by
    one binary erosion (6-connectivity; the array border counts as background); distances are
    Euclidean between voxel centres, scaled by ``spacing`` (mm along array axes); percentiles
    use linear interpolation. ``labels`` defaults to the nonzero labels of ``fixed_labels``.
    A label empty in either map gives ``nan``.
    """
    fixed, warped = _label_pair(fixed_labels, warped_labels)
    if fixed.ndim != SPATIAL_DIMS:
        raise ValueError(f"label maps must be 3D, got {fixed.ndim} dimensions")
    if not 0.0 <= percentile <= PERCENT:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    voxel_size = _spacing(spacing, fixed.ndim)
    scores: dict[int, float] = {}
    for label in _labels_to_score(fixed, labels):
        in_fixed = fixed == label
        in_warped = warped == label
        if not in_fixed.any() or not in_warped.any():
            scores[label] = float("nan")
            continue
        # Both surfaces lie inside the union's bounding box, so distances computed in the box
        # (grown by one voxel so the erosion sees the same neighbours) are exact.
        union_indices = np.nonzero(in_fixed | in_warped)
        box = tuple(
            slice(max(int(idx.min()) - 1, 0), min(int(idx.max()) + 2, size)) for idx, size in zip(union_indices, fixed.shape)
        )
        surface_fixed = _surface(in_fixed[box])
        surface_warped = _surface(in_warped[box])
        forward = _directed_surface_distances(surface_warped, surface_fixed, voxel_size)
        backward = _directed_surface_distances(surface_fixed, surface_warped, voxel_size)
        scores[label] = float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))
    return scores


# ----------------------------------------------------------------------------- landmarks


@dataclass(frozen=True)
class TargetRegistrationError:
    """Landmark errors in mm: per point (``distances_mm``, shape ``(N,)``) and their summary."""

    distances_mm: np.ndarray
    mean_mm: float
    std_mm: float
    median_mm: float
    max_mm: float


def target_registration_error(
    fixed_points_mm: np.ndarray,
    moving_points_mm_mapped: np.ndarray,
) -> TargetRegistrationError:
    """Euclidean distances (mm) between corresponding landmarks ``(N, 3)`` in one world space.

    Typically the fixed landmarks and the moving landmarks mapped into fixed space (or the fixed
    landmarks mapped by the fixed->moving transform and the moving landmarks); row ``n`` of
    each array is the same anatomical point. ``std_mm`` is the population standard deviation.
    """
    a = np.asarray(fixed_points_mm, dtype=np.float64)
    b = np.asarray(moving_points_mm_mapped, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != SPATIAL_DIMS or a.shape != b.shape:
        raise ValueError(f"landmarks must be two (N, 3) arrays of equal shape, got {a.shape} and {b.shape}")
    if a.shape[0] == 0:
        raise InputError("no landmarks given")
    distances = np.linalg.norm(a - b, axis=1)
    return TargetRegistrationError(
        distances_mm=distances,
        mean_mm=float(distances.mean()),
        std_mm=float(distances.std()),
        median_mm=float(np.median(distances)),
        max_mm=float(distances.max()),
    )


# ----------------------------------------------------------------------------- regularity


def folding_fraction(
    jacobian_det: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Fraction (0..1) of voxels, inside ``mask`` if given, whose Jacobian determinant is ``<= 0``."""
    values = _masked(_as_numpy(jacobian_det), mask)
    if values.size == 0:
        raise InputError("no voxels to count (empty Jacobian or mask)")
    return float(np.count_nonzero(values <= 0) / values.size)


def std_log_jacobian(
    jacobian_det: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    clip_min: float = 1e-9,
    clip_max: float = 1e9,
) -> float:
    """Standard deviation of ``log det J`` (SDlogJ of Learn2Reg), determinants clipped to ``[clip_min, clip_max]``."""
    values = _masked(_as_numpy(jacobian_det), mask).astype(np.float64)
    if values.size == 0:
        raise InputError("no voxels to count (empty Jacobian or mask)")
    return float(np.log(np.clip(values, clip_min, clip_max)).std())


def ndv_percent(
    displacement: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Non-diffeomorphic volume of ``x + u`` in percent of the (masked) voxels, as LUMIR reports it.

    ``displacement`` is ``(3, D0, D1, D2)`` or ``(1, 3, D0, D1, D2)`` in voxel units; ``mask``
    ``(D0, D1, D2)`` nonzero = counted. See :func:`diffusionreg.fields.non_diffeomorphic_volume`.
    """
    u = _as_field(displacement, "displacement")
    mask_tensor = None
    if mask is not None:
        mask_array = _as_numpy(mask) != 0
        if mask_array.shape != tuple(u.shape[2:]):
            raise ValueError(f"mask shape {mask_array.shape} does not match the field grid {tuple(u.shape[2:])}")
        mask_tensor = torch.as_tensor(mask_array[None], device=u.device)
    with torch.no_grad():
        result = fields.non_diffeomorphic_volume(u, mask_tensor)
    return float(result.fraction[0]) * PERCENT


@dataclass(frozen=True)
class InverseConsistencySummary:
    """``|phi_f(phi_i(x)) - x|`` over the (masked) voxels, in mm."""

    mean_mm: float
    p95_mm: float
    max_mm: float


def inverse_consistency_summary(
    u_forward: np.ndarray | torch.Tensor,
    u_inverse: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    mask: np.ndarray | torch.Tensor | None = None,
) -> InverseConsistencySummary:
    """Summary of :func:`diffusionreg.fields.inverse_consistency_error` (mm) for one pair of fields.

    Both fields are ``(3, D0, D1, D2)`` or ``(1, 3, D0, D1, D2)`` in voxel units on one grid of
    voxel size ``spacing`` (mm); ``mask`` ``(D0, D1, D2)`` restricts the voxels summarised.
    """
    forward = _as_field(u_forward, "u_forward")
    inverse = _as_field(u_inverse, "u_inverse").to(device=forward.device, dtype=forward.dtype)
    if forward.shape != inverse.shape:
        raise ValueError(f"fields differ in shape: {tuple(forward.shape)} vs {tuple(inverse.shape)}")
    with torch.no_grad():
        errors = fields.inverse_consistency_error(forward, inverse, _spacing(spacing, SPATIAL_DIMS))
    values = _masked(_as_numpy(errors[0]).astype(np.float64), mask)
    if values.size == 0:
        raise InputError("no voxels to summarise (empty field or mask)")
    return InverseConsistencySummary(
        mean_mm=float(values.mean()),
        p95_mm=float(np.percentile(values, SUMMARY_PERCENTILE)),
        max_mm=float(values.max()),
    )
