"""DICOM series with exact geometry, including gantry tilt and uneven slice spacing.

ITK/SimpleITK stack slices on a uniform grid along the slice normal and warn "non uniform
sampling": with a gantry tilt (slice origins not moving along the normal) or slices of several
thicknesses, that grid puts voxels in the wrong place. Here every slice keeps its own
ImagePositionPatient. A regular, untilted series becomes an image with an exact matrix; any other
series is regularised (as Slicer's DICOM loader does) onto an orthonormal grid whose axes are the
row, column and normal directions, by linear interpolation between the two acquired slices that
bracket each output slice. All coordinates are LPS mm.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from diffusionreg.errors import InputError

# Positions agree when closer than this (mm): DICOM stores them as decimal strings.
POSITION_TOLERANCE_MM = 1e-3
# In-plane offsets this close to a whole pixel are rounding, not tilt.
SNAP_TOLERANCE_PIXELS = 1e-3
# Steps shorter than this fraction of the median are gaps between blocks, not a sampling rate.
TYPICAL_STEP_FRACTION = 0.5
# Relative spread of slice steps still called uniform.
STEP_RELATIVE_TOLERANCE = 1e-3


@dataclass
class Slice:
    """One acquired slice: pixels ``[i, j]`` (i along the row direction) and its placement."""

    pixels: np.ndarray
    position: np.ndarray  # ImagePositionPatient, LPS mm
    row: np.ndarray  # unit LPS direction of increasing i
    column: np.ndarray  # unit LPS direction of increasing j
    spacing: tuple[float, float]  # (along row, along column) mm


def read_slices(folder: Path, what: str) -> list[Slice]:
    """Read every slice of the first series in ``folder`` with its own geometry."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} is a folder with no DICOM series: {folder}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    slices = []
    for name in files:
        image = sitk.ReadImage(name)
        if image.GetDimension() == 3 and image.GetSize()[2] != 1:
            raise InputError(f"{what}: {name} is a multi-frame DICOM; give it as a single file instead")
        pixels = sitk.GetArrayFromImage(image).reshape(image.GetSize()[1], image.GetSize()[0]).T
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), image.GetDimension())
        slices.append(
            Slice(
                pixels=pixels,
                position=np.asarray(image.GetOrigin()[:3], dtype=np.float64),
                row=direction[:3, 0],
                column=direction[:3, 1],
                spacing=(float(image.GetSpacing()[0]), float(image.GetSpacing()[1])),
            )
        )
    reference = slices[0]
    for other in slices[1:]:
        if other.pixels.shape != reference.pixels.shape or not (
            np.allclose(other.row, reference.row, atol=1e-4) and np.allclose(other.column, reference.column, atol=1e-4)
        ):
            raise InputError(f"{what}: slices of {folder} differ in size or orientation; load one series at a time")
    return slices


def stack_slices(slices: list[Slice]):
    """Stack slices into an :class:`~diffusionreg.image.Image`, regularising tilt and uneven steps."""
    from diffusionreg.image import Image

    row, column = slices[0].row, slices[0].column
    normal = np.cross(row, column)
    slices = sorted(slices, key=lambda s: float(normal @ s.position))
    depth = np.array([normal @ s.position for s in slices])
    along_row = np.array([row @ (s.position - slices[0].position) for s in slices])
    along_column = np.array([column @ (s.position - slices[0].position) for s in slices])
    spacing_row, spacing_column = slices[0].spacing
    volume = np.stack([s.pixels for s in slices], axis=-1)

    if len(slices) == 1:
        step = 1.0
        steps = np.array([step])
    else:
        steps = np.diff(depth)
        if np.any(steps < POSITION_TOLERANCE_MM):
            raise InputError("DICOM series has two slices at the same position; it may hold several series")
        step = float(np.median(steps))
    uniform = np.all(np.abs(steps - step) <= STEP_RELATIVE_TOLERANCE * step)
    untilted = np.all(np.abs(along_row) < POSITION_TOLERANCE_MM) and np.all(np.abs(along_column) < POSITION_TOLERANCE_MM)
    if uniform and untilted:
        affine = np.eye(4)
        affine[:3, 0] = row * spacing_row
        affine[:3, 1] = column * spacing_column
        affine[:3, 2] = normal * step
        affine[:3, 3] = slices[0].position
        return Image(volume, affine)
    return _regularise(volume, depth, along_row, along_column, slices[0], normal)


def _regularise(
    volume: np.ndarray, depth: np.ndarray, along_row: np.ndarray, along_column: np.ndarray, first: Slice, normal: np.ndarray
):
    """Resample slices at arbitrary in-plane offsets and depths onto one orthonormal grid.

    The output step along the normal is the smallest typical acquired step (no resolution is lost);
    the in-plane extent grows to hold every slice. Voxels no slice covers take the minimum of
    the data (the scanner's outside-field value).
    """
    from diffusionreg.image import Image

    spacing_row, spacing_column = first.spacing
    steps = np.diff(depth)
    # The finest regular step: a lone short gap between two blocks of slices would otherwise
    # multiply the slice count without adding acquired detail.
    step = float(np.min(steps[steps >= TYPICAL_STEP_FRACTION * np.median(steps)]))
    count = int(round((depth[-1] - depth[0]) / step)) + 1
    step = (depth[-1] - depth[0]) / (count - 1)
    # In-plane offset of each slice, in pixels; decimal-string rounding is snapped away.
    shift_row = _snap(along_row / spacing_row)
    shift_column = _snap(along_column / spacing_column)
    low_row, low_column = np.floor(shift_row.min()), np.floor(shift_column.min())
    size_row = volume.shape[0] + int(np.ceil(shift_row.max() - low_row))
    size_column = volume.shape[1] + int(np.ceil(shift_column.max() - low_column))
    fill = float(volume.min())
    output = np.full((size_row, size_column, count), fill, dtype=np.float32)
    grid_i, grid_j = np.meshgrid(np.arange(size_row, dtype=np.float64), np.arange(size_column, dtype=np.float64), indexing="ij")

    def sample(index: int) -> np.ndarray:
        # Output pixel (i, j) sits at in-plane offset (low + i) pixels from slice 0's origin.
        coordinates = np.stack([grid_i + low_row - shift_row[index], grid_j + low_column - shift_column[index]])
        return ndimage.map_coordinates(volume[..., index].astype(np.float32), coordinates, order=1, mode="constant", cval=fill)

    for k in range(count):
        z = depth[0] + k * step
        upper = int(np.clip(np.searchsorted(depth, z - POSITION_TOLERANCE_MM), 0, len(depth) - 1))
        if abs(depth[upper] - z) <= POSITION_TOLERANCE_MM or upper == 0:
            output[..., k] = sample(upper)
            continue
        lower = upper - 1
        weight = (z - depth[lower]) / (depth[upper] - depth[lower])
        output[..., k] = (1.0 - weight) * sample(lower) + weight * sample(upper)

    affine = np.eye(4)
    affine[:3, 0] = first.row * spacing_row
    affine[:3, 1] = first.column * spacing_column
    affine[:3, 2] = normal * step
    affine[:3, 3] = first.position + low_row * spacing_row * first.row + low_column * spacing_column * first.column
    return Image(output, affine)


def _snap(shift: np.ndarray) -> np.ndarray:
    nearest = np.round(shift)
    return np.where(np.abs(shift - nearest) < SNAP_TOLERANCE_PIXELS, nearest, shift)


def read_dicom_series(folder: Path, what: str = "image"):
    """Read a DICOM series folder as one exactly placed 3D image (LPS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stack_slices(read_slices(folder, what))
