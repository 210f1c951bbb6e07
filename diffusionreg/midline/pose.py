"""Head pose: is this a head CT, in which HU convention, and where is it relative to the template.

* :func:`to_hounsfield` detects HU + 1024 stored unsigned (air at 0 instead of -1000) and
  subtracts the offset (the caller says so on stderr).
* :func:`check_head_ct` refuses what is not a head CT: fewer than 3 slices or too little coverage,
  no air (an MRI or another non-CT has no values near -1000 HU), no skull-density voxels.
* :func:`align_to_template` finds ``T`` (template LPS -> CT LPS, the ITK direction) as a rotation
  with an isotropic scale and a translation, by maximising the mutual information between the
  template head and the CT (the affine refinement's Parzen-window MI, on the same world grids),
  coarse to fine, from several pitch starts (pitched heads). Constrained to rigid + scale so the
  template's midsagittal plane stays a plane of the head, not a sheared one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from diffusionreg.affine.refine import mutual_information
from diffusionreg.errors import InputError
from diffusionreg.image import Image, centred_grid, resample
from diffusionreg.spaces import homogeneous, rotation_about_axis, sample_affine, space_of_grid

from .config import MidlineInference

#: HU + 1024 images (air near 0) have no value below this.
UNSIGNED_AIR_LIMIT = -200.0
#: Values above this only exist in HU + 1024 data (dense bone + 1024 and more) ...
UNSIGNED_BONE_VALUE = 1300.0
HU_OFFSET = 1024.0
AIR_HU = -500.0  # a CT has air below this
SKULL_HU = 300.0  # skull density
#: Intensity window (HU) of the alignment's similarity: brain, CSF and skull all distinct.
POSE_WINDOW_HU = (-200.0, 300.0)
POSE_FIELD_OF_VIEW_MM = 240.0
POSE_BINS = 16
POSE_LEARNING_RATE = 0.01
POSE_STRIDE = 2  # score every 2nd voxel per axis on the finest level
POSE_MARGIN_VOXELS = 2  # air voxels scored around the template head
HEAD_HU = -300.0  # head (tissue and bone) versus air, for centroids
CRANIUM_DEPTH_MM = 110.0
POSE_SHIFT_UNIT_MM = 50.0  # translation parameter unit (Adam steps are per unit)


def to_hounsfield(image: Image) -> tuple[Image, bool]:
    """The image in HU, and whether an offset of 1024 was removed (HU + 1024 stored unsigned)."""
    array = image.array.astype(np.float32, copy=False)
    # A CT in HU has air (about -1000) somewhere; stored unsigned, nothing is below 0.
    if float(array.min()) >= UNSIGNED_AIR_LIMIT and float(array.max()) > UNSIGNED_BONE_VALUE:
        return image.with_array(array - HU_OFFSET), True
    return image.with_array(array), False


def check_head_ct(image: Image, settings: MidlineInference, what: str = "CT") -> None:
    """Raise :class:`InputError` unless ``image`` (HU) looks like a head CT."""
    slices = int(min(image.shape))
    extent = float(np.min(np.asarray(image.shape) * image.spacing))
    if slices < 3 or extent < settings.min_extent_mm:
        raise InputError(
            f"{what} covers {extent:.0f} mm in {slices} slices: a head CT of at least 3 slices and "
            f"{settings.min_extent_mm:.0f} mm is needed"
        )
    voxel_ml = float(np.prod(image.spacing)) / 1000.0
    air = int(np.count_nonzero(image.array < AIR_HU))
    if air == 0:
        raise InputError(f"{what} has no air (nothing below {AIR_HU:.0f} HU): not a CT in Hounsfield units (an MRI?)")
    skull_ml = float(np.count_nonzero(image.array >= SKULL_HU)) * voxel_ml
    if skull_ml < settings.min_skull_ml:
        raise InputError(
            f"{what} has {skull_ml:.1f} ml of skull-density voxels (>= {SKULL_HU:.0f} HU), fewer than "
            f"{settings.min_skull_ml:.0f} ml: not a head CT"
        )


def head_centroid(image: Image) -> np.ndarray:
    """LPS mm centroid of the cranium: head voxels (above :data:`HEAD_HU`) within
    :data:`CRANIUM_DEPTH_MM` of the vertex (a scan's neck and face coverage varies; the vertex does not)."""
    index = np.argwhere(image.array[::2, ::2, ::2] > HEAD_HU) * 2
    if len(index) == 0:
        raise InputError("no head found in the CT (nothing above -300 HU)")
    world = index @ image.affine[:3, :3].T + image.affine[:3, 3]
    top = np.percentile(world[:, 2], 99.9)
    return world[world[:, 2] > top - CRANIUM_DEPTH_MM].mean(axis=0)


def _pose_intensity(image: Image) -> Image:
    low, high = POSE_WINDOW_HU
    return image.with_array(np.clip((image.array.astype(np.float32) - low) / (high - low), 0.0, 1.0))


def _skew(w: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=w.dtype)
    return torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]), torch.stack([-w[1], w[0], zero])])


