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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def representation(
    eps_normal: torch.nn.Module,
    eps_all: torch.nn.Module,
    scheduler: DDPMScheduler,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """``r = eps_normal(x_t, t) - eps_all(x_t, t)`` ``(B, 1, N, N)``, ``x_t`` from ``noise``."""
    x_t = scheduler.add_noise(x, noise, t)
    return eps_normal(x_t, t) - eps_all(x_t, t)


def pseudo_normal(
    eps_normal: torch.nn.Module,
    eps_all: torch.nn.Module,
    cfg: DiffusionConfig,
    x: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Guided DDIM from ``x`` noised to ``representation_t``: a shift-free looking ``x``."""
    ddpm, ddim = ddpm_scheduler(cfg), ddim_scheduler(cfg)
    start = cfg.representation_t
    sample = ddpm.add_noise(x, noise, torch.full((x.shape[0],), start, dtype=torch.long))
    for t in (int(v) for v in ddim.timesteps):
        if t > start:
            continue
        steps = torch.full((x.shape[0],), t, dtype=torch.long)
        guided = (1.0 + cfg.guidance) * eps_normal(sample, steps) - cfg.guidance * eps_all(sample, steps)
        sample, _ = ddim.step(guided, t, sample)
    return sample.clamp(-1.0, 1.0)
