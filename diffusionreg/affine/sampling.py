"""Forward ("diffusion") sampling of random affines and warping helpers.

All matrices here are in torch-normalised coordinates (align_corners=False; components
(x, y, z) = array axes (k, j, i)) and map output (fixed) points to input (moving) sample
points, the affine_grid convention. A corrupted moving volume is q(p) = x0(M p).
"""

from __future__ import annotations

import math

import torch

from diffusionreg.spaces import sample_affine, torch_space

from .schedule import Schedule


def warp(volume: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp (B,C,D0,D1,D2) volumes in [-1, 1] by (B,3,4) or (B,4,4) normalised affines.
    Outside the field of view is background (-1), i.e. zero padding in [0, 1] space."""
    out = sample_affine((volume + 1) / 2, theta, torch_space(volume.shape[2:]), mode=mode, padding_mode="zeros")
    return out * 2 - 1


def to_homogeneous(m: torch.Tensor) -> torch.Tensor:
    """(B,3,4) -> (B,4,4)."""
    if m.shape[-2] == 4:
        return m
    bottom = torch.zeros(*m.shape[:-2], 1, 4, dtype=m.dtype, device=m.device)
    bottom[..., 0, 3] = 1
    return torch.cat([m, bottom], dim=-2)


def euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(B,3) angles (rad) about x, y, z -> (B,3,3) R = Rx Ry Rz."""
    cx, cy, cz = torch.cos(angles).unbind(-1)
    sx, sy, sz = torch.sin(angles).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rx @ ry @ rz


def _clamped_normal(std: torch.Tensor, shape, k: float, gen) -> torch.Tensor:
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    std = std.reshape(-1, *([1] * (len(shape) - 1)))
    return (z * std).clamp(-k * std, k * std)


def translation_to_normalized(tau_vox: torch.Tensor, spatial_shape) -> torch.Tensor:
    """(B,3) translations in voxels ordered (x, y, z) = axes (k, j, i) -> normalised units.
    Component x is divided by size(k)/2, y by size(j)/2, z by size(i)/2 (the reference
    divided x by size(i)/2, which is only right for D == W)."""
    d0, d1, d2 = spatial_shape
    half = torch.tensor([d2 / 2.0, d1 / 2.0, d0 / 2.0], dtype=tau_vox.dtype)
    return tau_vox / half


def sample_forward(
    t: torch.Tensor,
    sched: Schedule,
    spatial_shape,
    affine_prob: float = 0.8,
    clamp: float = 2.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-jump sample of the marginal at timesteps t (B,) in 1..T.

    Returns (M, target): M (B,4,4) the corruption (q = x0(M p)), target (B,3,4) = M^-1.
    float64."""
    b = t.shape[0]
    idx = (t.long() - 1).cpu()
    s_lin = torch.as_tensor(sched.lin_cum, dtype=torch.float64)[idx]
    s_tr = torch.as_tensor(sched.tr_cum, dtype=torch.float64)[idx]
    eye = torch.eye(3, dtype=torch.float64).expand(b, 3, 3)
    # general affine: I + m G / ||G||_2
    m = _clamped_normal(s_lin, (b,), clamp, generator)
    g = torch.randn((b, 3, 3), generator=generator, dtype=torch.float64)
    g = g / torch.linalg.matrix_norm(g, ord=2)[:, None, None]
    lin_aff = eye + m[:, None, None] * g
    # rotation + anisotropic scale
    ang = _clamped_normal(s_lin, (b, 3), clamp, generator)
    logs = _clamped_normal(s_lin, (b, 3), clamp, generator)
    lin_rig = euler_rotation(ang) @ torch.diag_embed(torch.exp(logs))
    use_aff = torch.rand((b,), generator=generator, dtype=torch.float64) < affine_prob
    lin = torch.where(use_aff[:, None, None], lin_aff, lin_rig)
    tau = translation_to_normalized(_clamped_normal(s_tr, (b, 3), clamp, generator), spatial_shape)
    mat = torch.zeros((b, 4, 4), dtype=torch.float64)
    mat[:, :3, :3] = lin
    mat[:, :3, 3] = tau
    mat[:, 3, 3] = 1
    return mat, torch.linalg.inv(mat)[:, :3, :]


def sample_uniform_affine(
    b: int, sched: Schedule, spatial_shape, scale: float = 1.2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Monitoring affines: magnitude and translation uniform up to scale * Sigma(T).
    Returns (B,4,4) normalised corruption matrices."""
    s_lin = scale * float(sched.lin_cum[-1])
    s_tr = scale * float(sched.tr_cum[-1])
    g = torch.randn((b, 3, 3), generator=generator, dtype=torch.float64)
    g = g / torch.linalg.matrix_norm(g, ord=2)[:, None, None]
    m = (torch.rand((b,), generator=generator, dtype=torch.float64) * 2 - 1) * min(s_lin, 0.9)
    tau = (torch.rand((b, 3), generator=generator, dtype=torch.float64) * 2 - 1) * s_tr
    mat = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1)
    mat[:, :3, :3] += m[:, None, None] * g
    mat[:, :3, 3] = translation_to_normalized(tau, spatial_shape)
    return mat


def frobenius_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||pred - target||_F over (B,3,4) matrices (not squared)."""
    diff = (pred - target.to(pred.dtype)).flatten(1)
    return torch.sqrt((diff**2).sum(1) + 1e-12).mean()


__all__ = [
    "warp",
    "to_homogeneous",
    "euler_rotation",
    "translation_to_normalized",
    "sample_forward",
    "sample_uniform_affine",
    "frobenius_loss",
    "math",
]
