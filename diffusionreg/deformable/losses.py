"""Losses of the deformable networks. Fields are ``(B, 3, D0, D1, D2)`` in voxel units.

* :func:`lncc_squared`: squared local normalised cross-correlation with box sums,
  ``cross^2 / (var1 var2 + 1e-5)`` (SITReg); the similarity loss is its negative mean.
* :func:`gradient_loss`: mean squared forward difference of the displacement, i.e. of
  ``J - I`` (dimensionless; equal in any uniformly scaled coordinates), averaged over axes.
* :func:`icon_regulariser`: Unleashing Registration's sum over axes of the mean squared
  forward difference of the displacement in :func:`normalised_space` units.
* :func:`ndv_loss`: total non-diffeomorphic volume (Liu et al. 10-stencil), voxels.
* :func:`cycle_consistency_loss`: ``|phi12 o phi23 o phi31 - id|^2`` (group consistency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusionreg import fields, spaces


def _box_sum(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a ``window^3`` box around each voxel (zero padded), separable.

    Each axis is a box mean counting the zero padding (``avg_pool3d``, far cheaper on a CPU than
    a grouped convolution) times ``window``."""
    pad = window // 2
    out = x
    for axis in range(3):
        kernel = [1, 1, 1]
        kernel[axis] = window
        padding = [0, 0, 0]
        padding[axis] = pad
        out = F.avg_pool3d(out, tuple(kernel), stride=1, padding=tuple(padding), count_include_pad=True) * window
    return out


def lncc_squared(
    a: torch.Tensor, b: torch.Tensor, window: int = 7, eps: float = 1e-5, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (masked) voxels of the squared local NCC of two ``(B, 1, ...)`` volumes: ``(B,)``."""
    if mask is not None:
        a, b = a * mask, b * mask
    stacked = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    sums = _box_sum(stacked, window)
    n = float(window**3)
    sa, sb, saa, sbb, sab = sums.unbind(1)
    cross = sab - sa * sb / n
    var_a = (saa - sa * sa / n).clamp_min(0.0)
    var_b = (sbb - sb * sb / n).clamp_min(0.0)
    cc = cross * cross / (var_a * var_b + eps)
    if mask is None:
        return cc.flatten(1).mean(1)
    m = mask[:, 0]
    return (cc * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def similarity_loss(warped: torch.Tensor, target: torch.Tensor, kind: str, window: int = 7) -> torch.Tensor:
    """Scalar similarity loss (lower is better): ``-LNCC^2``, ``L1`` or ``MSE``."""
    if kind == "ncc":
        return -lncc_squared(warped, target, window).mean()
    if kind == "l1":
        return (warped - target).abs().mean()
    if kind == "mse":
        return ((warped - target) ** 2).mean()
    raise ValueError(f"unknown similarity {kind!r}")


def gradient_loss(u: torch.Tensor) -> torch.Tensor:
    """Mean over the 3 axes of the mean squared forward difference of ``u`` (voxel units)."""
    total = u.new_zeros(())
    for axis in range(3):
        d = u.narrow(2 + axis, 1, u.shape[2 + axis] - 1) - u.narrow(2 + axis, 0, u.shape[2 + axis] - 1)
        total = total + (d * d).mean()
    return total / 3.0


def normalised_space(shape) -> spaces.Space:
    """The networks' normalised displacement units: torch ``align_corners=False`` scale
    (``2 / size_c`` per voxel) with components kept in array order ``(i, j, k)``."""
    return spaces.torch_space(tuple(shape), components="ijk")


def to_normalised(u: torch.Tensor) -> torch.Tensor:
    """Voxel displacement -> :func:`normalised_space` units (component c times 2 / size_c)."""
    return spaces.rescale_displacement(u, spaces.voxel_space(u.shape[2:]), normalised_space(u.shape[2:]))


def from_normalised(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_normalised`."""
    return spaces.rescale_displacement(u, normalised_space(u.shape[2:]), spaces.voxel_space(u.shape[2:]))


def icon_regulariser(u: torch.Tensor) -> torch.Tensor:
    """Sum over axes of the mean squared forward difference of ``u`` in normalised units."""
    n = to_normalised(u)
    total = u.new_zeros(())
    for axis in range(3):
        d = n.narrow(2 + axis, 1, n.shape[2 + axis] - 1) - n.narrow(2 + axis, 0, n.shape[2 + axis] - 1)
        total = total + (d * d).mean()
    return total


def ndv_loss(u: torch.Tensor) -> torch.Tensor:
    """Total non-diffeomorphic volume (voxels), averaged over the batch."""
    return fields.non_diffeomorphic_volume_map(u).flatten(1).sum(1).mean()


def cycle_consistency_loss(
    u12: torch.Tensor, u23: torch.Tensor, u31: torch.Tensor, u21: torch.Tensor, u32: torch.Tensor, u13: torch.Tensor
) -> torch.Tensor:
    """Group consistency of a triplet: ``0.5 (mean|phi12 o phi23 o phi31 - id|^2 + reverse chain)``.

    Displacements are measured in normalised units (the reference measures them in its
    centred-normalised system, not mm). All fields share one grid.
    """
    forward = fields.compose(fields.compose(u12, u23), u31)
    backward = fields.compose(fields.compose(u13, u32), u21)
    return 0.5 * (to_normalised(forward).pow(2).sum(1).mean() + to_normalised(backward).pow(2).sum(1).mean())
