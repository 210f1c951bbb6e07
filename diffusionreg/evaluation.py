"""Registration evaluation: overlap of warped labels, landmark error, deformation quality.

Used by ``diffusionreg evaluate`` and by the benchmarks. The moving labels are carried onto the
fixed grid through the transform(s) in ITK's resampling convention with nearest-neighbour
interpolation, then compared with the fixed labels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusionreg import metrics
from diffusionreg.errors import InputError
from diffusionreg.image import Grid, Image, resample
from diffusionreg.spaces import LPS_FROM_RAS, apply_affine
from diffusionreg.transforms import (
    CompositeTransform,
    DisplacementFieldTransform,
    Transform,
    to_displacement_field,
)


def parse_label_list(text: str) -> list[int]:
    """Labels from ``"2,3,4"`` or a file's contents (commas or whitespace; ``#`` comments)."""
    values: list[int] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for token in line.replace(",", " ").split():
            try:
                values.append(int(float(token)))
            except ValueError:
                raise InputError(f"label list has a non-numeric entry {token!r}") from None
    if not values:
        raise InputError("label list is empty")
    return values


def read_label_file(path: str | os.PathLike) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file not found: {path}")
    return parse_label_list(path.read_text())


@dataclass
class Landmarks:
    """Paired landmarks in LPS mm: ``fixed[n]`` corresponds to ``moving[n]``."""

    fixed: np.ndarray
    moving: np.ndarray


