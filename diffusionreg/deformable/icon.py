"""Two-step inverse-consistent registration network (Unleashing Registration, ConstrICON idea).

Per step ``s`` a MONAI UNet ``U_s`` (2 -> 3 channels) runs on both input orders;
``a = 0.35 tanh(U_s([A, B]))``, ``b = 0.35 tanh(U_s([B, A]))`` (:func:`.losses.normalised_space` units:
the torch ``align_corners=False`` scale, components in array order) and the velocity ``v_s = Up(P(a - b))`` is antisymmetric by
construction (``P``: two 7^3 stride-2 box pools, then two stride-1 ones; ``Up``: trilinear).
``exp`` is scaling and squaring (12 squarings). After step 1 both images move half-way
(``A' = A o exp(v1/2)``, ``B' = B o exp(-v1/2)``, detached); step 2 registers them; the result

    Phi = exp(v1/2) o exp(v2) o exp(v1/2),   Phi^-1 = exp(-v1/2) o exp(-v2) o exp(-v1/2)

satisfies ``warp(A, Phi) ~ B`` and is inverse consistent by construction. Fields are voxel
displacements on the network grid (:mod:`diffusionreg.fields` conventions); channel ``c`` of
the UNet output is taken along array axis ``c``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusionreg import fields

from .config import ICONConfig
from .losses import from_normalised, icon_regulariser, similarity_loss


def _unet(cfg: ICONConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=3,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        kernel_size=cfg.unet_kernel_size,
        up_kernel_size=cfg.unet_up_kernel_size,
        num_res_units=cfg.unet_num_res_units,
        act=cfg.unet_act,
        norm=cfg.unet_norm,
        dropout=cfg.unet_dropout,
        bias=cfg.unet_bias,
        adn_ordering=cfg.unet_adn_ordering,
    )


class TwoStepICON(nn.Module):
    """``TwoStepICON(A, B) -> (Phi, Phi^-1)`` voxel displacements, ``warp(A, Phi) ~ B``."""

    def __init__(self, cfg: ICONConfig, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.shape = tuple(int(s) for s in shape)
        self.nets = nn.ModuleList([_unet(cfg) for _ in range(cfg.steps)])

    def velocity(self, step: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Antisymmetric smoothed velocity (voxels) of step ``step`` for the pair ``(a, b)``."""
        n = a.shape[0]
        out = self.nets[step](torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)], 0))
        out = self.cfg.output_bound * torch.tanh(out)
        d = out[:n] - out[n:]
        k = self.cfg.smoothing_kernel
        for stride in (2, 2, 1, 1):
            d = F.avg_pool3d(d, k, stride=stride, padding=k // 2)
        d = F.interpolate(d, size=self.shape, mode="trilinear", align_corners=False)
        return from_normalised(d)

    def _exp_pair(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(exp(v), exp(-v))``; with ``exp_factor > 1`` squared on a coarser grid and resized
        (the velocity is smooth at 1/4 resolution, so little is lost; a CPU economy)."""
        both = torch.cat([v, -v], 0)
        f = self.cfg.exp_factor
        if f > 1:
            coarse = tuple(max(s // f, 2) for s in self.shape)
            both = fields.resize_field(fields.exp_velocity(fields.resize_field(both, coarse), self.cfg.squarings), self.shape)
        else:
            both = fields.exp_velocity(both, self.cfg.squarings)
        return both[: v.shape[0]], both[v.shape[0] :]

    def forward(self, image1: torch.Tensor, image2: torch.Tensor):
        v1 = self.velocity(0, image1, image2)
        if self.cfg.steps == 1:
            return self._exp_pair(v1)
        h, h_inv = self._exp_pair(0.5 * v1)
        mid1 = fields.warp(image1, h)
        mid2 = fields.warp(image2, h_inv)
        v2 = self.velocity(1, mid1, mid2)
        e, e_inv = self._exp_pair(v2)
        phi = fields.compose(fields.compose(h, e), h)
        phi_inv = fields.compose(fields.compose(h_inv, e_inv), h_inv)
        return phi, phi_inv

    @torch.no_grad()
    def advance(self, image1: torch.Tensor, image2: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair after the first ``steps`` steps, each moving both images half-way (no
        gradient): what step ``steps`` registers in :meth:`forward` and :meth:`step_losses`."""
        a, b = image1, image2
        for step in range(steps):
            h, h_inv = self._exp_pair(0.5 * self.velocity(step, a, b))
            a, b = fields.warp(a, h), fields.warp(b, h_inv)
        return a, b

    def step_losses(
        self, image1: torch.Tensor, image2: torch.Tensor, similarity: str, weight: float, window: int = 7, first_step: int = 0
    ) -> list[torch.Tensor]:
        """Greedy per-step losses (the midpoint images are detached between steps) of the steps
        from ``first_step`` on; then ``image1``, ``image2`` are the pair :meth:`advance` gives."""
        losses = []
        a, b = image1, image2
        for step in range(first_step, self.cfg.steps):
            v = self.velocity(step, a, b)
            fwd, bwd = self._exp_pair(v)
            loss = (
                similarity_loss(fields.warp(a, fwd), b, similarity, window)
                + similarity_loss(fields.warp(b, bwd), a, similarity, window)
                + weight * (icon_regulariser(fwd) + icon_regulariser(bwd))
            )
            losses.append(loss)
            if step + 1 < self.cfg.steps:
                with torch.no_grad():
                    h, h_inv = self._exp_pair(0.5 * v.detach())
                    a, b = fields.warp(a, h), fields.warp(b, h_inv)
        return losses
