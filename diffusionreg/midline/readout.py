"""Midline shift read out of a slice's displacement field, in millimetres.

``u`` ``(2, N, N)`` is the field of ``phi(p) = p + u(p)`` (slice pixels, channel 0 along i, 1 along
j) mapping the observed slice onto the normal anatomy. The ideal midline is the column ``c`` (the
template's midsagittal plane in the slice). On each row inside the brain, the shifted midline
structure is the point ``p*`` that ``phi`` sends onto the ideal midline (``p*_i + u_i(p*) = c``,
searched within ``midline_band_mm`` of it and linearly interpolated between columns); its shift is
``|u(p*)|`` in mm through the pixel spacing ``(s_i, s_j)``. The slice's MLS is the largest over the
rows between the falx attachments (the first and last intracranial pixel of the midline column,
less a margin), so displacements away from the midline (or outside the brain) are never read: a
normal scan reads ~0. The four landmarks: both falx points, ``p*`` and ``phi(p*)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SliceReading:
    """One slice's read-out (pixels ``(i, j)``; ``mls_mm`` through the given spacing)."""

    mls_mm: float
    anterior_falx: tuple[float, float]
    posterior_falx: tuple[float, float]
    shifted: tuple[float, float]
    normal: tuple[float, float]
    rows_read: int  # rows of the midline inside the brain that were searched


def falx_rows(brain: np.ndarray, column: float, margin_px: float) -> tuple[int, int] | None:
    """First and last row of the longest run of brain pixels on the midline column, each moved
    inwards by ``margin_px`` (None when there is no run longer than twice the margin)."""
    line = brain[int(round(column))]
    best, start = (0, -1, -1), None
    for j, inside in enumerate(list(line) + [False]):
        if inside and start is None:
            start = j
        elif not inside and start is not None:
            if j - start > best[0]:
                best = (j - start, start, j - 1)
            start = None
    length, first, last = best
    lo, hi = int(np.ceil(first + margin_px)), int(np.floor(last - margin_px))
    if length == 0 or hi < lo:
        return None
    return lo, hi


def read_slice(
    u: np.ndarray, column: float, rows: tuple[int, int], spacing_mm: tuple[float, float], band_mm: float
) -> SliceReading:
    """Read the shift of one slice (see the module docstring). ``rows``: first and last row read."""
    u = np.asarray(u, dtype=np.float64)
    si, sj = spacing_mm
    band = int(np.ceil(band_mm / si))
    lo_i = max(int(np.floor(column)) - band, 0)
    hi_i = min(int(np.ceil(column)) + band, u.shape[1] - 1)
    best = None
    first, last = rows
    for j in range(first, last + 1):
        offset = np.arange(lo_i, hi_i + 1) + u[0, lo_i : hi_i + 1, j] - column
        crossings = np.nonzero(np.sign(offset[:-1]) != np.sign(offset[1:]))[0]
        exact = np.nonzero(offset == 0)[0]
        candidates = []
        for k in crossings:
            a, b = offset[k], offset[k + 1]
            if a == 0 or b == 0:
                continue
            candidates.append(k + a / (a - b))
        candidates += [float(k) for k in exact]
        if not candidates:
            continue
        position = min(candidates, key=lambda f: abs(lo_i + f - column))
        k = min(int(np.floor(position)), len(offset) - 2)
        weight = position - k
        vector = (1 - weight) * u[:, lo_i + k, j] + weight * u[:, lo_i + k + 1, j]
        mls = float(np.hypot(vector[0] * si, vector[1] * sj))
        if best is None or mls > best[0]:
            i_star = lo_i + position
            best = (mls, (i_star, float(j)), (i_star + vector[0], j + vector[1]))
    falx = ((column, float(first)), (column, float(last)))
    if best is None:  # no crossing anywhere: report the ideal midline, unshifted
        middle = (column, 0.5 * (first + last))
        return SliceReading(0.0, falx[0], falx[1], middle, middle, last - first + 1)
    return SliceReading(best[0], falx[0], falx[1], best[1], best[2], last - first + 1)
