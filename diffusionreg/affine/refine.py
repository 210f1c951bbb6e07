"""Test-time refinement of an affine transform by intensity optimisation (optional stage).

The spatial-diffusion network works on a coarse grid (3.5 mm in the compact model), so its final
matrix is accurate to a fraction of that grid. This stage polishes it the way instance
optimisation polishes a deformable network's output: a few Adam steps per resolution level on the
12 affine parameters, maximising the mutual information (default; Parzen-window joint histogram,
so it works across modalities and between skull-stripped and whole-head images) or the normalised
cross-correlation between the fixed image and the moving image warped through the transform, on
grids in world space. The default (6 mm then 3 mm, 50 steps each, every 2nd voxel per axis) was
chosen on the benchmark pairs; see ``bench/results/affine.md``. The transform stays an exact
LPS fixed->moving matrix throughout (``T = T0 ∘ C``, with ``C`` a correction about the fixed
foreground centre), so nothing of the geometry contract changes.

With no levels (``--refine-iterations 0`` on the command line) the method runs exactly as
published.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffusionreg.image import Grid, Image, centred_grid, resample
from diffusionreg.spaces import apply_affine, sample_affine, space_of_grid
from diffusionreg.transforms import AffineTransform

from .config import RefineConfig, RefineLevel  # noqa: F401 - the settings live with the model config


@dataclass
class RefineResult:
    transform: AffineTransform
    score_before: float  # similarity (MI or NCC, higher is better) of the start
    score_after: float
    history: list[float] = field(default_factory=list)


def unit_intensities(image: Image) -> Image:
    """The image with its 0.5-99.5 percentile range mapped to [0, 1] (clipped), float32."""
    array = image.array.astype(np.float32)
    low, high = np.percentile(array[::2, ::2, ::2], [0.5, 99.5])
    return image.with_array(np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0))


def _ncc(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted Pearson correlation of two volumes (1 = identical up to gain and offset)."""
    total = weight.sum().clamp_min(1.0)
    mean_a = (a * weight).sum() / total
    mean_b = (b * weight).sum() / total
    da, db = (a - mean_a) * weight, (b - mean_b) * weight
    return (da * db).sum() / torch.sqrt((da * da).sum() * (db * db).sum()).clamp_min(1e-12)


def mutual_information(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, bins: int) -> torch.Tensor:
    """Mutual information (nats) of two volumes in [0, 1] over the voxels with ``weight > 0``.

    Gaussian Parzen windows of one bin width on ``bins`` centres make the joint histogram, and so
    the value, differentiable in the moving intensities (Mattes et al. use cubic B-splines).
    """
    keep = weight > 0
    a, b = a[keep], b[keep]
    centres = torch.linspace(0.0, 1.0, bins, dtype=a.dtype, device=a.device)
    width = 1.0 / (bins - 1)

    def soft(values: torch.Tensor) -> torch.Tensor:
        p = torch.exp(-0.5 * ((values[:, None] - centres[None]) / width) ** 2)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)

    joint = soft(a).T @ soft(b) / max(a.numel(), 1)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return (joint * (torch.log(joint.clamp_min(1e-12)) - torch.log((pa @ pb).clamp_min(1e-12)))).sum()


def _coarsest(spacing) -> float:
    """The largest spacing (mm) of a level's number or per-axis spacing."""
    return float(np.max(spacing))


def _level_shape(fixed: Image, spacing, field_of_view: float, max_field_of_view_mm: float) -> tuple[int, int, int]:
    """Voxels of a level's grid: a cube of side ``field_of_view`` (the fixed image's largest
    extent, capped) for an isotropic spacing; per LPS axis the fixed image's extent along that
    axis (bounding box of its field of view, capped) for a per-axis spacing, so that a thin scan
    (OCT: ~2 mm deep, ~6 mm wide) is not sampled over a cube of its width."""
    if np.ndim(spacing) == 0:
        size = int(np.ceil(field_of_view / spacing))
        return (size, size, size)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in fixed.shape], indexing="ij")).reshape(3, -1).T
    box = apply_affine(fixed.affine, corners)  # the corners of the outer voxels' faces
    extent = np.minimum(box.max(0) - box.min(0), max_field_of_view_mm)
    return tuple(int(np.ceil(e / s)) for e, s in zip(extent, spacing))  # type: ignore[return-value]


