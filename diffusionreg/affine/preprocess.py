"""Placing images on network grids with the geometry recorded exactly.

A network grid is a box of ``cfg.grid_shape`` voxels of ``cfg.grid_spacing`` mm (a cube for
every MRI model; per-axis for OCT) with identity LPS direction (array axes i, j, k = L, P, S),
centred on a chosen world point. Both the fixed and moving images go onto such grids, so every
brain appears in one canonical orientation and the network only has to explain the residual
affine. The returned Grid's matrix is the exact voxel -> LPS map of the tensor the network sees.
:func:`network_grid` is the one place that builds it from the config, for training and
inference alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from diffusionreg.image import Grid, Image, centred_grid, resample

from .clahe import clahe
from .config import AffineConfig


@dataclass
class NetworkInput:
    array: np.ndarray  # grid.shape float32 in [-1, 1], background -1
    grid: Grid  # exact voxel -> LPS matrix of ``array``
    intensity: tuple[float, float]  # (lo, hi) raw values mapped to -1 and +1


def intensity_window(array: np.ndarray, percentile: float) -> tuple[float, float]:
    """(min, upper percentile) of the finite voxels (subsampled for speed)."""
    sub = array[::2, ::2, ::2] if array.size > 2_000_000 else array
    sub = sub[np.isfinite(sub)]
    lo = float(sub.min()) if sub.size else 0.0
    hi = float(np.percentile(sub, percentile)) if sub.size else 1.0
    if hi <= lo:
        hi = float(sub.max()) if sub.size and sub.max() > lo else lo + 1.0
    return lo, hi


#: Modalities whose network input goes through the Gabor filter bank (gabor.py), in training and
#: at inference alike; every other modality is not filtered.
GABOR_MODALITIES = ("oct", "octa")
#: Modalities whose volumes are contrast-equalised (clahe.py) before the network grid, in training
#: and at inference alike (spec: venous MRI).
CLAHE_MODALITIES = ("venous",)


def network_filter(modality: str | None) -> str:
    """The network's input filter for ``modality``: its name for OCT/OCTA, else 'none'."""
    return modality if modality in GABOR_MODALITIES else "none"


def network_window(array: np.ndarray, cfg: AffineConfig, modality: str | None) -> tuple[float, float]:
    """Intensity window mapped to [-1, 1] for ``modality``, the same in training and inference.

    OCT/OCTA: the finite minimum and maximum. The Gabor thresholds (gabor.py) are defined on
    min-max-normalised volumes; clipping at a percentile would stretch the intensities and so
    shift every threshold. Other modalities: (min, ``cfg.intensity_percentile``-th percentile).
    """
    if modality in GABOR_MODALITIES:
        finite = np.asarray(array)[np.isfinite(array)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return (lo, hi) if hi > lo else (lo, lo + 1.0)
    return intensity_window(np.asarray(array), cfg.intensity_percentile)


def normalise(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map [lo, hi] to [-1, 1] (clipped), float32."""
    lo, hi = window
    out = (np.asarray(array, dtype=np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0) * 2.0 - 1.0


def antialias(array: np.ndarray, spacing: np.ndarray, target_mm) -> np.ndarray:
    """Gaussian pre-filter so that sampling at ``target_mm`` (a number, or one per array axis of
    ``array``) does not alias: sigma_mm = sqrt(max(target^2 - spacing^2, 0)) / 2.355 per axis."""
    sigma_mm = np.sqrt(np.maximum(target_mm**2 - np.asarray(spacing) ** 2, 0.0)) / 2.355
    sigma_vox = sigma_mm / np.asarray(spacing)
    if np.all(sigma_vox < 0.2):
        return array
    return ndimage.gaussian_filter(array, sigma_vox, mode="nearest", truncate=3.0)


def foreground_centroid(image: Image, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensity-weighted centroid (LPS mm) of voxels above 10 % of the window: the
    'moments' initialisation (first moment only, like ITK's MOMENTS initializer)."""
    arr = np.asarray(image.array, dtype=np.float32)
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / 3))))
    sub = arr[::step, ::step, ::step]
    lo, hi = window or intensity_window(arr, 99.8)
    w = np.clip((sub - lo) / (hi - lo), 0, 1)
    w = np.where(w > 0.1, w, 0.0)
    total = w.sum()
    if total <= 0:
        return image.grid.centre_world()
    idx = [np.arange(0, n, step, dtype=np.float64)[: sub.shape[a]] for a, n in enumerate(arr.shape)]
    c = np.array([(w.sum(axis=tuple(b for b in range(3) if b != a)) * idx[a]).sum() / total for a in range(3)])
    return image.affine[:3, :3] @ c + image.affine[:3, 3]


def network_grid(cfg: AffineConfig, centre_world, direction: np.ndarray | None = None, oversample: int = 1) -> Grid:
    """The network grid of ``cfg`` (``grid_shape`` voxels of ``grid_spacing`` mm) centred at
    ``centre_world`` (LPS); identity direction unless ``direction`` (3x3 rotation, columns = LPS
    axes) turns it (a pose-search start). ``oversample`` n: the same field of view with n times
    the voxels per axis (training keeps its volumes at 2x and samples them onto the grid)."""
    shape = tuple(n * oversample for n in cfg.grid_shape)
    spacing = np.asarray(cfg.grid_spacing, dtype=np.float64) / oversample
    return centred_grid(shape, spacing, np.asarray(centre_world, dtype=np.float64), direction)


def sampling_spacing(image: Image, cfg: AffineConfig, direction: np.ndarray) -> np.ndarray | float:
    """Spacing (mm) at which the network grid of ``cfg`` turned by ``direction`` (its 3x3 axes)
    samples ``image``, along each of the image's array axes: the anti-aliasing target (the
    network's spacing also for training's oversampled grid, which is sampled onto it later). An
    isotropic grid samples every direction at its spacing (returned as that number, so cubic
    models filter exactly as before); a per-axis grid samples direction u at
    sqrt(sum_b (u . g_b)^2 s_b^2) (g_b, s_b: the grid's axes and spacings), s_b along g_b."""
    if len(set(cfg.grid_spacing)) == 1:
        return cfg.grid_spacing[0]
    along = np.asarray(direction, dtype=np.float64).T @ image.grid.direction  # [b, a] = g_b . u_a
    return np.sqrt(((along * np.asarray(cfg.grid_spacing)[:, None]) ** 2).sum(axis=0))


def to_network(
    image: Image, grid: Grid, cfg: AffineConfig, window: tuple[float, float] | None = None, modality: str | None = None
) -> NetworkInput:
    """Normalise, anti-alias for the network's spacing (:func:`sampling_spacing`) and resample onto
    ``grid`` (linear, background -1 outside the image). Venous MRI is contrast-equalised (CLAHE)
    on its own voxel grid after the normalisation and before the resampling, as the spec does
    before padding."""
    window = window or network_window(image.array, cfg, modality)
    arr = normalise(image.array, window)
    if modality in CLAHE_MODALITIES:
        kernel = tuple(max(1, int(round(cfg.clahe_kernel_mm / s))) for s in image.spacing)
        arr = clahe((arr + 1.0) / 2.0, kernel, cfg.clahe_clip) * 2.0 - 1.0
    arr = antialias(arr, image.spacing, sampling_spacing(image, cfg, grid.direction))
    out = resample(Image(arr, image.affine), grid, interpolation="linear", default=-1.0)
    return NetworkInput(out.array.astype(np.float32), grid, window)
