"""Spatial transforms in ITK's resampling convention, and their files.

Every transform here maps a point of the **fixed** (reference) space to the corresponding point
of the **moving** space, in **LPS mm**: resampling the moving image onto the fixed grid reads
``moving(T(x))``. This is what ITK, SimpleITK, ANTs and Slicer's transform files store, so files
written here need no conversion anywhere.

Files:

* affine: ITK transform files ``.h5``, ``.tfm``, ``.txt`` (and ANTs ``.mat`` on reading);
* dense: ITK displacement-field images (3-component vector ``.nii.gz``, ``.nrrd``, ``.mha``,
  displacements in LPS mm on the fixed grid) or an ITK ``.h5`` DisplacementFieldTransform.

A list ``[T1, ..., Tn]`` composes as ``T1 ∘ ... ∘ Tn``: a fixed point goes through ``Tn``
first (ITK CompositeTransform and ``antsApplyTransforms -t T1 -t T2`` order).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffusionreg.errors import InputError
from diffusionreg.image import IMAGE_SUFFIXES, Grid, Image, grid_points, read_image, write_image
from diffusionreg.io_atomic import atomic_output
from diffusionreg.itk_errors import call_itk
from diffusionreg.spaces import apply_affine

AFFINE_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


@dataclass
class AffineTransform:
    """``p_moving = A p_fixed + b`` as a 4x4 LPS matrix (fixed -> moving, mm)."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        if self.matrix.shape == (3, 4):
            self.matrix = np.vstack([self.matrix, [0.0, 0.0, 0.0, 1.0]])
        if self.matrix.shape != (4, 4):
            raise ValueError(f"an affine transform needs a 4x4 matrix, got {self.matrix.shape}")

    def map_points(self, points: np.ndarray) -> np.ndarray:
        return apply_affine(self.matrix, points)

    def map_voxel_centres(self, grid: Grid, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``map_points`` of the grid's voxel centres ``start:stop`` (C order)."""
        return self.map_points(grid_points(grid, start, stop))

    def inverse(self) -> AffineTransform:
        return AffineTransform(np.linalg.inv(self.matrix))


@dataclass
class DisplacementFieldTransform:
    """``p_moving = p + u(p)``, ``u`` a vector image on the fixed grid (LPS mm).

    ``field.array`` has shape ``(n_i, n_j, n_k, 3)``. Between voxel centres ``u`` is trilinear;
    outside the field's grid (beyond half a voxel) ``u`` is zero, as in ITK.
    """

    field: Image

    def __post_init__(self) -> None:
        if self.field.array.ndim != 4 or self.field.array.shape[3] != 3:
            raise ValueError(f"a displacement field needs 3 components per voxel, got array {self.field.array.shape}")

    @property
    def grid(self) -> Grid:
        return self.field.grid

    def displacement_at(self, points: np.ndarray) -> np.ndarray:
        """Trilinear displacement (mm) at LPS points ``(N, 3)``; zero outside the field."""
        points = np.asarray(points, dtype=np.float64)
        index = apply_affine(np.linalg.inv(self.field.affine), points)
        upper = np.asarray(self.field.shape, dtype=np.float64) - 0.5
        inside = np.all((index >= -0.5) & (index < upper), axis=1)
        result = np.zeros_like(points)
        if inside.any():
            coordinates = index[inside].T
            for c in range(3):
                result[inside, c] = ndimage.map_coordinates(
                    self.field.array[..., c].astype(np.float64, copy=False), coordinates, order=1, mode="nearest"
                )
        return result

    def map_points(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return points + self.displacement_at(points)

    def map_voxel_centres(self, grid: Grid, start: int = 0, stop: int | None = None) -> np.ndarray:
        """On the field's own grid the displacement is read, not interpolated (exact and fast)."""
        points = grid_points(grid, start, stop)
        if grid.same_as(self.field.grid, tolerance_mm=1e-6):
            return points + self.field.array.reshape(-1, 3)[start:stop]
        return points + self.displacement_at(points)


@dataclass
class CompositeTransform:
    """``T1 ∘ ... ∘ Tn``: ``transforms[-1]`` is applied to a point first."""

    transforms: list = field(default_factory=list)

    def map_points(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        for transform in reversed(self.transforms):
            points = transform.map_points(points)
        return points

    def map_voxel_centres(self, grid: Grid, start: int = 0, stop: int | None = None) -> np.ndarray:
        points = self.transforms[-1].map_voxel_centres(grid, start, stop)
        for transform in reversed(self.transforms[:-1]):
            points = transform.map_points(points)
        return points


Transform = AffineTransform | DisplacementFieldTransform | CompositeTransform


# --- composition ---------------------------------------------------------------------------
def compose(transforms: Sequence[Transform]) -> Transform:
    """Compose ``[T1, ..., Tn]`` into ``T1 ∘ ... ∘ Tn``.

    All-affine chains collapse into one matrix; anything else stays a composite (sample it
    with :func:`to_displacement_field` to get a single dense field).
    """
    flat: list[Transform] = []
    for transform in transforms:
        flat.extend(transform.transforms if isinstance(transform, CompositeTransform) else [transform])
    if not flat:
        return AffineTransform(np.eye(4))
    if all(isinstance(t, AffineTransform) for t in flat):
        matrix = np.eye(4)
        for transform in flat:
            matrix = matrix @ transform.matrix
        return AffineTransform(matrix)
    return flat[0] if len(flat) == 1 else CompositeTransform(flat)


def to_displacement_field(transform: Transform, grid: Grid, dtype=np.float64) -> DisplacementFieldTransform:
    """Sample any transform as a displacement field ``u(x) = T(x) - x`` on ``grid`` (LPS mm)."""
    displacement = transform.map_voxel_centres(grid) - grid_points(grid)
    return DisplacementFieldTransform(Image(displacement.reshape(grid.shape + (3,)).astype(dtype), grid.affine.copy()))


# --- files ---------------------------------------------------------------------------------
def _lower_name(path: Path) -> str:
    return path.name.lower()


def _is_image_file(path: Path) -> bool:
    return any(_lower_name(path).endswith(s) for s in IMAGE_SUFFIXES)


def read_transform(path: str | os.PathLike) -> Transform:
    """Read an ITK transform file (affine or displacement field) or a displacement-field image."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"transform not found: {path}")
    if _is_image_file(path):
        field_image = read_image(path, what="displacement field")
        if field_image.components != 3:
            raise InputError(f"displacement field {path} must have 3 components per voxel, it has {field_image.components}")
        return DisplacementFieldTransform(field_image)
    if not any(_lower_name(path).endswith(s) for s in AFFINE_SUFFIXES):
        raise InputError(f"unsupported transform file {path}; use .h5, .tfm, .txt, .mat or a displacement-field image")
    if path.stat().st_size == 0:
        raise InputError(f"cannot read transform {path}: the file is empty")
    # HDF5 prints its error stack on fd 2: call_itk captures it and takes the reason from it.
    itk_transform = call_itk(f"cannot read transform {path}", sitk.ReadTransform, str(path))
    return from_sitk_transform(itk_transform)


def from_sitk_transform(itk_transform: sitk.Transform) -> Transform:
    """Convert a SimpleITK transform (any matrix-offset kind, displacement field, composite)."""
    if itk_transform.GetDimension() != 3:
        raise InputError(f"expected a 3D transform, got a {itk_transform.GetDimension()}D one")
    name = itk_transform.GetName()
    if name == "CompositeTransform":
        composite = sitk.CompositeTransform(itk_transform)
        parts = [from_sitk_transform(composite.GetNthTransform(n)) for n in range(composite.GetNumberOfTransforms())]
        # ITK applies the last-added transform first, which is our list order too.
        return compose(parts)
    if name == "DisplacementFieldTransform":
        displacement = sitk.DisplacementFieldTransform(itk_transform)
        return DisplacementFieldTransform(Image.from_sitk(displacement.GetDisplacementField()))
    if name == "TranslationTransform":
        offset = np.asarray(sitk.TranslationTransform(itk_transform).GetOffset())
        matrix = np.eye(4)
        matrix[:3, 3] = offset
        return AffineTransform(matrix)
    if name == "IdentityTransform":
        return AffineTransform(np.eye(4))
    typed = itk_transform.Downcast() if hasattr(itk_transform, "Downcast") else itk_transform
    # Every MatrixOffsetTransformBase kind (Euler, Versor, Similarity, ScaleSkew, Affine)
    # exposes matrix, centre and translation: T(x) = A (x - c) + c + t.
    if not all(hasattr(typed, attribute) for attribute in ("GetMatrix", "GetCenter", "GetTranslation")):
        raise InputError(f"unsupported transform kind {name}")
    linear = np.asarray(typed.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.asarray(typed.GetCenter(), dtype=np.float64)
    translation = np.asarray(typed.GetTranslation(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + translation - linear @ centre
    return AffineTransform(matrix)


def to_sitk_transform(transform: Transform) -> sitk.Transform:
    """Convert to SimpleITK, for writing or for resampling with SimpleITK."""
    if isinstance(transform, AffineTransform):
        itk_affine = sitk.AffineTransform(3)
        itk_affine.SetMatrix(transform.matrix[:3, :3].ravel().tolist())
        itk_affine.SetTranslation(transform.matrix[:3, 3].tolist())
        itk_affine.SetCenter((0.0, 0.0, 0.0))
        return itk_affine
    if isinstance(transform, DisplacementFieldTransform):
        vector = Image(transform.field.array.astype(np.float64), transform.field.affine).to_sitk()
        return sitk.DisplacementFieldTransform(sitk.Cast(vector, sitk.sitkVectorFloat64))
    if isinstance(transform, CompositeTransform):
        composite = sitk.CompositeTransform(3)
        for part in transform.transforms:
            composite.AddTransform(to_sitk_transform(part))
        return composite
    raise TypeError(f"cannot convert {type(transform).__name__}")


def write_transform(transform: Transform, path: str | os.PathLike) -> Path:
    """Write atomically: affines to ITK files, fields to vector images or ITK ``.h5``."""
    path = Path(path)
    if isinstance(transform, DisplacementFieldTransform) and _is_image_file(path):
        return write_image(Image(transform.field.array.astype(np.float32), transform.field.affine), path)
    if not any(_lower_name(path).endswith(s) for s in AFFINE_SUFFIXES):
        raise ValueError(f"unsupported transform extension for {path}; use .h5, .tfm or .txt (or .nii.gz/.nrrd/.mha for a field)")
    if isinstance(transform, CompositeTransform) and not _lower_name(path).endswith((".h5", ".hdf5")):
        raise ValueError(f"a composite transform can only be written to .h5, not {path.name}")
    with atomic_output(path) as temporary:
        sitk.WriteTransform(to_sitk_transform(transform), str(temporary))
    return path


def read_transforms(paths: Sequence[str | os.PathLike]) -> Transform:
    """Read several transform files and compose them in the documented order."""
    return compose([read_transform(p) for p in paths])
