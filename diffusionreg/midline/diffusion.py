"""The two slice diffusion models (spec 2.3-2.4): eps_normal (normal heads only) and eps_all (all).

Both are MONAI ``DiffusionModelUNet`` (2D, one input channel, epsilon prediction) under MONAI's
DDPM schedule (linear beta ``beta_start..beta_end``, ``timesteps`` steps). Deviation from the
paper, stated: one output channel and the plain epsilon MSE (no learned-range variance / VLB
term), since DDIM with eta = 0 never uses the variance.

* :func:`representation`: ``r(x) = eps_normal(x_t, t) - eps_all(x_t, t)`` at a shared ``x_t``.
* :func:`pseudo_normal`: SDEdit-style guided DDIM: ``x`` noised to ``t0 = representation_t``,
  then deterministic DDIM steps on the ``ddim_grid`` grid from ``t0`` down to 0 (the reference
  noised at t0 but started one grid step lower; here it starts at t0) with
  ``eps = (1 + w) eps_normal - w eps_all`` and x0 clipped to [-1, 1].

With ``frame.diffusion_pool`` = p > 1 the diffusion models live on a coarser grid than the
deformation network: both functions take slices on the head frame's grid, average-pool them by p
(:func:`to_diffusion_grid`; the pooled pixel centres are those of a frame of ``N / p`` pixels of
``p * pixel_mm``, so diffusion models trained on that frame apply unchanged), and return their
result upsampled back (bilinear). Their noise is drawn on the diffusion grid
(:func:`diffusion_noise`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from .config import DiffusionConfig

SCHEDULE = "linear_beta"


def build_unet(cfg: DiffusionConfig) -> DiffusionModelUNet:
    """A 2D epsilon-prediction UNet of the configured widths."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        num_res_blocks=cfg.num_res_blocks,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        resblock_updown=True,
    )


def ddpm_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=SCHEDULE, beta_start=cfg.beta_start, beta_end=cfg.beta_end)


def ddim_scheduler(cfg: DiffusionConfig) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.timesteps, schedule=SCHEDULE, beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=True
    )
    scheduler.set_timesteps(cfg.ddim_grid)
    return scheduler


@dataclass
class NoisedBatch:
    """One denoising step's random numbers, drawn on the CPU: clean slices ``x`` (B, 1, N, N),
    the noise ``noise`` (same shape) and the timesteps ``t`` (B,)."""

    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


def draw_noise(x: torch.Tensor, scheduler: DDPMScheduler, gen: torch.Generator) -> NoisedBatch:
    """The noise and the uniform timesteps of a denoising step on ``x`` (noise first, then t)."""
    noise = torch.randn(x.shape, generator=gen)
    t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), generator=gen)
    return NoisedBatch(x, noise, t)


def denoising_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, batch: NoisedBatch) -> torch.Tensor:
    """Epsilon MSE (the training objective of both models), on the device of ``batch``."""
    return torch.mean((unet(scheduler.add_noise(batch.x, batch.noise, batch.t), batch.t) - batch.noise) ** 2)


def to_diffusion_grid(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Slices ``(B, C, N, N)`` average-pooled by ``pool`` (1: unchanged)."""
    return F.avg_pool2d(x, pool) if pool > 1 else x


def from_diffusion_grid(y: torch.Tensor, pool: int) -> torch.Tensor:
    """Diffusion-grid slices back on the frame's grid (bilinear; pixel centres as :func:`to_diffusion_grid`)."""
    return F.interpolate(y, scale_factor=pool, mode="bilinear", align_corners=False) if pool > 1 else y


def diffusion_noise(x: torch.Tensor, pool: int, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise of the diffusion-grid shape of slices ``x`` (on the CPU)."""
    b, c, h, w = x.shape
    return torch.randn((b, c, h // pool, w // pool), generator=gen)


def representation(
    eps_normal: torch.nn.Module,
    eps_all: torch.nn.Module,
    scheduler: DDPMScheduler,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    pool: int = 1,
) -> torch.Tensor:
    """``r = eps_normal(x_t, t) - eps_all(x_t, t)`` ``(B, 1, N, N)``, ``x_t`` from ``noise`` (on
    the diffusion grid of ``pool``)."""
    x_t = scheduler.add_noise(to_diffusion_grid(x, pool), noise, t)
    return from_diffusion_grid(eps_normal(x_t, t) - eps_all(x_t, t), pool)


def pseudo_normal(
    eps_normal: torch.nn.Module,
    eps_all: torch.nn.Module,
    cfg: DiffusionConfig,
    x: torch.Tensor,
    noise: torch.Tensor,
    pool: int = 1,
) -> torch.Tensor:
    """Guided DDIM from ``x`` noised to ``representation_t``: a shift-free looking ``x``."""
    ddpm, ddim = ddpm_scheduler(cfg), ddim_scheduler(cfg)
    x = to_diffusion_grid(x, pool)
    start = cfg.representation_t
    sample = ddpm.add_noise(x, noise, torch.full((x.shape[0],), start, dtype=torch.long))
    for t in (int(v) for v in ddim.timesteps):
        if t > start:
            continue
        steps = torch.full((x.shape[0],), t, dtype=torch.long)
        guided = (1.0 + cfg.guidance) * eps_normal(sample, steps) - cfg.guidance * eps_all(sample, steps)
        sample, _ = ddim.step(guided, t, sample)
    return from_diffusion_grid(sample.clamp(-1.0, 1.0), pool)