def read_landmarks(path: str | os.PathLike, fixed_grid: Grid | None = None, moving_grid: Grid | None = None) -> Landmarks:
    """Read paired landmarks from CSV.

    Columns either ``fixed_x,fixed_y,fixed_z,moving_x,moving_y,moving_z`` (LPS mm; add a
    column ``space`` with value ``RAS`` on every row for RAS mm) or
    ``fixed_i,fixed_j,fixed_k,moving_i,moving_j,moving_k`` (0-based voxel indices of the fixed
    and moving grids, which must then be given).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmarks file not found: {path}")
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if None in row:  # DictReader files values beyond the header under the key None
                raise InputError(
                    f"landmarks file {path} line {reader.line_num} has {len(row) - 1 + len(row[None])} "
                    f"values but the header names {len(row) - 1} columns"
                )
            rows.append(row)
    if not rows:
        raise InputError(f"landmarks file {path} has no rows")
    columns = set(rows[0].keys())

    def take(names: Sequence[str]) -> np.ndarray:
        try:
            return np.array([[float(row[n]) for n in names] for row in rows], dtype=np.float64)
        except (KeyError, ValueError, TypeError):
            raise InputError(f"landmarks file {path} has a missing or non-numeric value in {', '.join(names)}") from None

    if {"fixed_x", "moving_x"} <= columns:
        fixed = take(["fixed_x", "fixed_y", "fixed_z"])
        moving = take(["moving_x", "moving_y", "moving_z"])
        if "space" in columns and rows[0]["space"].strip().upper() == "RAS":
            fixed, moving = apply_affine(LPS_FROM_RAS, fixed), apply_affine(LPS_FROM_RAS, moving)
    elif {"fixed_i", "moving_i"} <= columns:
        if fixed_grid is None or moving_grid is None:
            raise InputError("voxel landmarks need the fixed and moving grids")
        fixed = apply_affine(fixed_grid.affine, take(["fixed_i", "fixed_j", "fixed_k"]))
        moving = apply_affine(moving_grid.affine, take(["moving_i", "moving_j", "moving_k"]))
    else:
        raise InputError(f"landmarks file {path} needs columns fixed_x..moving_z (mm) or fixed_i..moving_k (voxels)")
    if not (np.all(np.isfinite(fixed)) and np.all(np.isfinite(moving))):
        raise InputError(f"landmarks file {path} contains NaN values")
    return Landmarks(fixed, moving)


def labels_in_neither(fixed_labels: Image, moving_labels: Image, labels: Sequence[int]) -> list[int]:
    """The requested labels that neither label map contains (scored n/a).

    Raises InputError when that is every requested label: there would be nothing to score.
    """
    present = set(np.unique(fixed_labels.array).tolist()) | set(np.unique(moving_labels.array).tolist())
    absent = [int(v) for v in labels if v not in present]
    if absent and len(absent) == len(labels):
        raise InputError(f"labels {', '.join(str(v) for v in absent)} are in neither label volume")
    return absent


def has_dense_part(transform: Transform | None) -> bool:
    if isinstance(transform, DisplacementFieldTransform):
        return True
    if isinstance(transform, CompositeTransform):
        return any(has_dense_part(t) for t in transform.transforms)
    return False


def dense_grid(transform: Transform) -> Grid:
    """The grid of the first displacement field in a chain (where its folding is measured)."""
    if isinstance(transform, DisplacementFieldTransform):
        return transform.grid
    if isinstance(transform, CompositeTransform):
        for part in transform.transforms:
            if has_dense_part(part):
                return dense_grid(part)
    raise ValueError("transform has no displacement field")


def deformation_statistics(transform: Transform, mask: Image | None = None) -> dict:
    """Jacobian determinant statistics, folding and NDV of a transform with a dense part.

    The whole chain (affine parts included) is sampled as one displacement field on the grid of
    its displacement field and differentiated in voxel units; the determinant is unitless
    (volume ratio). ``mask`` (nonzero = counted) must be on that grid.
    """
    import torch

    from diffusionreg import fields

    grid = dense_grid(transform)
    if mask is not None and not mask.grid.same_as(grid, 1e-3):
        raise InputError(
            f"mask and displacement field are on different grids (shapes {mask.shape} vs {grid.shape}); "
            "the mask must be on the field's grid"
        )
    field = transform.field if isinstance(transform, DisplacementFieldTransform) else to_displacement_field(transform, grid).field
    # LPS mm displacement -> voxel units along the grid's array axes.
    to_voxel = np.linalg.inv(grid.affine[:3, :3]).astype(np.float32)
    voxel_field = np.einsum("ab,ijkb->aijk", to_voxel, field.array.astype(np.float32, copy=False))
    tensor = torch.from_numpy(np.ascontiguousarray(voxel_field))[None]
    region = None if mask is None else mask.array > 0
    with torch.no_grad():
        determinant = fields.jacobian_determinant(tensor)[0].numpy()
        ndv_fraction = float(
            fields.non_diffeomorphic_volume(tensor, None if region is None else torch.from_numpy(region)[None]).fraction[0]
        )
    values = determinant if region is None else determinant[region]
    return {
        "grid_shape": list(grid.shape),
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "jacobian_mean": float(values.mean()),
        "jacobian_std_log": metrics.std_log_jacobian(values),
        "folding_fraction": float(metrics.folding_fraction(values)),
        "ndv_percent": 100.0 * ndv_fraction,
    }


def evaluate(
    fixed_labels: Image,
    moving_labels: Image,
    transform: Transform | None,
    labels: Sequence[int] | None = None,
    landmarks: Landmarks | None = None,
    mask: Image | None = None,
) -> dict:
    """Dice and HD95 per label (and their means), landmark TRE and deformation statistics.

    Returns a JSON-ready dict: ``dice``, ``mean_dice``, ``hd95`` (mm), ``mean_hd95``,
    ``absent_labels`` (requested labels in neither map, scored n/a; see :func:`labels_in_neither`), and
    when relevant ``tre`` (mm, before and after) and ``deformation`` (Jacobian, folding, NDV).
    """
    if labels is None:
        present = np.unique(fixed_labels.array)
        labels = [int(v) for v in present if v != 0]
        absent: list[int] = []
    else:
        absent = labels_in_neither(fixed_labels, moving_labels, labels)
    warped = resample(moving_labels, fixed_labels.grid, transform, interpolation="nearest")
    dice = metrics.dice_per_label(fixed_labels.array, warped.array, labels)
    hd95 = metrics.hd95_per_label(fixed_labels.array, warped.array, fixed_labels.spacing, labels)
    result: dict = {
        "labels": [int(v) for v in labels],
        "dice": {str(k): _finite_or_none(v) for k, v in dice.items()},
        "mean_dice": _nanmean(dice.values()),
        "hd95": {str(k): _finite_or_none(v) for k, v in hd95.items()},
        "mean_hd95": _nanmean(hd95.values()),
        "absent_labels": absent,
    }
    if landmarks is not None:
        mapped = transform.map_points(landmarks.fixed) if transform is not None else landmarks.fixed
        before = np.linalg.norm(landmarks.fixed - landmarks.moving, axis=1)
        after = np.linalg.norm(mapped - landmarks.moving, axis=1)
        result["tre"] = {
            "count": int(len(after)),
            "mean_mm": float(after.mean()),
            "std_mm": float(after.std()),
            "median_mm": float(np.median(after)),
            "p95_mm": float(np.percentile(after, 95)),
            "initial_mean_mm": float(before.mean()),
        }
    if transform is not None and has_dense_part(transform):
        result["deformation"] = deformation_statistics(transform, mask)
    return result


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _nanmean(values) -> float | None:
    array = np.array([v for v in values], dtype=np.float64)
    if array.size == 0 or np.all(np.isnan(array)):
        return None
    return float(np.nanmean(array))


def format_table(result: dict) -> str:
    """A readable per-label table with means, then TRE and deformation lines."""
    lines = [f"{'label':>7}  {'Dice':>7}  {'HD95 mm':>8}"]
    for label in result["labels"]:
        dice = result["dice"].get(str(label))
        hd = result["hd95"].get(str(label))
        lines.append(f"{label:>7}  {_fmt(dice, 4):>7}  {_fmt(hd, 2):>8}")
    lines.append(f"{'mean':>7}  {_fmt(result['mean_dice'], 4):>7}  {_fmt(result['mean_hd95'], 2):>8}")
    if "tre" in result:
        tre = result["tre"]
        lines.append(
            f"TRE over {tre['count']} landmarks: {tre['mean_mm']:.2f} ± {tre['std_mm']:.2f} mm "
            f"(median {tre['median_mm']:.2f}, before {tre['initial_mean_mm']:.2f} mm)"
        )
    if "deformation" in result:
        d = result["deformation"]
        lines.append(
            f"Jacobian determinant: min {d['jacobian_min']:.3f}, max {d['jacobian_max']:.3f}, "
            f"std log {d['jacobian_std_log']:.3f}; folding {100 * d['folding_fraction']:.4f} %; NDV {d['ndv_percent']:.4f} %"
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
