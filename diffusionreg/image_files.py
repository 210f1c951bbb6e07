"""What an image file's header promises, checked before the voxels are read.

ITK trusts headers more than we can: it allocates whatever size a header declares (a header of
10000^3 voxels asks the kernel for terabytes), reads a truncated uncompressed NIfTI with the
missing part as zeros, and its NIfTI reader turns NaN and infinite voxels into 0 (NRRD and
MetaImage keep them). So before reading, :func:`check_image_file`

* reads the header only and refuses more than :data:`MAX_VOXEL_VALUES` voxel values;
* compares the data length with what the header declares, for every uncompressed layout we
  read: ``.nii`` (and the decompressed ``.nii.gz``), ``.nrrd`` / ``.nhdr`` with attached or
  detached raw data, ``.mha`` / ``.mhd`` with local or detached raw data;
* counts the non-finite voxels of floating-point NIfTI files in the raw data, which
  :func:`diffusionreg.image.read_image` then refuses like NaNs in any other format.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from diffusionreg.errors import InputError
from diffusionreg.itk_errors import call_itk, shorter_than_header

#: Largest image accepted: voxels x components (1024^3; 4 GiB as float32). Larger volumes are
#: refused before any allocation; crop or downsample them first.
MAX_VOXEL_VALUES = 1024**3

# Bytes read per step when scanning raw data (bounded memory for any image size).
_SCAN_CHUNK_BYTES = 1 << 24
# Headers of NRRD and MetaImage files are text well below this size.
_TEXT_HEADER_LIMIT = 1 << 20

_FORMAT_NAMES = {"NiftiImageIO": "NIfTI", "NrrdImageIO": "NRRD", "MetaImageIO": "MetaImage", "GDCMImageIO": "DICOM"}


@dataclass(frozen=True)
class ImageHeader:
    """What a header declares: size (ITK order i, j, k[, t]), components, bytes per component."""

    size: tuple[int, ...]
    components: int
    component_bytes: int
    format: str  # NIfTI, NRRD, MetaImage, DICOM or the ITK ImageIO name

    @property
    def values(self) -> int:
        return int(np.prod(self.size, dtype=np.float64)) * self.components

    @property
    def data_bytes(self) -> int:
        return self.values * self.component_bytes


@dataclass(frozen=True)
class FileCheck:
    """The result of :func:`check_image_file`: the header and the NIfTI non-finite count."""

    header: ImageHeader
    nonfinite: int = 0


def check_image_file(path: Path, what: str) -> FileCheck:
    """Read the header of ``path`` and check size and data length; raise InputError."""
    header = read_header(path, what)
    if header.values > MAX_VOXEL_VALUES:
        shape = " x ".join(str(s) for s in header.size)
        raise InputError(
            f"{what} {path} declares {shape} voxels ({header.values:,} values), above the limit of "
            f"{MAX_VOXEL_VALUES:,} (1024^3); crop or downsample it first"
        )
    name = path.name.lower()
    nonfinite = 0
    if header.format == "NIfTI":
        nonfinite = _scan_nifti(path, what)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd_length(path, header, what)
    elif name.endswith((".mha", ".mhd")):
        _check_meta_length(path, header, what)
    return FileCheck(header, nonfinite)


def read_header(path: Path, what: str) -> ImageHeader:
    """The header alone (no voxels) through SimpleITK's ``ReadImageInformation``."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    call_itk(f"cannot read {what} {path}", reader.ReadImageInformation)
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", pixel)
    component_bytes = (int(bits.group(1)) // 8 if bits else 1) * (2 if "complex" in pixel else 1)
    io_name = reader.GetImageIO() or sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    return ImageHeader(
        tuple(int(s) for s in reader.GetSize()),
        int(reader.GetNumberOfComponents()),
        component_bytes,
        _FORMAT_NAMES.get(io_name, io_name),
    )


def _too_short(path: Path, what: str, found: int, expected: int) -> InputError:
    return InputError(f"cannot read {what} {path}: {shorter_than_header(found, expected)}")


# --- NIfTI ---------------------------------------------------------------------------------
def _scan_nifti(path: Path, what: str) -> int:
    """Check the data length of a NIfTI file and count its non-finite voxels (float types).

    Uses the on-disk type from nibabel's header (ITK reports the rescaled type instead). A
    ``.nii.gz`` is decompressed once here, which also checks its gzip integrity.
    """
    import nibabel

    try:
        header = nibabel.load(str(path)).header
    except Exception:
        return 0
    dtype = header.get_data_dtype()
    offset = int(header.get_data_offset())
    expected = int(np.prod(header.get_data_shape(), dtype=np.float64)) * dtype.itemsize
    compressed = path.name.lower().endswith(".gz")
    floating = dtype.kind in "fc"
    if not compressed:
        available = os.path.getsize(path) - offset
        if available < expected:
            raise _too_short(path, what, offset + max(available, 0), offset + expected)
        if not floating:
            return 0
    opener = gzip.open if compressed else open
    found, nonfinite = 0, 0
    try:
        with opener(path, "rb") as stream:
            stream.read(offset)
            step = max(dtype.itemsize, _SCAN_CHUNK_BYTES // dtype.itemsize * dtype.itemsize)
            while chunk := stream.read(step):
                if floating and found < expected:
                    usable = min(len(chunk), expected - found) // dtype.itemsize * dtype.itemsize
                    nonfinite += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype=dtype))))
                found += len(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {what} {path}: corrupted gzip ({' '.join(str(error).split())})") from None
    if found < expected:
        raise _too_short(path, what, offset + found, offset + expected)
    return nonfinite


# --- NRRD ----------------------------------------------------------------------------------
def _header_fields(path: Path, end: re.Pattern[bytes], separator: str) -> tuple[dict[str, str], int] | None:
    """The ``key SEP value`` fields (lower-case keys) of the text header of ``path`` up to the
    match of ``end``, and the byte offset after it; None when ``end`` is not found."""
    with open(path, "rb") as handle:
        head = handle.read(_TEXT_HEADER_LIMIT)
    match = end.search(head)
    if match is None:
        return None
    fields = {}
    for line in head[: match.end()].decode("latin-1").splitlines():
        if separator in line and not line.startswith("#"):
            key, value = line.split(separator, 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()  # NRRD key/value pairs use ":="
    return fields, match.end()


def _check_nrrd_length(path: Path, header: ImageHeader, what: str) -> None:
    # The header ends at a blank line, or at the end of a detached header (.nhdr).
    parsed = _header_fields(path, re.compile(rb"\r?\n\r?\n|\Z"), ":")
    if parsed is None:
        return
    fields, data_start = parsed
    if fields.get("encoding", "raw").lower() != "raw" or int(fields.get("line skip", fields.get("lineskip", "0"))):
        return  # compressed (teem reports short streams itself) or line-based layout
    skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    _check_data_length(path, header, what, fields.get("data file", fields.get("datafile")), data_start, skip)


# --- MetaImage -----------------------------------------------------------------------------
def _check_meta_length(path: Path, header: ImageHeader, what: str) -> None:
    parsed = _header_fields(path, re.compile(rb"ElementDataFile\s*=\s*[^\r\n]*\r?\n?"), "=")
    if parsed is None:
        return
    fields, data_start = parsed
    if fields.get("compresseddata", "false").lower() == "true":
        return
    data_file = fields.get("elementdatafile", "LOCAL")
    _check_data_length(
        path, header, what, None if data_file.upper() == "LOCAL" else data_file, data_start, int(fields.get("headersize", "0"))
    )


def _check_data_length(path: Path, header: ImageHeader, what: str, data_file: str | None, data_start: int, skip: int) -> None:
    """Compare the raw bytes after the header (or in the detached ``data_file``, relative to the
    header's folder) with what the header declares; ``skip`` bytes precede the data."""
    if skip < 0:
        return  # data at the end of the file by definition
    if data_file:
        if data_file.upper().startswith("LIST") or " " in data_file or "%" in data_file:
            return  # one file per slice: ITK checks each
        data_path = path.parent / data_file  # an absolute data_file stays absolute
        if not data_path.is_file():
            return  # ITK names the missing file
        available, start = os.path.getsize(data_path) - skip, skip
    else:
        available, start = os.path.getsize(path) - data_start - skip, data_start + skip
    if available < header.data_bytes:
        raise _too_short(path, what, start + max(available, 0), start + header.data_bytes)
