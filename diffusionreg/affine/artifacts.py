"""Synthetic artifacts for self-supervised training (applied per copy, independently).

Volumes are single tensors ``(C, D0, D1, D2)`` in [-1, 1]. ``axial`` is the array axis of
the A-scan / depth direction (the reference's H axis = 1); the two other axes are the
"en-face" axes. Voxel-valued parameters come from the config (already scaled to the grid).
Each artifact fires with probability ``cfg.artifact_prob``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusionreg import fields
from diffusionreg.spaces import sample

from .config import AffineConfig


def _u(gen, lo: float = 0.0, hi: float = 1.0) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen))


def _randint(gen, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _enface(axial: int) -> tuple[int, int]:
    return tuple(a for a in range(3) if a != axial)  # type: ignore[return-value]


def _control_shape(grid: tuple[int, int, int], axial: int) -> list[int]:
    """Control-grid shape in array order: grid[0] along the axial axis."""
    shape = [0, 0, 0]
    shape[axial] = grid[0]
    e = _enface(axial)
    shape[e[0]], shape[e[1]] = grid[1], grid[2]
    return shape


def elastic(vol: torch.Tensor, cfg: AffineConfig, gen, axial: int = 1) -> torch.Tensor:
    """Smooth random deformation: control grid of N(0,1) clamped at +-2, scaled to
    cfg.elastic_std_vox voxels, upsampled trilinearly; each component is along its own
    array axis (the reference paired them wrongly) and uses one align_corners convention."""
    shape = vol.shape[1:]
    ctrl = torch.randn((1, 3, *_control_shape(cfg.elastic_grid, axial)), generator=gen)
    ctrl = ctrl.clamp(-2, 2) * cfg.elastic_std_vox
    disp = F.interpolate(ctrl, size=tuple(shape), mode="trilinear", align_corners=True)[0]
    positions = fields.identity_grid(shape) + disp[None]  # voxel indices
    out = sample((vol[None] + 1) / 2, positions, mode="bilinear", padding_mode="zeros")[0]
    return out * 2 - 1


def motion(vol: torch.Tensor, cfg: AffineConfig, gen, axial: int = 1) -> torch.Tensor:
    """0..motion_max bands of consecutive frames along one en-face axis, rolled (wrap)
    along the other en-face axis (B-scan to B-scan eye motion)."""
    out = vol.clone()
    e = _enface(axial)
    for _ in range(_randint(gen, 0, cfg.motion_max)):
        band_axis, roll_axis = (e[0], e[1]) if _u(gen) < 0.5 else (e[1], e[0])
        length = _randint(gen, *cfg.motion_band)
        size = out.shape[1 + band_axis]
        start = _randint(gen, 0, max(size - length, 0))
        shift = _randint(gen, *cfg.motion_shift) * (1 if _u(gen) < 0.5 else -1)
        idx = [slice(None)] * 4
        idx[1 + band_axis] = slice(start, start + length)
        out[tuple(idx)] = torch.roll(out[tuple(idx)], shifts=shift, dims=1 + roll_axis)
    return out


def doubling(vol: torch.Tensor, cfg: AffineConfig, gen, axial: int = 1) -> torch.Tensor:
    """(1 - a) V + a roll(V), a ~ U(0, doubling_alpha), integer shifts in
    [-doubling_shift, doubling_shift - 1] along both en-face axes."""
    a = _u(gen, 0.0, cfg.doubling_alpha)
    e = _enface(axial)
    s = cfg.doubling_shift
    shifts = (_randint(gen, -s, s - 1), _randint(gen, -s, s - 1))
    return (1 - a) * vol + a * torch.roll(vol, shifts=shifts, dims=(1 + e[0], 1 + e[1]))


def shadow(vol: torch.Tensor, cfg: AffineConfig, gen, axial: int = 1) -> torch.Tensor:
    """Multiply (in [0,1] space) by a smooth U(0,1) field, then min-max renormalise."""
    ctrl = torch.rand((1, 1, *_control_shape(cfg.shadow_grid, axial)), generator=gen)
    field = F.interpolate(ctrl, size=tuple(vol.shape[1:]), mode="trilinear", align_corners=True)[0]
    x = (vol + 1) / 2 * field
    mn, mx = x.min(), x.max()
    x = (x - mn) / (mx - mn).clamp_min(1e-8)
    return x * 2 - 1


def stretch(vol: torch.Tensor, cfg: AffineConfig, gen, axial: int = 1) -> torch.Tensor:
    """Repeated frames: inside a band along an en-face axis each frame is shown twice
    (local 2x stretch), the rest unchanged."""
    e = _enface(axial)
    ax = e[0] if _u(gen) < 0.5 else e[1]
    size = vol.shape[1 + ax]
    length = _randint(gen, *cfg.stretch_band)
    start = _randint(gen, 0, max(size - length, 0))
    src = torch.arange(size)
    band = torch.arange(start, min(start + length, size))
    src[band] = start + (band - start) // 2
    return vol.index_select(1 + ax, src)


def random_crop(vol: torch.Tensor, floor: float, gen, axial: int = 1) -> torch.Tensor:
    """Keep a random box whose extents along the two en-face axes are uniform in
    [floor * size, size]; everything outside becomes background (-1)."""
    out = torch.full_like(vol, -1.0)
    idx = [slice(None)] * 4
    for ax in _enface(axial):
        size = vol.shape[1 + ax]
        ext = _randint(gen, int(round(floor * size)), size)
        start = _randint(gen, 0, size - ext)
        idx[1 + ax] = slice(start, start + ext)
    out[tuple(idx)] = vol[tuple(idx)]
    return out


def apply_artifacts(vol: torch.Tensor, cfg: AffineConfig, gen, modality: str = "mri", axial: int = 1) -> torch.Tensor:
    """One independent artifact draw, then the random crop."""
    p = cfg.artifact_prob
    if modality != "octa" and _u(gen) < p:
        vol = elastic(vol, cfg, gen, axial)
    if _u(gen) < p:
        vol = motion(vol, cfg, gen, axial)
    if _u(gen) < p:
        vol = doubling(vol, cfg, gen, axial)
    if _u(gen) < p:
        vol = shadow(vol, cfg, gen, axial)
    if _u(gen) < cfg.stretch_prob:
        vol = stretch(vol, cfg, gen, axial)
    floor = 0.75 if modality in ("oct", "octa") else cfg.crop_floor
    return random_crop(vol, floor, gen, axial)
