"""SITReg: symmetric, inverse-consistent, topology-preserving multi-resolution registration.

Written from the project's reading of the method (``shared/spec/sitreg.md``); no reference
code is used. Geometry: every deformation lives on the full-resolution network grid as a
displacement in voxel units (:mod:`diffusionreg.fields` conventions). Feature level ``k`` has
``2^k`` times fewer voxels per axis; its voxel ``j`` sits at full-resolution index
``(j + 0.5) 2^k - 0.5`` (grids share their outer voxel faces: "full voxels", start-aligned).

``SITReg(image1, image2)`` returns ``(phi_fwd, phi_inv)`` with ``warp(image1, phi_fwd) ~
image2`` and ``warp(image2, phi_inv) ~ image1``; swapping the inputs swaps the outputs and
``phi_fwd o phi_inv = id`` up to the fixed-point tolerance and grid resampling.

Per level: ``z_fwd = [f1 - f2, f1 + f2]``, ``z_rev = [f2 - f1, f1 + f2]``, a shared head
gives control points ``K_k tanh(.)`` (level voxels), upsampled by a cubic B-spline without
prefilter to full resolution (``a``, ``b``); the level's update is ``D_fwd = a o b^-1`` and
``D_inv = b o a^-1``. Accumulators: ``L <- L o D_fwd``, ``R <- R o D_inv``,
``L^-1 <- D_inv o L^-1``, ``R^-1 <- D_fwd o R^-1``; finally ``phi_fwd = A o L o R^-1 o A``
and ``phi_inv = A^-1 o R o L^-1 o A^-1`` with the optional half-affine ``A``.

Fixed relative to the reference: the affine MLP feeds each hidden layer's output to the
next (the reference feeds the original input to every Linear, so only the last hidden layer
had an effect).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusionreg import fields, spaces

from .config import SITRegConfig

# Reciprocal of the worst-case sum over control points of |sum_d dB/dx_d| (3D, cubic
# B-spline, linear interpolation of the result), per upsampling factor.
_BSPLINE_BOUNDS_3D = {1: 0.36, 2: 0.3854, 4: 0.3980, 8: 0.4007, 16: 0.4018, 32: 0.4025}
_BOUND_SAFETY = 0.99


def bspline_bound(factor: int) -> float:
    """``K = 0.99 x bound`` for an upsampling factor; other factors use the next smaller tabulated one."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    keys = sorted(k for k in _BSPLINE_BOUNDS_3D if k <= factor)
    return _BOUND_SAFETY * _BSPLINE_BOUNDS_3D[keys[-1]]


def _cubic_bspline(r: torch.Tensor) -> torch.Tensor:
    a = r.abs()
    return torch.where(a < 1, 2.0 / 3.0 - a * a + 0.5 * a**3, torch.where(a < 2, (2.0 - a) ** 3 / 6.0, torch.zeros_like(a)))


@lru_cache(maxsize=64)
def _bspline_matrix(n: int, factor: int) -> torch.Tensor:
    """``(n * factor, n)`` weights: full-res sample ``x`` from control points at ``(i + 0.5) f - 0.5``.

    Control points beyond the grid repeat the border one (their columns are merged), which
    keeps the sum of absolute derivative weights, hence the bound, unchanged or smaller.
    """
    x = torch.arange(n * factor, dtype=torch.float64)
    t = (x + 0.5) / factor - 0.5
    out = torch.zeros(n * factor, n, dtype=torch.float64)
    base = torch.floor(t).long()
    for offset in (-1, 0, 1, 2):
        i = base + offset
        w = _cubic_bspline(t - i.double())
        out.index_put_((torch.arange(n * factor), i.clamp(0, n - 1)), w, accumulate=True)
    return out


