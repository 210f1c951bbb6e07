"""The written inverse field, solved against the written forward field on the output grids.

The networks give a field ``u`` and its inverse ``w`` on their own grid; each is then sampled
(trilinearly) onto the fixed grid (forward ``D``) and the moving grid (inverse ``Dinv``). The pair
is inverse consistent at the network's grid points up to the inversion tolerance, but between
them trilinear ``u`` and trilinear ``w`` are not inverses of each other, the refinement's
compositions add their own interpolation, and past the network box both are border-extended:
read back as ITK reads them, ``D(q + Dinv(q)) + Dinv(q)`` is about 0.1 mm off on brains,
millimetres near the box faces.

:func:`solve_inverse` removes that at the source: at every moving voxel ``q`` it solves
``p + D(p) = q`` for ``p`` with ``D`` exactly as written (trilinear between fixed voxel centres,
nearest within half a voxel beyond, zero further out: ITK's displacement-field transform),
starting from the network inverse, and writes ``Dinv(q) = p - q``. Steps are Newton steps with
the Jacobian of the starting inverse: ``p <- p - a (I + dDinv0/dq) (p + D(p) - q)`` (the inverse
map's Jacobian approximates that of ``D``'s inverse, so a few steps reach 1e-3 mm); a voxel's step
``a`` is halved when it would not lower its residual, and such a voxel's next step is a true
Newton step (``D``'s Jacobian at ``p`` by central differences) (measured as ITK reads ``D``, so no voxel
ends worse than the network value), and iterates stay where ``D`` is defined (outside it ITK
reads zero, and ``p = q`` would be a false solution): a voxel whose preimage lies beyond the
fixed grid keeps its best iterate inside, and one whose start is already beyond it is left as
it is. The forward field is left untouched (the registration and its
Dice are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffusionreg import fields, spaces
from diffusionreg.image import Grid, Image


@dataclass(frozen=True)
class InverseResidual:
    """``|p + D(p) - q|`` (mm) over the moving voxels solved inside the fixed grid, and their count."""

    mean_mm: float
    p95_mm: float
    max_mm: float
    voxels: int


def _forward_at(field: torch.Tensor, to_index: torch.Tensor, points: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """ITK's reading of a displacement field at LPS points ``(N, 3)``: trilinear, border within
    half a voxel beyond the outer centres, zero further out; and the mask of points inside."""
    index = points @ to_index[:3, :3].T + to_index[:3, 3]
    values = spaces.sample(field, index.T[None])[0].T.to(points.dtype)
    upper = torch.tensor(shape, dtype=index.dtype) - 0.5
    inside = ((index >= -0.5) & (index < upper)).all(dim=1)
    return torch.where(inside[:, None], values, torch.zeros_like(values)), inside


def _map_jacobian(field: torch.Tensor, to_index: torch.Tensor, points: torch.Tensor, shape) -> torch.Tensor:
    """``I + dD/dp`` (world units) at LPS points ``(N, 3)`` by central differences of ITK's
    trilinear reading over a quarter of the smallest voxel: ``(N, 3, 3)``."""
    step = 0.25 / float(torch.linalg.matrix_norm(to_index[:3, :3], ord=2))  # mm
    columns = []
    for axis in range(3):
        offset = torch.zeros(3, dtype=points.dtype)
        offset[axis] = step
        plus = _forward_at(field, to_index, points + offset, shape)[0]
        minus = _forward_at(field, to_index, points - offset, shape)[0]
        columns.append((plus - minus) / (2.0 * step))
    return torch.stack(columns, dim=-1) + torch.eye(3, dtype=points.dtype)


def _inverse_jacobian(inverse: np.ndarray, grid: Grid, start: int, stop: int) -> torch.Tensor:
    """``I + dDinv/dq`` in world units at the moving voxels of rows ``[start, stop)``:
    ``(rows, n1, n2, 3, 3)`` float32 (central differences, one-sided on the grid's faces; a row of
    halo on each side keeps slab edges central, so slabs agree with the whole-volume result).
    Only the step direction uses it and every step is checked against ``D`` itself in float64,
    so its precision sets the speed of convergence, not the answer: float32 halves its cost."""
    lo, hi = max(start - 1, 0), min(stop + 1, inverse.shape[0])
    field = torch.from_numpy(np.ascontiguousarray(inverse[lo:hi], dtype=np.float32)).permute(3, 0, 1, 2)
    per_index = torch.stack(torch.gradient(field, dim=(1, 2, 3)), dim=-1)[:, start - lo : stop - lo]  # (comp, ..., axis)
    index_per_world = torch.as_tensor(np.linalg.inv(grid.affine[:3, :3]), dtype=torch.float32)
    jacobian = per_index.movedim(0, -2) @ index_per_world  # (..., 3 comp, 3 world)
    return jacobian + torch.eye(3, dtype=torch.float32)


def solve_inverse(
    forward: Image, inverse: np.ndarray, moving_grid: Grid, iterations: int, tolerance_mm: float, slab_points: int = 1_000_000
) -> tuple[np.ndarray, InverseResidual]:
    """``(Dinv, residual)``: the inverse field ``(*moving shape, 3)`` (LPS mm, float32) solved
    against ``forward`` (the written forward field on the fixed grid) from ``inverse``.

    ``iterations`` steps at most per voxel; a voxel stops once its residual is ``<= tolerance_mm``.
    """
    shape = moving_grid.shape
    # float32 as written (and half the memory of a large CT grid); positions and residuals are float64.
    field = torch.from_numpy(np.ascontiguousarray(forward.array, dtype=np.float32)).permute(3, 0, 1, 2)[None]
    to_index = torch.as_tensor(np.linalg.inv(forward.affine), dtype=torch.float64)
    fixed_shape = forward.shape
    moving_affine = torch.as_tensor(moving_grid.affine, dtype=torch.float64)
    out = np.array(inverse, dtype=np.float32, copy=True)
    residuals: list[torch.Tensor] = []
    rows = max(1, slab_points // (shape[1] * shape[2]))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        index = spaces.coordinates(spaces.voxel_space((stop - start, shape[1], shape[2])), dtype=torch.float64)
        index[:, 0] += start
        q = (index[0].reshape(3, -1).T @ moving_affine[:3, :3].T) + moving_affine[:3, 3]
        p = q + torch.from_numpy(out[start:stop].reshape(-1, 3)).double()
        slab_jacobian = _inverse_jacobian(inverse, moving_grid, start, stop).reshape(-1, 3, 3)
        start_forward, start_inside = _forward_at(field, to_index, p, fixed_shape)
        error = p + start_forward - q
        # A start beyond the field has no preimage to find there: those voxels are left as they are.
        norm = torch.where(start_inside, fields.vector_length(error), torch.zeros_like(error[:, 0]))
        step_size = torch.ones_like(norm)
        active = torch.nonzero(norm > tolerance_mm).flatten()
        for _ in range(iterations):
            if active.numel() == 0:
                break
            p_a, error_a, step_a = p[active], error[active], step_size[active]
            direction = (slab_jacobian[active].double() @ error_a[:, :, None])[:, :, 0]
            # Where the frozen Jacobian failed last time, take a true Newton step instead.
            failed = step_a < 1.0
            if bool(failed.any()):
                newton = torch.linalg.solve(_map_jacobian(field, to_index, p_a[failed], fixed_shape), error_a[failed])
                direction[failed] = newton
            candidate = p_a - step_a[:, None] * direction
            candidate_forward, inside = _forward_at(field, to_index, candidate, fixed_shape)
            candidate_error = candidate + candidate_forward - q[active]
            candidate_norm = fields.vector_length(candidate_error)
            # Beyond the field ITK reads zero: p = q would "solve" there, a jump to a false inverse.
            better = inside & (candidate_norm < norm[active])
            accepted = active[better]
            p[accepted] = candidate[better]
            error[accepted] = candidate_error[better]
            norm[accepted] = candidate_norm[better]
            step_size[active] = torch.where(better, torch.clamp(2.0 * step_a, max=1.0), 0.5 * step_a)
            active = active[norm[active] > tolerance_mm]
        out[start:stop] = (p - q).reshape(stop - start, shape[1], shape[2], 3).numpy()
        p_index = p @ to_index[:3, :3].T + to_index[:3, 3]
        solved = ((p_index >= 0) & (p_index <= torch.tensor(fixed_shape) - 1.0)).all(dim=1)
        residuals.append(norm[solved].float())
    values = torch.cat(residuals).numpy() if residuals else np.zeros(0, np.float32)
    if values.size == 0:
        return out, InverseResidual(float("nan"), float("nan"), float("nan"), 0)
    return out, InverseResidual(float(values.mean()), float(np.percentile(values, 95)), float(values.max()), int(values.size))