def refine_affine(
    fixed: Image,
    moving: Image,
    initial: AffineTransform,
    centre_world: np.ndarray,
    config: RefineConfig = RefineConfig(),
    device: torch.device | str = "cpu",
) -> RefineResult:
    """Polish ``initial`` (fixed -> moving, LPS) by maximising the similarity; returns the refined transform.

    ``centre_world`` (LPS mm) is the pivot of the correction, normally the fixed foreground
    centroid. If the refinement would lower the similarity it returns ``initial`` unchanged.
    """
    device = torch.device(device)
    dtype = torch.float32
    fixed_n, moving_n = unit_intensities(fixed), unit_intensities(moving)
    pivot = np.asarray(centre_world, dtype=np.float64)
    # Correction parameters: C(x) = pivot + (I + L)(x - pivot) + t, L and t in scaled units.
    linear = torch.zeros(3, 3, dtype=torch.float64, device=device, requires_grad=True)
    shift = torch.zeros(3, dtype=torch.float64, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([linear, shift], lr=config.learning_rate)
    initial_matrix = torch.as_tensor(initial.matrix, dtype=torch.float64, device=device)
    pivot_t = torch.as_tensor(pivot, dtype=torch.float64, device=device)

    def correction() -> torch.Tensor:
        bounded = config.max_linear_change * torch.tanh(linear / config.max_linear_change)
        matrix = torch.eye(4, dtype=torch.float64, device=device)
        matrix[:3, :3] = matrix[:3, :3] + bounded
        matrix[:3, 3] = pivot_t - (torch.eye(3, dtype=torch.float64, device=device) + bounded) @ pivot_t + shift * config.scale_mm
        return matrix

    history: list[float] = []
    first_score = last_score = None
    start_score = 0.0
    extent = float(np.max(np.asarray(fixed.shape) * fixed.spacing))
    field_of_view = min(extent, config.max_field_of_view_mm)
    for level in config.levels:
        shape = _level_shape(fixed, level.spacing_mm, field_of_view, config.max_field_of_view_mm)
        grid_f = centred_grid(shape, level.spacing_mm, pivot)
        fixed_t = torch.from_numpy(resample(fixed_n, grid_f, None, "linear", default=0.0).array).to(device, dtype)
        stride = max(1, int(config.sampling_stride))
        if stride > 1:  # the image is still resampled at the level's spacing, then subsampled
            fixed_t = fixed_t[::stride, ::stride, ::stride].contiguous()
            grid_f = Grid(tuple(fixed_t.shape), grid_f.affine @ np.diag([stride, stride, stride, 1.0]))
        if config.foreground_fraction is None:
            weight = torch.ones_like(fixed_t)
        else:
            weight = (fixed_t > config.foreground_fraction).to(dtype)
        # The moving image on a grid of the same spacing around its own content, pre-smoothed by
        # the resampling itself; sampled through the current transform at each step.
        moving_centre = initial.map_points(pivot[None])[0]
        grid_m = centred_grid(shape, level.spacing_mm, moving_centre)
        moving_t = torch.from_numpy(resample(moving_n, grid_m, None, "linear", default=0.0).array).to(device, dtype)
        space_f, space_m = space_of_grid(grid_f), space_of_grid(grid_m)  # LPS mm on each grid
        volume = moving_t[None, None]

        def score(corrected: bool = True) -> torch.Tensor:
            matrix = initial_matrix @ correction() if corrected else initial_matrix
            warped = sample_affine(volume, matrix[None], space_f, space_m, padding_mode="zeros")[0, 0]
            if config.metric == "mi":
                return mutual_information(fixed_t, warped, weight, config.histogram_bins)
            return _ncc(fixed_t, warped, weight)

        with torch.no_grad():
            start_score = float(score(corrected=False))  # the initial transform on this level
        first_score = start_score if first_score is None else first_score
        # Finer levels take proportionally finer steps; the cosine decay lets Adam settle.
        level_rate = config.learning_rate * _coarsest(level.spacing_mm) / _coarsest(config.levels[0].spacing_mm)
        for iteration in range(level.iterations):
            progress_fraction = iteration / max(level.iterations - 1, 1)
            decay = config.final_rate_fraction + (1.0 - config.final_rate_fraction) * 0.5 * (
                1.0 + np.cos(np.pi * progress_fraction)
            )
            for group in optimiser.param_groups:
                group["lr"] = level_rate * decay
            optimiser.zero_grad()
            loss = -score()
            loss.backward()
            optimiser.step()
            history.append(-float(loss.detach()))
        with torch.no_grad():
            last_score = float(score())
    with torch.no_grad():
        refined = (initial_matrix @ correction()).cpu().numpy()
    if last_score is None or last_score < start_score:  # compared on the finest level
        return RefineResult(initial, start_score, start_score, history)
    return RefineResult(AffineTransform(refined), first_score, last_score, history)
