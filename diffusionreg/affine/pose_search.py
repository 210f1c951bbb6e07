"""Any-pose start for the affine registration: starting poses scored cheaply at low resolution.

The diffusion network (trained on rotations up to about 15-30 deg) and the refinement both need
a start within a few tens of degrees of the answer; from 90 deg or more they fail (issue 16).
This stage finds such a start before them:

1. the images' centres (the registration's ``initialize`` choice) fix the translation;
2. every rotation of a fixed candidate set covering SO(3) (``cube``: the 24 rotations of the
   cube; ``cube-corners``: each of those composed with the identity and 8 rotations towards the
   cube's corners, 216 starts within 36 deg of any rotation) is scored by the normalised mutual
   information of the fixed image and the moving image mapped through it, on a coarse grid (over
   the fixed foreground and a margin of air around it when ``foreground_fraction`` is set: a moving
   scan that covers more, a face, neck or table, must not outweigh the anatomy);
3. the best few are polished by a pattern search (rotation about each fixed axis, translation
   along it, the step halved when nothing improves), still at low resolution;
4. the best ``keep`` distinct poses go on to the diffusion and refinement (``register.py``),
   which keeps the one with the highest final similarity.

Every pose is a fixed -> moving LPS point map ``x -> c_mov + t + R (x - c_fix)`` (ITK resampling
convention), so it composes exactly with the rest of the chain. The identity rotation is always a
candidate, so a start that is already near costs the scoring only (about a second).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from diffusionreg.image import Grid, Image, centred_grid, resample
from diffusionreg.spaces import rotation_about_axis, sample_affine, space_of_grid

from .config import PoseSearchConfig


@dataclass(frozen=True)
class Pose:
    """A starting pose: ``x -> c_mov + translation + rotation (x - c_fix)`` (LPS mm)."""

    rotation: np.ndarray  # 3x3 proper rotation, fixed axes -> moving axes
    translation: np.ndarray  # mm, added to the moving centre
    score: float  # normalised mutual information at the search resolution (higher is better)

    def matrix(self, centre_fixed: np.ndarray, centre_moving: np.ndarray) -> np.ndarray:
        """The 4x4 fixed -> moving LPS matrix of this pose."""
        out = np.eye(4)
        out[:3, :3] = self.rotation
        out[:3, 3] = np.asarray(centre_moving) + self.translation - self.rotation @ np.asarray(centre_fixed)
        return out


def cube_rotations() -> np.ndarray:
    """The 24 proper rotations of the cube (signed permutation matrices of determinant +1), (24, 3, 3); identity first."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), perm] = signs
            if np.linalg.det(matrix) > 0:
                out.append(matrix)
    return np.stack(out)


