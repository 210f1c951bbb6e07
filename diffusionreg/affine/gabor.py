"""OCT / OCTA preprocessing: a two-kernel 3D cosine Gabor bank then binarisation.

Kernels 5x5x5, theta = pi/2 (along x) and 0 (along y), phi = 0, k = pi; envelope
exp(-w^2/(8 k^2) (4 x'^2 + y'^2 + z'^2)), carrier cos(w x'), each normalised to sum 1.
w = 0.5 (OCT) / 0.95 (OCTA); thresholds -0.4 / -0.5 in [-1, 1] space; output in {-1, +1}.
Coordinates (x, y, z) are torch's (last, middle, first) array axes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OMEGA = {"oct": 0.5, "octa": 0.95}
THRESHOLD = {"oct": -0.4, "octa": -0.5}


def gabor_kernel(omega: float, theta: float, size: int = 5, k: float = math.pi) -> torch.Tensor:
    """(size, size, size) kernel indexed [z, y, x]; rotation theta in the x-y plane."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    # theta = pi/2 -> carrier along x; theta = 0 -> along y
    xp = x * math.sin(theta) + y * math.cos(theta)
    yp = -x * math.cos(theta) + y * math.sin(theta)
    env = torch.exp(-(omega**2) / (8 * k**2) * (4 * xp**2 + yp**2 + z**2))
    kern = env * torch.cos(omega * xp)
    return (kern / kern.sum()).float()


class GaborBinarize(nn.Module):
    """Maps a (B,1,...) volume in [-1,1] to the binary {-1,+1} Gabor mask (oct/octa);
    other kinds pass through unchanged."""

    def __init__(self):
        super().__init__()
        for name, omega in OMEGA.items():
            bank = torch.stack([gabor_kernel(omega, math.pi / 2), gabor_kernel(omega, 0.0)])
            self.register_buffer(f"bank_{name}", bank[:, None], persistent=False)

    def forward(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        if kind not in OMEGA:
            return x
        x01 = (x + 1) / 2
        mn = x01.amin(dim=(2, 3, 4), keepdim=True)
        mx = x01.amax(dim=(2, 3, 4), keepdim=True)
        x01 = (x01 - mn) / (mx - mn).clamp_min(1e-8)
        bank = getattr(self, f"bank_{kind}")
        resp = F.conv3d(x01.expand(-1, 2, -1, -1, -1), bank, padding=2, groups=2)
        resp = resp * 2 - 1
        best = resp.amax(dim=1, keepdim=True)
        return torch.where(best > THRESHOLD[kind], 1.0, -1.0).to(x.dtype)
