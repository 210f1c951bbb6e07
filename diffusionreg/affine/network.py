"""AffineDiffusionNet: the spatial-diffusion affine predictor.

Input ``(B, 2, D0, D1, D2)``: channel 0 the fixed (reference) volume, channel 1 the moving
volume, both in [-1, 1] on the network grid (resized trilinearly to ``cfg.grid_shape`` if
needed; the shape may differ per axis). Output ``(B, 3, 4)``: [I | 0] + head, an affine in torch-normalised coordinates
(align_corners=False, (x, y, z) = array axes (k, j, i)) that maps fixed normalised points to
moving sample points, i.e. the transform that undoes the whole corruption.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AffineConfig
from .gabor import GaborBinarize


def _groups(channels: int, max_groups: int) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) integer timesteps -> (B, dim): dim/2 sin then dim/2 cos terms,
    frequencies exp(-i ln(1e4) / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class DownBlock(nn.Module):
    """Pre-activation residual block, stride 2: GN-SiLU-conv3/s2, + embedding,
    GN-SiLU-conv3/s1; residual MaxPool(2, ceil) + 1x1 conv when channels change."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, n_classes: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride=2, padding=1)
        self.emb = nn.Sequential(nn.GELU(), nn.Linear(emb_dim, c_out))
        self.class_emb = nn.Embedding(n_classes + 1, c_out) if n_classes > 1 else None
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, stride=1, padding=1)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cls: torch.Tensor | None):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)
        if self.class_emb is not None and cls is not None:
            e = e + self.class_emb(cls)
        h = h + e[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        r = self.skip(self.pool(x))
        if r.shape[2:] != h.shape[2:]:  # odd sizes: crop/pad the residual to match
            r = F.interpolate(r, size=h.shape[2:], mode="nearest")
        return h + r


class AffineDiffusionNet(nn.Module):
    """Time- (and optionally modality-) conditioned encoder predicting I + 3x4."""

    def __init__(self, cfg: AffineConfig):
        super().__init__()
        self.cfg = cfg
        w = list(cfg.widths)
        if w[0] != 2 or len(w) < 3:
            raise ValueError("widths must start with 2 input channels and have >= 3 entries")
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_hidden), nn.GELU(), nn.Linear(cfg.time_hidden, cfg.time_dim)
        )
        self.in_conv = nn.Conv3d(2, w[1], 4, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            DownBlock(w[i], w[i + 1], cfg.time_dim, cfg.norm_groups, cfg.n_classes) for i in range(1, len(w) - 1)
        )
        self.out_norm = nn.GroupNorm(_groups(w[-1], cfg.norm_groups), w[-1])
        self.head = nn.Conv3d(w[-1], 12, cfg.feature_shape)  # full-extent read-out
        if cfg.zero_init_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.gabor = GaborBinarize()
        self.register_buffer("identity", torch.eye(3, 4), persistent=False)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cls: torch.Tensor | None = None, preprocess: str | tuple[str, str] = "none"
    ) -> torch.Tensor:
        """x (B,2,...) in [-1,1]; t (B,) ints in 1..T; cls (B,) ints (0 = agnostic).
        preprocess: one type or (fixed_type, moving_type) among mri/ct/venous/none/oct/octa."""
        size = self.cfg.grid_shape
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        kinds = (preprocess, preprocess) if isinstance(preprocess, str) else preprocess
        if any(k in ("oct", "octa") for k in kinds):
            x = torch.cat([self.gabor(x[:, c : c + 1], kinds[c]) for c in range(2)], dim=1)
        emb = self.time_mlp(sinusoidal_embedding(t, self.cfg.time_dim))
        if cls is None and self.cfg.n_classes > 1:
            cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        h = self.in_conv(x)
        for block in self.blocks:
            h = block(h, emb, cls)
        h = self.head(F.silu(self.out_norm(h)))
        return self.identity + h.reshape(x.shape[0], 3, 4)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