def candidate_rotations(kind: str, corner_deg: float) -> np.ndarray:
    """The candidate set ``kind`` ('cube' or 'cube-corners'), (N, 3, 3), the identity first."""
    cube = cube_rotations()
    if kind == "cube":
        return cube
    # Offsets towards the 8 corners shrink the covering radius of the cube group from 62 deg to
    # about 36 deg (measured with random rotations), within reach of the pattern search.
    offsets = [np.eye(3)] + [rotation_about_axis(corner, corner_deg) for corner in itertools.product((1.0, -1.0), repeat=3)]
    return np.stack([c @ o for c in cube for o in offsets])


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (deg) of the rotation taking ``a`` to ``b``."""
    cosine = (np.trace(a.T @ b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def pooled(image: Image, spacing_mm: float) -> Image:
    """Block average to about ``spacing_mm`` (integer factor per axis), so that sampling at that
    spacing does not alias; the returned matrix places each block at its centre."""
    factors = [max(1, int(spacing_mm // s)) for s in image.spacing]
    if factors == [1, 1, 1]:
        return image
    array = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None, None]
    out = F.avg_pool3d(array, kernel_size=factors, stride=factors)[0, 0].numpy()
    affine = image.affine @ np.diag([*factors, 1.0])
    affine[:3, 3] = image.affine[:3, :3] @ ((np.asarray(factors) - 1.0) / 2.0) + image.affine[:3, 3]
    return Image(out, affine)


class Scorer:
    """Normalised mutual information of the fixed image and the moving image through batches of
    fixed -> moving matrices, on a cube of ``spacing_mm`` around the fixed centre.

    NMI = 2 I(F; M) / (H(F) + H(M)) from a hard joint histogram of the two intensity ranges
    (0: independent, 1: one determines the other). No gradient is needed: the search only ranks.
    """

    def __init__(
        self,
        fixed: Image,
        moving: Image,
        centre_fixed: np.ndarray,
        spacing_mm: float,
        bins: int,
        max_field_of_view_mm: float,
        foreground_fraction: float | None = None,
        foreground_margin_mm: float = 0.0,
    ):
        """``fixed`` and ``moving`` already in [0, 1] (:func:`~.refine.unit_intensities`).

        ``foreground_fraction``: score only the fixed voxels above it, dilated by
        ``foreground_margin_mm`` (the head and the air just around it); None: every voxel of the cube."""
        self.bins = int(bins)
        fixed_n, moving_n = pooled(fixed, spacing_mm), pooled(moving, spacing_mm)
        extent = float(np.max(np.asarray(fixed.shape) * fixed.spacing))
        size = int(np.ceil(min(extent, max_field_of_view_mm) / spacing_mm))
        self.grid: Grid = centred_grid((size,) * 3, spacing_mm, centre_fixed)
        fixed_a = resample(fixed_n, self.grid, None, "linear", default=0.0).array
        self.inside: torch.Tensor | None = None  # flat indices of the scored fixed voxels (None: all)
        if foreground_fraction is not None:
            near = fixed_a > foreground_fraction
            margin = int(round(foreground_margin_mm / spacing_mm))  # voxels (scipy reads 0 as "until nothing changes")
            if margin > 0:
                near = ndimage.binary_dilation(near, iterations=margin)
            self.inside = torch.from_numpy(np.flatnonzero(near))
        self.fixed_bins = self._scored(self._bin(torch.from_numpy(fixed_a)).reshape(1, -1))[0]
        self.moving = torch.from_numpy(np.ascontiguousarray(moving_n.array, dtype=np.float32))[None, None]
        self.moving_space = space_of_grid(moving_n.grid)
        self.fixed_space = space_of_grid(self.grid)

    def _bin(self, values: torch.Tensor) -> torch.Tensor:
        return (values.clamp(0.0, 1.0) * (self.bins - 1)).round().long()

    def _scored(self, flat: torch.Tensor) -> torch.Tensor:
        """The scored voxels of ``flat`` (N, voxels of the grid)."""
        return flat if self.inside is None else flat[:, self.inside]

    @torch.no_grad()
    def __call__(self, matrices: np.ndarray, batch: int = 16) -> np.ndarray:
        """NMI of each (4, 4) fixed -> moving matrix in ``matrices`` (N, 4, 4)."""
        scores = []
        for start in range(0, len(matrices), batch):
            chunk = torch.as_tensor(np.asarray(matrices[start : start + batch]), dtype=torch.float64)
            n = chunk.shape[0]
            warped = sample_affine(
                self.moving.expand(n, -1, -1, -1, -1), chunk, self.fixed_space, self.moving_space, padding_mode="zeros"
            )
            joint_index = self.fixed_bins[None] * self.bins + self._bin(self._scored(warped.reshape(n, -1)))
            joint_index = joint_index + torch.arange(n)[:, None] * self.bins**2
            joint = torch.bincount(joint_index.reshape(-1), minlength=n * self.bins**2).reshape(n, self.bins, self.bins)
            joint = joint.to(torch.float64) / self.fixed_bins.numel()
            scores.append(normalised_mutual_information(joint).numpy())
        return np.concatenate(scores)


def normalised_mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """2 I / (H_a + H_b) of joint histograms ``(..., bins, bins)`` that sum to 1."""

    def entropy(p: torch.Tensor, dims) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dims)

    h_a, h_b, h_ab = entropy(joint.sum(-1), -1), entropy(joint.sum(-2), -1), entropy(joint, (-2, -1))
    return 2.0 * (h_a + h_b - h_ab) / (h_a + h_b).clamp_min(1e-12)


def _pattern_search(scorer: Scorer, pose: Pose, c_fix, c_mov, config: PoseSearchConfig) -> Pose:
    """Polish ``pose``: try +-step rotations about each fixed axis and +-step shifts along each
    axis, move to the best if it scores higher, else halve both steps, until the smallest step."""
    rot_step, shift_step = config.rotation_step_deg, config.translation_step_mm
    axes = np.eye(3)
    for _ in range(config.max_search_rounds):
        if rot_step < config.min_rotation_step_deg:
            break
        trials = [
            Pose(pose.rotation @ rotation_about_axis(a, s * rot_step), pose.translation, 0.0) for a in axes for s in (1, -1)
        ]
        trials += [Pose(pose.rotation, pose.translation + s * shift_step * a, 0.0) for a in axes for s in (1, -1)]
        scores = scorer(np.stack([t.matrix(c_fix, c_mov) for t in trials]))
        best = int(np.argmax(scores))
        if scores[best] > pose.score:
            pose = Pose(trials[best].rotation, trials[best].translation, float(scores[best]))
        else:
            rot_step, shift_step = rot_step / 2.0, shift_step / 2.0
    return pose


def search_poses(
    fixed: Image, moving: Image, centre_fixed: np.ndarray, centre_moving: np.ndarray, config: PoseSearchConfig, stage=None
) -> list[Pose]:
    """The best ``config.keep`` distinct starting poses, best first (see the module docstring).

    ``fixed`` and ``moving`` already in [0, 1] (:func:`~.refine.unit_intensities`)."""
    c_fix, c_mov = np.asarray(centre_fixed, dtype=np.float64), np.asarray(centre_moving, dtype=np.float64)
    mask = dict(foreground_fraction=config.foreground_fraction, foreground_margin_mm=config.foreground_margin_mm)
    coarse = Scorer(fixed, moving, c_fix, config.spacing_mm, config.histogram_bins, config.max_field_of_view_mm, **mask)
    rotations = candidate_rotations(config.candidates, config.corner_offset_deg)
    starts = [Pose(r, np.zeros(3), 0.0) for r in rotations]
    scores = coarse(np.stack([p.matrix(c_fix, c_mov) for p in starts]))
    if stage is not None:
        stage.update(message=f"{len(starts)} rotations scored")
    order = np.argsort(-scores, kind="stable")
    seeds = [Pose(starts[i].rotation, starts[i].translation, float(scores[i])) for i in order[: config.polish]]
    fine = Scorer(fixed, moving, c_fix, config.polish_spacing_mm, config.histogram_bins, config.max_field_of_view_mm, **mask)
    polished = []
    for seed in seeds:
        start = Pose(seed.rotation, seed.translation, float(fine(seed.matrix(c_fix, c_mov)[None])[0]))
        polished.append(_pattern_search(fine, start, c_fix, c_mov, config))
        if stage is not None:
            stage.update(message=f"start {len(polished)}/{len(seeds)}: NMI {polished[-1].score:.3f}")
    polished.sort(key=lambda p: -p.score)
    kept: list[Pose] = []
    for pose in polished:  # distinct starts only: two seeds often climb to the same pose
        if all(rotation_angle_deg(pose.rotation, k.rotation) > config.distinct_deg for k in kept):
            kept.append(pose)
        if len(kept) == config.keep:
            break
    return kept