def bspline_upsample(control: torch.Tensor, factor: int) -> torch.Tensor:
    """Cubic B-spline (no prefilter) evaluation of ``(B, C, n0, n1, n2)`` control points on the
    ``factor``-times finer grid; values are unchanged in scale (convert units separately)."""
    mats = [_bspline_matrix(int(n), factor).to(control.device, control.dtype) for n in control.shape[2:]]
    return torch.einsum("bcijk,Ii,Jj,Kk->bcIJK", control, *mats)


def _group_norm(groups: int, channels: int) -> nn.Module:
    if groups <= 0:
        return nn.Identity()
    g = math.gcd(groups, channels)
    return nn.GroupNorm(g, channels)


def _conv_block(cin: int, cout: int, n: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), _group_norm(groups, cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Siamese feature pyramid: 1x1 projection, per level [3^3 conv, GN, ReLU] x n; each
    further level adds a stride-2 2^3 conv and a skip (2x average pool of the previous skip,
    then 1x1 conv); odd sizes are padded at the end first ("ceil" mode)."""

    def __init__(self, cfg: SITRegConfig, in_channels: int = 1) -> None:
        super().__init__()
        c = cfg.feature_channels
        self.project = nn.Conv3d(in_channels, c[0], 1)
        self.blocks = nn.ModuleList([_conv_block(c[0], c[0], cfg.convs_per_level, cfg.norm_groups)])
        self.down = nn.ModuleList()
        self.skips = nn.ModuleList()
        for k in range(1, len(c)):
            self.down.append(nn.Conv3d(c[k - 1], c[k], 2, stride=2))
            self.skips.append(nn.Conv3d(c[k - 1], c[k], 1))
            self.blocks.append(_conv_block(c[k], c[k], cfg.convs_per_level, cfg.norm_groups))

    @staticmethod
    def _pad_even(x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in reversed(x.shape[2:]):
            pads += [0, size % 2]
        return F.pad(x, pads, mode="replicate") if any(pads) else x

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skip = self.project(x)
        feature = self.blocks[0](skip)
        out = [feature]
        for down, skip_conv, block in zip(self.down, self.skips, self.blocks[1:]):
            feature, skip = self._pad_even(feature), self._pad_even(skip)
            skip = down(feature) + skip_conv(F.avg_pool3d(skip, 2))
            feature = block(skip)
            out.append(feature)
        return out


class DenseHead(nn.Module):
    """Shared per-level head: 2 x [3^3 conv, (GN), ReLU] then 1x1 conv to 3 control values."""

    def __init__(self, features: int, channels: int, n: int, groups: int) -> None:
        super().__init__()
        self.body = _conv_block(2 * features, channels, n, groups)
        self.out = nn.Conv3d(channels, 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(z))


class HalfAffine(nn.Module):
    """Symmetric half-affine from the coarsest features (Kaji-Ochiai parametrisation).

    ``T(z) = [expm(skew(r)) expm(sym(log s, log shear)) | t]`` in the centred-normalised system
    (the largest field-of-view axis spans [-1, 1]); ``A = T(z_fwd) T(z_rev)^-1``. The features
    are first projected by a 1x1 conv to a few channels so the flattened MLP input stays small.
    The MLP chains its layers (the reference's bug of feeding the input to every layer is fixed).
    """

    def __init__(self, features: int, coarse_shape: tuple[int, int, int], cfg: SITRegConfig) -> None:
        super().__init__()
        p = cfg.affine_input_channels
        self.project = nn.Conv3d(2 * features, p, 1)
        n = p * int(torch.tensor(coarse_shape).prod())
        h = cfg.affine_hidden
        self.mlp = nn.Sequential(nn.Linear(n, h), nn.ReLU(inplace=True), nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, 12))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @staticmethod
    def matrix(params: torch.Tensor) -> torch.Tensor:
        """``(B, 12)`` -> ``(B, 4, 4)``: log-scales, log-shears, rotation vector, translation."""
        b = params.shape[0]
        sym = torch.zeros(b, 3, 3, dtype=params.dtype, device=params.device)
        idx = torch.arange(3, device=params.device)
        sym[:, idx, idx] = params[:, 0:3]
        upper = [(0, 1), (0, 2), (1, 2)]
        skew = torch.zeros_like(sym)
        for n, (i, j) in enumerate(upper):
            sym[:, i, j] = params[:, 3 + n]
            sym[:, j, i] = params[:, 3 + n]
            skew[:, i, j] = params[:, 6 + n]
            skew[:, j, i] = -params[:, 6 + n]
        linear = torch.linalg.matrix_exp(skew) @ torch.linalg.matrix_exp(sym)
        out = torch.eye(4, dtype=params.dtype, device=params.device).repeat(b, 1, 1)
        out[:, :3, :3] = linear
        out[:, :3, 3] = params[:, 9:12]
        return out

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([torch.cat([f1 - f2, f1 + f2], 1), torch.cat([f2 - f1, f1 + f2], 1)], 0)
        params = self.mlp(self.project(z).flatten(1))
        t_fwd, t_rev = self.matrix(params).chunk(2, 0)
        a = t_fwd @ torch.linalg.inv(t_rev)
        a_inv = t_rev @ torch.linalg.inv(t_fwd)
        return a, a_inv


def _affine_positions(matrix_vox: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Apply ``(B, 4, 4)`` voxel-space matrices to positions ``(B, 3, ...)``."""
    lin = matrix_vox[:, :3, :3].to(positions.dtype)
    t = matrix_vox[:, :3, 3].to(positions.dtype)
    return torch.einsum("bij,bj...->bi...", lin, positions) + t.view(-1, 3, 1, 1, 1)


def level_space(level_shape, factor: int) -> spaces.Space:
    """Voxels of feature level ``2^k = factor`` placed on the full-resolution voxel grid:
    start-aligned, level voxel ``j`` at full index ``(j + 0.5) factor - 0.5`` (shared outer faces)."""
    to_full = spaces.homogeneous(np.diag([float(factor)] * 3), [0.5 * factor - 0.5] * 3)
    return spaces.voxel_space(level_shape, affine=to_full)


def _to_level(u: torch.Tensor, level_shape, factor: int) -> torch.Tensor:
    """A full-resolution voxel field sampled at the level grid (:func:`level_space`; points past
    the end of an odd-sized grid, from "ceil" padding, take border values), in level voxel units."""
    if factor == 1:
        return u
    full = spaces.voxel_space(u.shape[2:])
    level = level_space(level_shape, factor)
    positions = spaces.coordinates(level, full, dtype=u.dtype, device=u.device).expand(u.shape[0], -1, -1, -1, -1)
    return spaces.rescale_displacement(spaces.sample(u, positions), full, level)


class SITReg(nn.Module):
    """The SITReg network on a fixed grid ``shape`` (odd sizes are padded per level, "ceil" mode)."""

    def __init__(self, cfg: SITRegConfig, shape: tuple[int, int, int], in_channels: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = tuple(int(s) for s in shape)
        self.encoder = Encoder(cfg, in_channels)
        self.heads = nn.ModuleList(
            [
                DenseHead(cfg.feature_channels[k], cfg.head_channels[k], cfg.convs_per_level, cfg.head_norm_groups)
                for k in range(cfg.levels)
            ]
        )
        self.affine = None
        if cfg.predict_affine:
            coarse = tuple(-(-s // 2 ** (cfg.levels - 1)) for s in self.shape)
            self.affine = HalfAffine(cfg.feature_channels[-1], coarse, cfg)

    def _invert(self, u: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return fields.invert(
            u,
            max_iterations=c.invert_max_iterations,
            tolerance=c.invert_tolerance,
            backward_max_iterations=c.invert_backward_max_iterations,
            backward_tolerance=c.invert_backward_tolerance,
        )

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, return_dense: bool = False):
        """``(phi_fwd, phi_inv)`` voxel displacements on the full grid (see the module docstring).

        With ``return_dense`` also the dense parts ``L o R^-1`` and ``R o L^-1`` (without the
        affine), which the regulariser uses when an affine stage is present.
        """
        if tuple(image1.shape[2:]) != self.shape or image1.shape != image2.shape:
            raise ValueError(f"inputs must both be (B, C, {self.shape}), got {tuple(image1.shape)} and {tuple(image2.shape)}")
        b = image1.shape[0]
        feats = self.encoder(torch.cat([image1, image2], 0))
        feats1 = [f[:b] for f in feats]
        feats2 = [f[b:] for f in feats]
        zeros = image1.new_zeros((b, 3) + self.shape)
        left, right, left_inv, right_inv = zeros, zeros, zeros, zeros
        identity = fields.identity_grid(self.shape, device=image1.device, dtype=image1.dtype)
        a_vox = a_inv_vox = None
        if self.affine is not None:
            a_n, a_inv_n = self.affine(feats1[-1], feats2[-1])
            # The half-affine was trained in SITReg's centred-normalised system.
            to_n = torch.as_tensor(spaces.centred_space(self.shape).from_voxel, device=a_n.device)
            from_n = torch.linalg.inv(to_n)
            a_vox = from_n @ a_n.double() @ to_n
            a_inv_vox = from_n @ a_inv_n.double() @ to_n
        for k in reversed(range(self.cfg.levels)):
            f1, f2 = feats1[k], feats2[k]
            level_shape = tuple(f1.shape[2:])
            first = k == self.cfg.levels - 1 and a_vox is None
            if not first:
                m1, m2 = left, right
                if a_vox is not None:
                    m1 = _affine_positions(a_vox, identity + left) - identity
                    m2 = _affine_positions(a_inv_vox, identity + right) - identity
                both = _to_level(torch.cat([m1, m2], 0), level_shape, 2**k)
                warped = fields.warp(torch.cat([f1, f2], 0), both)
                f1, f2 = warped[:b], warped[b:]
            z = torch.cat([torch.cat([f1 - f2, f1 + f2], 1), torch.cat([f2 - f1, f1 + f2], 1)], 0)
            factor = 2**k
            control = bspline_bound(factor) * torch.tanh(self.heads[k](z))
            # control points are in level voxels; full-resolution voxels are factor times smaller
            ab = bspline_upsample(control, factor)[..., : self.shape[0], : self.shape[1], : self.shape[2]] * factor
            ab_inv = self._invert(ab)
            u_a, u_b = ab[:b], ab[b:]
            inv_a, inv_b = ab_inv[:b], ab_inv[b:]
            d_fwd = fields.compose(u_a, inv_b)
            d_inv = fields.compose(u_b, inv_a)
            left = fields.compose(left, d_fwd)
            right = fields.compose(right, d_inv)
            left_inv = fields.compose(d_inv, left_inv)
            right_inv = fields.compose(d_fwd, right_inv)
        dense_fwd = fields.compose(left, right_inv)
        dense_inv = fields.compose(right, left_inv)
        if a_vox is None:
            phi_fwd, phi_inv = dense_fwd, dense_inv
        else:
            # A o dense o A: the inner A exactly by sampling at A x, the outer one analytically.
            inner_a = _affine_positions(a_vox, identity) - identity
            inner_a_inv = _affine_positions(a_inv_vox, identity) - identity
            w_fwd = fields.compose(dense_fwd, inner_a)
            w_inv = fields.compose(dense_inv, inner_a_inv)
            phi_fwd = _affine_positions(a_vox, identity + w_fwd) - identity
            phi_inv = _affine_positions(a_inv_vox, identity + w_inv) - identity
        if return_dense:
            return phi_fwd, phi_inv, dense_fwd, dense_inv
        return phi_fwd, phi_inv
