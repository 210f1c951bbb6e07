"""Images that know where they are: a voxel array plus its voxel-to-world matrix.

``Image.array`` is indexed ``[i, j, k]`` (with an optional trailing component axis for vector
images such as displacement fields); ``Image.affine`` maps ``(i, j, k, 1)`` to **LPS mm**
(see :mod:`diffusionreg.spaces`). Every operation that changes the grid (resample, crop, pad,
fit to a network grid) returns a new image whose matrix is exact, so the voxel map of any
preprocessing is always recoverable as ``inv(result.affine) @ source.affine``.

Files are read and written with SimpleITK (NIfTI, NRRD, MHA, DICOM series), which already
works in LPS; nibabel is used only in tests as an independent reader.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffusionreg.errors import InputError
from diffusionreg.image_files import check_image_file
from diffusionreg.io_atomic import atomic_output
from diffusionreg.itk_errors import call_itk
from diffusionreg.spaces import affine_from_itk, apply_affine, itk_geometry

Interpolation = Literal["linear", "nearest", "bspline"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
# Single-file formats only: a detached header (.nhdr, .mhd) names its data file, which a
# temporary-name-then-rename write would break.
OUTPUT_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

_GZIP_CHECK_CHUNK = 1 << 24

# Points per resampling chunk: bounds the temporary coordinate arrays (3 x float64 each).
_RESAMPLE_CHUNK_POINTS = 2_000_000


@dataclass(frozen=True)
class Grid:
    """A sampling grid: spatial shape ``(n_i, n_j, n_k)`` and voxel-to-LPS matrix."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit LPS directions of the i, j, k axes."""
        return self.affine[:3, :3] / self.spacing

    def voxel_centres_world(self) -> np.ndarray:
        """LPS coordinates of every voxel centre, shape ``(*shape, 3)``."""
        index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in self.shape], indexing="ij"), -1)
        return apply_affine(self.affine, index)

    def centre_world(self) -> np.ndarray:
        """LPS coordinates of the grid centre (mm)."""
        return apply_affine(self.affine, (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0)

    def same_as(self, other: Grid, tolerance_mm: float = 1e-4) -> bool:
        """True when both grids have the same shape and place every voxel within tolerance."""
        if self.shape != other.shape:
            return False
        corners = np.array([[0, 0, 0], [s - 1 for s in self.shape]], dtype=np.float64)
        delta = apply_affine(self.affine, corners) - apply_affine(other.affine, corners)
        linear = np.abs(self.affine[:3, :3] - other.affine[:3, :3]).max()
        return bool(np.abs(delta).max() <= tolerance_mm and linear <= tolerance_mm)


@dataclass
class Image:
    """A voxel array ``[i, j, k(, c)]`` with its voxel-to-LPS matrix (mm)."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (3, 4):
            raise ValueError(f"image array must be 3D (or 3D + components), got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(n_i, n_j, n_k)``."""
        return tuple(int(s) for s in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def components(self) -> int:
        """Number of components per voxel (1 for scalar images)."""
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def grid(self) -> Grid:
        return Grid(self.shape, self.affine)

    @property
    def spacing(self) -> np.ndarray:
        return self.grid.spacing

    def with_array(self, array: np.ndarray) -> Image:
        """Same geometry, new voxels (the spatial shape must match)."""
        if tuple(array.shape[:3]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.shape}")
        return Image(array, self.affine.copy())

    # --- SimpleITK bridge -------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Image:
        """Convert a 3D SimpleITK image (scalar or vector) keeping its exact geometry."""
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
        array = sitk.GetArrayFromImage(image)  # [k, j, i(, c)]
        array = (
            np.ascontiguousarray(np.swapaxes(array, 0, 2))
            if array.ndim == 3
            else np.ascontiguousarray(array.transpose(2, 1, 0, 3))
        )
        affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        return cls(array, affine)

    def to_sitk(self) -> sitk.Image:
        """Convert to SimpleITK (vector image when there is a component axis)."""
        if self.array.ndim == 3:
            image = sitk.GetImageFromArray(np.swapaxes(self.array, 0, 2))
        else:
            image = sitk.GetImageFromArray(self.array.transpose(2, 1, 0, 3), isVector=True)
        origin, spacing, direction = itk_geometry(self.affine)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        return image


class PointMap(Protocol):
    """Anything that maps LPS points ``(N, 3)`` of the fixed space to the moving space."""

    def map_points(self, points: np.ndarray) -> np.ndarray: ...


# --- reading and writing ------------------------------------------------------------------
def read_image(
    path: str | os.PathLike,
    *,
    what: str = "image",
    allow_nan: bool = False,
    dtype: Any = None,
) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA, a single DICOM file or a DICOM series folder).

    Geometry, oblique direction cosines included, comes from SimpleITK in LPS; DICOM series go
    through :mod:`diffusionreg.dicom`, which places gantry-tilted and unevenly spaced slices exactly.
    ``what`` names the input in error messages ("fixed image", "moving labels", ...).
    Raises :class:`InputError` for a missing, empty, truncated, oversized
    (:data:`~diffusionreg.image_files.MAX_VOXEL_VALUES`) or unreadable file, a non-3D image, or
    NaN/infinite voxels in any format (unless ``allow_nan``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.name.lower().endswith(".gz"):
        _check_gzip(path, what)
    nonfinite = 0
    if path.is_dir():
        from diffusionreg.dicom import read_dicom_series

        # GDCM warns on stderr about the files it skips: captured with ITK's other chatter.
        result = call_itk(f"cannot read {what} {path}", read_dicom_series, path, what)
        file_format = "DICOM"
    else:
        if path.stat().st_size == 0:
            raise InputError(f"cannot read {what} {path}: the file is empty")
        check = check_image_file(path, what)
        result, file_format, nonfinite = _read_file(path, what), check.header.format, check.nonfinite
    if dtype is not None:
        result.array = result.array.astype(dtype, copy=False)
    if not allow_nan:
        if np.issubdtype(result.array.dtype, np.floating):
            nonfinite += int(np.count_nonzero(~np.isfinite(result.array)))
        if nonfinite:
            raise InputError(
                f"{what} {path} has {nonfinite} NaN or infinite voxels ({file_format}); replace them with finite values first"
            )
    return result


def _read_file(path: Path, what: str) -> Image:
    image = call_itk(f"cannot read {what} {path}", sitk.ReadImage, str(path))
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{what} must be 3D, but {path} is {image.GetDimension()}D (size {image.GetSize()})")
    if image.GetNumberOfComponentsPerPixel() == 1 and min(image.GetSize()) == 1:
        raise InputError(f"{what} must be 3D, but {path} is a single slice (size {image.GetSize()})")
    return Image.from_sitk(image)


def _check_gzip(path: Path, what: str) -> None:
    """Decompress a ``.gz`` file fully: SimpleITK reads a truncated gzip without complaint."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_GZIP_CHECK_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {what} {path}: corrupted gzip ({' '.join(str(error).split())})") from None


def write_image(image: Image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write atomically (temporary name, then rename); the format follows the extension."""
    path = Path(path)
    if not path.name.lower().endswith(OUTPUT_IMAGE_SUFFIXES):
        raise ValueError(f"unsupported image extension for {path}; use one of {', '.join(OUTPUT_IMAGE_SUFFIXES)}")
    with atomic_output(path) as temporary:
        sitk.WriteImage(image.to_sitk(), str(temporary), compress)
    return path


# --- resampling ----------------------------------------------------------------------------
def resample(
    image: Image,
    reference: Grid | Image,
    transform: PointMap | np.ndarray | Sequence[PointMap | np.ndarray] | None = None,
    interpolation: Interpolation = "linear",
    default: float = 0.0,
    dtype: Any = None,
) -> Image:
    """Resample ``image`` onto ``reference`` through ``transform`` (ITK resampling convention).

    Each output voxel centre ``x`` (LPS) takes ``image(T(x))`` where ``T`` maps reference
    (fixed) points to ``image`` (moving) points. ``transform`` may be None (identity), a 4x4
    LPS matrix, an object with ``map_points``, or a sequence ``[T1, ..., Tn]`` composed as
    ``T1 ∘ ... ∘ Tn`` (a point goes through ``Tn`` first, as in ITK's CompositeTransform).

    Points outside the moving image (beyond half a voxel past the outer centres) get
    ``default``; inside that half voxel, linear interpolation clamps to the edge, as ITK does.
    Interpolation: ``linear`` (trilinear), ``nearest`` (round half up, as ITK), ``bspline``
    (cubic B-spline with mirror boundary, as ITK's BSplineInterpolateImageFunction).
    """
    grid = reference.grid if isinstance(reference, Image) else reference
    mapping = _as_transform(transform)
    world_to_index = np.linalg.inv(image.affine)
    out_dtype = dtype if dtype is not None else (image.array.dtype if interpolation == "nearest" else np.float32)
    components = image.components
    output = np.empty(grid.shape + ((components,) if image.array.ndim == 4 else ()), dtype=out_dtype)
    flat_out = output.reshape(-1, components)
    source_channels = [image.array] if image.array.ndim == 3 else [image.array[..., c] for c in range(components)]
    if interpolation == "bspline":
        source_channels = [ndimage.spline_filter(c.astype(np.float64), order=3, mode="mirror") for c in source_channels]
    elif interpolation == "linear":
        source_channels = [c if np.issubdtype(c.dtype, np.floating) else c.astype(np.float32) for c in source_channels]

    total = int(np.prod(grid.shape))
    upper = np.asarray(image.shape, dtype=np.float64) - 0.5
    for start in range(0, total, _RESAMPLE_CHUNK_POINTS):
        stop = min(start + _RESAMPLE_CHUNK_POINTS, total)
        if mapping is None:
            points = grid_points(grid, start, stop)
        else:
            points = mapping.map_voxel_centres(grid, start, stop)
        index = apply_affine(world_to_index, points)
        inside = np.all((index >= -0.5) & (index < upper), axis=1)
        for c, channel in enumerate(source_channels):
            values = np.full(stop - start, default, dtype=np.float64)
            if inside.any():
                values[inside] = _sample(channel, index[inside], interpolation)
            flat_out[start:stop, c] = (
                values.astype(out_dtype, copy=False)
                if np.issubdtype(np.dtype(out_dtype), np.floating)
                else np.rint(values).astype(out_dtype)
            )
    return Image(output, grid.affine.copy())


def _sample(channel: np.ndarray, index: np.ndarray, interpolation: Interpolation) -> np.ndarray:
    if interpolation == "nearest":
        nearest = np.floor(index + 0.5).astype(np.int64)
        for axis, size in enumerate(channel.shape):
            np.clip(nearest[:, axis], 0, size - 1, out=nearest[:, axis])
        return channel[nearest[:, 0], nearest[:, 1], nearest[:, 2]].astype(np.float64)
    if interpolation == "linear":
        return ndimage.map_coordinates(channel, index.T, order=1, mode="nearest", prefilter=False)
    if interpolation == "bspline":
        return ndimage.map_coordinates(channel, index.T, order=3, mode="mirror", prefilter=False)
    raise InputError(f"unknown interpolation {interpolation!r}; use linear, nearest or bspline")


def grid_points(grid: Grid, start: int = 0, stop: int | None = None) -> np.ndarray:
    """LPS coordinates ``(N, 3)`` of the grid's voxel centres ``start:stop`` in C order."""
    stop = int(np.prod(grid.shape)) if stop is None else stop
    voxel = np.stack(np.unravel_index(np.arange(start, stop), grid.shape), -1).astype(np.float64)
    return apply_affine(grid.affine, voxel)


def _as_transform(transform: Any):
    """Normalise the ``transform`` argument of :func:`resample` into one transform object."""
    if transform is None:
        return None
    # Imported here: transforms builds on this module.
    from diffusionreg.transforms import AffineTransform, compose

    if isinstance(transform, np.ndarray):
        return AffineTransform(transform)
    if isinstance(transform, (list, tuple)):
        return compose([_as_transform(t) for t in transform])
    if hasattr(transform, "map_voxel_centres"):
        return transform
    if hasattr(transform, "map_points"):
        return _PointMapAdapter(transform)
    raise TypeError(f"cannot use {type(transform).__name__} as a transform")


class _PointMapAdapter:
    """Gives any ``map_points`` object the grid interface :func:`resample` uses."""

    def __init__(self, point_map: PointMap) -> None:
        self._point_map = point_map

    def map_voxel_centres(self, grid: Grid, start: int, stop: int) -> np.ndarray:
        return self._point_map.map_points(grid_points(grid, start, stop))


# --- grids for networks and crops ----------------------------------------------------------
def centred_grid(
    shape: Sequence[int],
    spacing: float | Sequence[float],
    centre_world: Sequence[float],
    direction: np.ndarray | None = None,
) -> Grid:
    """A grid of ``shape`` voxels of ``spacing`` mm whose centre sits at ``centre_world`` (LPS).

    ``direction`` (3x3, columns = LPS unit axes) defaults to the identity. Used to place an
    image on a network grid: ``resample(image, centred_grid(...))`` records the voxel map
    exactly in the returned image's matrix.
    """
    shape = tuple(int(s) for s in shape)
    spacing_vector = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    linear = direction @ np.diag(spacing_vector)
    centre_index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    origin = np.asarray(centre_world, dtype=np.float64) - linear @ centre_index
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return Grid(shape, affine)


def nearest_axis_direction(direction: np.ndarray) -> np.ndarray:
    """The signed permutation matrix closest to ``direction`` (un-obliques an image's axes).

    Used to give a network grid the image's axis order and flips without its obliquity.
    """
    direction = np.asarray(direction, dtype=np.float64)
    result = np.zeros((3, 3))
    used: set[int] = set()
    for column in np.argsort(-np.abs(direction).max(axis=0)):
        order = np.argsort(-np.abs(direction[:, column]))
        row = next(int(r) for r in order if int(r) not in used)
        used.add(row)
        result[row, column] = np.sign(direction[row, column]) or 1.0
    return result


def resized_grid(grid: Grid, shape: Sequence[int]) -> Grid:
    """The grid covering the same box as ``grid`` (outer voxel faces kept) with ``shape`` voxels.

    This is the ``align_corners=False`` resize of ``torch.nn.functional.interpolate``: the new
    spacing is ``old_spacing * old_shape / new_shape`` and voxel centres shift accordingly.
    """
    shape = tuple(int(s) for s in shape)
    scale = np.asarray(grid.shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    # New voxel n sits at old continuous index (n + 0.5) * scale - 0.5.
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(scale)
    voxel_map[:3, 3] = 0.5 * scale - 0.5
    return Grid(shape, grid.affine @ voxel_map)


def resize(image: Image, shape: Sequence[int], interpolation: Interpolation = "linear") -> Image:
    """Resample ``image`` onto :func:`resized_grid` (same field of view, new shape), exactly placed."""
    return resample(image, resized_grid(image.grid, shape), None, interpolation)


def crop_or_pad(image: Image, start: Sequence[int], shape: Sequence[int], fill: float = 0.0) -> Image:
    """Take the box ``[start, start + shape)`` in voxels (negative or overflowing parts are padded).

    The returned matrix is shifted by ``start`` voxels, so the crop is recorded exactly.
    """
    start = np.asarray(start, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    output = np.full(shape + image.array.shape[3:], fill, dtype=image.array.dtype)
    source_lo = np.maximum(start, 0)
    source_hi = np.minimum(start + np.asarray(shape), np.asarray(image.shape))
    if np.all(source_hi > source_lo):
        dest_lo = source_lo - start
        dest_hi = dest_lo + (source_hi - source_lo)
        output[dest_lo[0] : dest_hi[0], dest_lo[1] : dest_hi[1], dest_lo[2] : dest_hi[2]] = image.array[
            source_lo[0] : source_hi[0], source_lo[1] : source_hi[1], source_lo[2] : source_hi[2]
        ]
    affine = image.affine.copy()
    affine[:3, 3] = apply_affine(image.affine, start.astype(np.float64))
    return Image(output, affine)


def as_probability(array: np.ndarray) -> np.ndarray:
    """A label map (integer values: > 0 is foreground) or a probability map (floats, clipped to
    [0, 1]) as float32 foreground probability. Soft maps stay soft: ``> 0`` would make every
    voxel of a decoded probability map foreground."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.integer) or np.array_equal(a, np.round(a)):
        return (a > 0).astype(np.float32)
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def require_same_grid(a: Image, b: Image, what_a: str, what_b: str, tolerance_mm: float = 1e-3) -> None:
    """Raise :class:`InputError` unless two images share one grid (e.g. an image and its labels)."""
    if not a.grid.same_as(b.grid, tolerance_mm):
        raise InputError(
            f"{what_a} and {what_b} are on different grids (shapes {a.shape} vs {b.shape}); resample one onto the other first"
        )


def check_registrable(image: Image, what: str) -> None:
    """Raise :class:`InputError` unless ``image`` can be registered: scalar, 3D with at least 2
    voxels per axis, finite, not constant, with an invertible voxel-to-world matrix.

    The one input check of every registration command (affine, deformable).
    """
    if image.components != 1:
        raise InputError(f"{what} must be a scalar image, it has {image.components} components per voxel")
    if min(image.shape) < 2:
        raise InputError(f"{what} must be 3D with at least 2 voxels per axis, got {image.shape}")
    if np.issubdtype(image.array.dtype, np.floating) and not np.all(np.isfinite(image.array)):
        raise InputError(f"{what} contains NaN or infinite values")
    if float(image.array.max()) <= float(image.array.min()):
        raise InputError(f"{what} is constant (every voxel {float(image.array.min()):g}): nothing to register")
    if abs(np.linalg.det(image.affine[:3, :3])) < 1e-12:
        raise InputError(f"{what} has a singular voxel-to-world matrix")