@dataclass
class Pose:
    """``matrix``: template LPS -> CT LPS (4x4); ``scale``: its isotropic scale; ``score``: final MI."""

    matrix: np.ndarray
    scale: float
    score: float


def align_to_template(ct: Image, template: Image, settings: MidlineInference, progress_stage=None) -> Pose:
    """Rigid + isotropic-scale pose of ``ct`` (HU) relative to ``template`` (HU), by MI."""
    ct_n, template_n = _pose_intensity(ct), _pose_intensity(template)
    c_t, c_m = head_centroid(template), head_centroid(ct)
    c_t_t = torch.as_tensor(c_t)

    def matrix_of(rotation: torch.Tensor, shift: torch.Tensor, log_scale: torch.Tensor, start: np.ndarray) -> torch.Tensor:
        linear = torch.as_tensor(start) @ torch.linalg.matrix_exp(_skew(rotation)) * torch.exp(log_scale)
        out = torch.eye(4, dtype=torch.float64)
        out[:3, :3] = linear
        out[:3, 3] = torch.as_tensor(c_m) + shift * POSE_SHIFT_UNIT_MM - linear @ c_t_t
        return out

    def level_data(spacing: float, stride: int):
        size = int(np.ceil(POSE_FIELD_OF_VIEW_MM / spacing))
        grid_f = centred_grid((size,) * 3, spacing, c_t)
        fixed = torch.from_numpy(resample(template_n, grid_f, None, "linear").array)
        grid_m = centred_grid((size,) * 3, spacing, c_m)
        moving = torch.from_numpy(resample(ct_n, grid_m, None, "linear").array)[None, None]
        if stride > 1:
            fixed = fixed[::stride, ::stride, ::stride].contiguous()
            grid_f = type(grid_f)(tuple(fixed.shape), grid_f.affine @ np.diag([stride, stride, stride, 1.0]))
        # Score the head and a margin of air around it (the far air says nothing about the pose).
        near_head = ndimage.binary_dilation(fixed.numpy() > 0.0, iterations=POSE_MARGIN_VOXELS)
        weight = torch.from_numpy(near_head.astype(np.float32))
        return fixed, moving, space_of_grid(grid_f), space_of_grid(grid_m), weight

    def score_of(params, data, start: np.ndarray) -> torch.Tensor:
        fixed, moving, space_f, space_m, weight = data
        warped = sample_affine(moving, matrix_of(*params, start)[None], space_f, space_m)[0, 0]
        return mutual_information(fixed, warped.float(), weight, POSE_BINS)

    def optimise(state, data, iterations: int, start: np.ndarray):
        params = [p.clone().requires_grad_(True) for p in state]
        optimiser = torch.optim.Adam(params, lr=POSE_LEARNING_RATE)
        for _ in range(iterations):
            optimiser.zero_grad()
            loss = -score_of(params, data, start)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return [p.detach() for p in params], float(score_of(params, data, start))

    zeros = (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    levels = settings.pose_levels_mm
    coarse = level_data(levels[0], 1)
    # Pitched heads: the start (about the left-right axis) with the best similarity before optimising.
    with torch.no_grad():
        starts = [rotation_about_axis((1, 0, 0), pitch) for pitch in settings.pose_pitch_starts_deg]
        start = max(starts, key=lambda m: float(score_of(zeros, coarse, m)))
    state, score = zeros, float("nan")
    for index, spacing in enumerate(levels):
        data = coarse if index == 0 else level_data(spacing, POSE_STRIDE)
        state, score = optimise(state, data, settings.pose_iterations, start)
        if progress_stage is not None:
            progress_stage.update(1)
    with torch.no_grad():
        matrix = matrix_of(*state, start).numpy()
    return Pose(matrix=matrix, scale=float(torch.exp(state[2])), score=score)


def identity_pose() -> Pose:
    return Pose(matrix=homogeneous(np.eye(3), np.zeros(3)), scale=1.0, score=float("nan"))
