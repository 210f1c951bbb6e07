"""Fixed/moving overlay pictures (PNG) for a quick look at a registration.

Fixed in magenta, moving in green: where they agree the picture is grey, where they disagree it
is coloured. Slices are shown in the usual radiological views (axial, coronal, sagittal) whatever
the file's axis order, because the fixed grid is first put into the nearest L-P-S axis order.
The PNG encoder is a few lines of zlib, so the backend needs no plotting library.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffusionreg.image import Image, nearest_axis_direction
from diffusionreg.io_atomic import atomic_output

# Output pixels per millimetre of the views (nearest-neighbour upsampling).
PIXELS_PER_MM = 2.0
# Upper intensity percentile mapped to white.
WINDOW_PERCENTILE = 99.5
GAP_PIXELS = 4


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 picture as an 8-bit RGB PNG, atomically."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    payload = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_bytes(payload)
    return path


def _to_lps_axes(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """Array permuted/flipped so that axes run (towards L, towards P, towards S); and its spacing."""
    signed = nearest_axis_direction(image.grid.direction)  # column a: world axis of array axis a
    order = [int(np.argmax(np.abs(signed[:, a]))) for a in range(3)]  # world axis of each array axis
    array = image.array
    for axis in range(3):
        if signed[order[axis], axis] < 0:
            array = np.flip(array, axis)
    permutation = [order.index(world) for world in range(3)]
    return np.transpose(array, permutation), image.spacing[permutation]


def _views(volume: np.ndarray, spacing: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal mid-slices, rows top-to-bottom, in radiological display."""
    centre = [s // 2 for s in volume.shape]
    # Axial: patient right on screen left (L axis increasing to the right), anterior at top.
    axial = volume[:, :, centre[2]].T
    # Coronal: superior at top, right on screen left.
    coronal = np.flipud(volume[:, centre[1], :].T)
    # Sagittal: superior at top, anterior on screen left.
    sagittal = np.flipud(volume[centre[0], :, :].T)
    scales = [(spacing[1], spacing[0]), (spacing[2], spacing[0]), (spacing[2], spacing[1])]
    return [_upsample(view, scale) for view, scale in zip((axial, coronal, sagittal), scales)]


def _upsample(view: np.ndarray, spacing_rows_columns: Sequence[float]) -> np.ndarray:
    rows = np.maximum(
        np.round(
            np.arange(int(view.shape[0] * spacing_rows_columns[0] * PIXELS_PER_MM)) / (spacing_rows_columns[0] * PIXELS_PER_MM)
        ).astype(int),
        0,
    )
    columns = np.round(
        np.arange(int(view.shape[1] * spacing_rows_columns[1] * PIXELS_PER_MM)) / (spacing_rows_columns[1] * PIXELS_PER_MM)
    ).astype(int)
    return view[np.minimum(rows, view.shape[0] - 1)][:, np.minimum(columns, view.shape[1] - 1)]


def _window(array: np.ndarray) -> np.ndarray:
    finite = array[np.isfinite(array)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(np.percentile(finite, WINDOW_PERCENTILE)) if finite.size else 1.0
    return np.clip((array - low) / max(high - low, 1e-6), 0.0, 1.0)


def overlay_rows(fixed: Image, moving_on_fixed: Sequence[Image]) -> np.ndarray:
    """One row of three views per moving image (already resampled onto the fixed grid)."""
    fixed_lps, spacing = _to_lps_axes(fixed)
    fixed_views = _views(_window(fixed_lps.astype(np.float32)), spacing)
    rows = []
    for moving in moving_on_fixed:
        if moving.shape != fixed.shape:
            raise ValueError("moving images must be resampled onto the fixed grid first")
        moving_views = _views(_window(_to_lps_axes(moving)[0].astype(np.float32)), spacing)
        tiles = []
        for f, m in zip(fixed_views, moving_views):
            tiles.append(np.stack([f, m, f], -1))
            tiles.append(np.zeros((f.shape[0], GAP_PIXELS, 3)))
        height = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles[:-1]]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP_PIXELS), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return (np.concatenate(rows, axis=0)[:-GAP_PIXELS] * 255).round().astype(np.uint8)


def write_overlay(path: str | os.PathLike, fixed: Image, moving_on_fixed: Sequence[Image]) -> Path:
    """Write the overlay picture: a row per moving image (e.g. before and after registration)."""
    return write_png(path, overlay_rows(fixed, moving_on_fixed))
