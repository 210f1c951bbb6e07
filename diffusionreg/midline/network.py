"""The deformation network (spec 2.5) and the shipped bundle of all three networks.

:class:`DeformationNet`: MONAI's 2D ``UNet`` on ``[x, r]`` (LeakyReLU 0.2, no normalisation)
gives full-resolution features; a 3x3 flow convolution (initialised N(0, ``flow_init_std``)) plus
coarse flow heads (features average-pooled by each factor, two convolutions, bilinear upsampling:
the spec's auxiliary 16^2 / 64^2 heads of a 256^2 input) make a stationary velocity in slice
pixels (channel 0 along i, 1 along j), integrated by scaling and squaring
(:func:`diffusionreg.fields.exp_velocity`, the slice as a one-voxel-thick volume).

:class:`MidlineModel`: eps_normal, eps_all, the deformation network and the pose template (HU
and its LPS affine, as buffers), so one sha256-verified file carries everything a measurement
needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from diffusionreg.fields import exp_velocity, warp

from .config import DeformationConfig, MidlineConfig
from .diffusion import build_unet

#: Feature channels the UNet hands to the flow heads.
FEATURES = 16
LEAKY_SLOPE = 0.2


def as_volume(u: torch.Tensor) -> torch.Tensor:
    """2D slice fields ``(B, 2, N, N)`` -> :mod:`diffusionreg.fields` volumes ``(B, 3, N, N, 1)``."""
    return torch.cat([u, torch.zeros_like(u[:, :1])], dim=1)[..., None]


def integrate(v: torch.Tensor, steps: int) -> torch.Tensor:
    """Displacement ``(B, 2, N, N)`` (pixels) of the time-1 flow of the velocity ``v``."""
    return exp_velocity(as_volume(v), steps)[:, :2, ..., 0]


def mirror_slices(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of slices ``(B, C, N, N)`` about the slice centre (array axis i; the
    head frame's midline is that centre)."""
    return torch.flip(x, dims=[2])


def mirror_field(u: torch.Tensor) -> torch.Tensor:
    """The mirrored image's field ``(B, 2, N, N)`` (pixels): positions mirrored and the i
    component negated, so ``mirror_field`` of the field of ``x`` is the field of ``mirror_slices(x)``."""
    out = mirror_slices(u).clone()
    out[:, 0] = -out[:, 0]
    return out


def warp_slices(image: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``image(p + u(p))`` for slices ``(B, C, N, N)`` and fields ``(B, 2, N, N)`` (pixels)."""
    return warp(image[..., None], as_volume(u))[..., 0]


class DeformationNet(nn.Module):
    """``[x, r]`` ``(B, 2, N, N)`` -> stationary velocity ``(B, 2, N, N)`` in pixels."""

    def __init__(self, cfg: DeformationConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(
            spatial_dims=2,
            in_channels=2,
            out_channels=FEATURES,
            channels=tuple(cfg.channels),
            strides=(2,) * (len(cfg.channels) - 1),
            act=("leakyrelu", {"negative_slope": LEAKY_SLOPE}),
            norm=None,
        )
        self.flow = nn.Conv2d(FEATURES, 2, 3, padding=1)
        self.coarse = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(FEATURES, FEATURES // 2, 3, padding=1),
                nn.LeakyReLU(LEAKY_SLOPE),
                nn.Conv2d(FEATURES // 2, 2, 3, padding=1),
            )
            for _ in cfg.coarse_factors
        )
        for conv in [self.flow, *(head[-1] for head in self.coarse)]:
            nn.init.normal_(conv.weight, std=cfg.flow_init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = F.leaky_relu(self.unet(inputs), LEAKY_SLOPE)
        velocity = self.flow(features)
        for factor, head in zip(self.cfg.coarse_factors, self.coarse):
            coarse = head(F.avg_pool2d(features, factor))
            velocity = velocity + F.interpolate(coarse, size=inputs.shape[2:], mode="bilinear", align_corners=False)
        return velocity


class MidlineModel(nn.Module):
    """Everything a measurement loads: the two diffusion models, the deformation network and the
    pose template (``template_hu`` on the grid ``template_affine``, voxel -> LPS)."""

    def __init__(self, cfg: MidlineConfig, template_shape: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.cfg = cfg
        self.eps_normal = build_unet(cfg.diffusion)
        self.eps_all = build_unet(cfg.diffusion)
        self.deform = DeformationNet(cfg.deformation)
        self.register_buffer("template_hu", torch.zeros(template_shape))
        self.register_buffer("template_affine", torch.eye(4, dtype=torch.float64))

    def set_template(self, hu: torch.Tensor, affine) -> None:
        self.template_hu = hu.float().clone()
        self.template_affine = torch.as_tensor(affine, dtype=torch.float64).clone()

    def freeze_diffusion(self) -> None:
        for net in (self.eps_normal, self.eps_all):
            net.requires_grad_(False)
            net.eval()

    @classmethod
    def from_state_dict(cls, cfg: MidlineConfig, state: dict) -> MidlineModel:
        model = cls(cfg, tuple(state["template_hu"].shape))
        model.load_state_dict(state)
        return model
