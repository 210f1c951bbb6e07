"""Deformation-training slices with their frozen diffusion features, computed once and reused.

Each step of the reference's deformation training draws fresh slices and runs both frozen
diffusion models on them: two passes for ``r`` (spec 2.4a) and two per DDIM step for the guided
pseudo-normal (2.4b). With the compact networks on a CPU that is ~97 % of a step. A bank
(``deformation.bank_slices`` > 0) makes ``bank_slices`` synthetic slices with their ``r`` (at a
uniform ``t`` per slice, as in training) and pseudo-normal once, in chunks of ``bank_chunk``
slices written to ``OUTPUT/feature_bank/`` (a chunk is deterministic in ``(seed, index)``, so an
interrupted or resumed run rebuilds only what is missing, and torchrun ranks share the work).
Batches are then drawn from the bank with left-right flips about the template midline (the
slice, ``r``, the pseudo-normal, the head mask and every landmark flipped together; both
diffusion models are trained with flips, so ``r`` of a flipped slice is its flipped ``r`` up to the
networks' symmetry error). ``bank_slices = 0`` keeps the reference's fresh features per step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress

from .config import MidlineConfig
from .diffusion import ddpm_scheduler, diffusion_noise, pseudo_normal, representation
from .headframe import head_mask
from .network import mirror_field, mirror_slices
from .synthetic import NormalHead, SliceBatch, synth_slices

FOLDER = "feature_bank"
#: How long a rank waits for another rank's chunks (seconds).
WAIT_FOR_RANKS_S = 6 * 3600.0


@dataclass
class DeformationSample:
    """What the deformation losses need for a batch of slices (pixels of the head frame).

    ``x``, ``r``, ``x_tilde``, ``mask``: ``(B, 1, N, N)`` (slice windowed to [-1, 1], the
    representation, the guided pseudo-normal, the head mask); ``landmarks`` ``(B, 4, 2)`` and
    ``midline`` ``(B, K, 2, 2)`` in slice pixels (i, j) as in :class:`SliceBatch`; ``mls_mm``
    ``(B,)`` case MLS; ``field`` the true field.
    """

    x: torch.Tensor
    r: torch.Tensor
    x_tilde: torch.Tensor
    mask: torch.Tensor
    landmarks: torch.Tensor
    midline: torch.Tensor
    mls_mm: torch.Tensor
    field: torch.Tensor  # (B, 2, N, N) the synthetic truth (slice pixels, channel 0 along i)

    def flipped(self, which: torch.Tensor, size: int) -> DeformationSample:
        """Left-right flip (array axis i, about the slice centre) of the samples where ``which``."""
        out = {f.name: getattr(self, f.name).clone() for f in fields(self)}
        for name in ("x", "r", "x_tilde", "mask"):
            out[name][which] = mirror_slices(out[name][which])
        out["field"][which] = mirror_field(out["field"][which])
        for name in ("landmarks", "midline"):
            points = out[name][which]
            points[..., 0] = (size - 1) - points[..., 0]
            out[name][which] = points
        return DeformationSample(**out)


def head_masks(hu: torch.Tensor) -> torch.Tensor:
    """Head masks ``(B, 1, N, N)`` float of HU slices ``(B, 1, N, N)``."""
    return torch.from_numpy(np.stack([head_mask(h[0].numpy()) for h in hu])[:, None].astype(np.float32))


@torch.no_grad()
def with_features(model, cfg: MidlineConfig, batch: SliceBatch, gen: torch.Generator, t: int | None = None) -> DeformationSample:
    """``r`` (at ``t``, default uniform per slice) and the pseudo-normal of ``batch`` from the frozen
    diffusion models of ``model`` (a :class:`~diffusionreg.midline.network.MidlineModel`)."""
    n = len(batch.x)
    steps = torch.randint(0, cfg.diffusion.timesteps, (n,), generator=gen) if t is None else torch.full((n,), t, dtype=torch.long)
    scheduler = ddpm_scheduler(cfg.diffusion)
    pool = cfg.frame.diffusion_pool
    r = representation(model.eps_normal, model.eps_all, scheduler, batch.x, steps, diffusion_noise(batch.x, pool, gen), pool)
    x_tilde = pseudo_normal(model.eps_normal, model.eps_all, cfg.diffusion, batch.x, diffusion_noise(batch.x, pool, gen), pool)
    return DeformationSample(
        x=batch.x,
        r=r,
        x_tilde=x_tilde,
        mask=head_masks(batch.hu),
        landmarks=batch.landmarks,
        midline=batch.midline,
        mls_mm=batch.mls_mm,
        field=batch.field,
    )


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk_{index:04d}.pt"


def make_chunk(path: Path, index: int, model, cfg: MidlineConfig, heads: list[NormalHead]) -> None:
    """Write chunk ``index`` of the bank (deterministic in ``cfg.seed`` and ``index``) to ``path``."""
    d = cfg.deformation
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + index)
    count = min(d.bank_chunk, d.bank_slices - index * d.bank_chunk)
    batch = synth_slices(heads, cfg.frame, cfg.synth, gen, count, midline_points=d.midline_points)
    sample = with_features(model, cfg, batch, gen)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # processes sharing the folder never collide
    torch.save({f.name: getattr(sample, f.name) for f in fields(sample)}, partial)
    partial.replace(path)  # a chunk is there whole or not at all


class FeatureBank:
    """A fixed set of :class:`DeformationSample` slices and batches drawn from it."""

    def __init__(self, samples: DeformationSample, size: int) -> None:
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples.x)

    def batch(self, gen: torch.Generator, count: int, flip_prob: float) -> DeformationSample:
        index = torch.randint(len(self), (count,), generator=gen)
        picked = DeformationSample(**{f.name: getattr(self.samples, f.name)[index] for f in fields(DeformationSample)})
        return picked.flipped(torch.rand(count, generator=gen) < flip_prob, self.size)

    @classmethod
    def build(
        cls,
        folder: Path,
        model,
        cfg: MidlineConfig,
        heads: list[NormalHead],
        rank: int = 0,
        world: int = 1,
        progress: Progress | None = None,
    ) -> FeatureBank:
        """Make the missing chunks this rank owns (``index % world == rank``), wait for the others,
        and load the whole bank."""
        d = cfg.deformation
        if d.bank_slices < 1 or d.bank_chunk < 1:
            raise InputError("midline config: deformation.bank_slices and bank_chunk must be >= 1 to build a bank")
        folder.mkdir(parents=True, exist_ok=True)
        chunks = -(-d.bank_slices // d.bank_chunk)
        paths = [chunk_path(folder, k) for k in range(chunks)]
        mine = [k for k in range(chunks) if k % world == rank and not paths[k].exists()]
        progress = progress or Progress("none")
        if mine:
            progress.log(f"feature bank: making {len(mine)} of {chunks} chunks of {d.bank_chunk} slices in {folder}")
        with progress.stage("feature bank", len(mine)) as stage:
            for k in mine:
                if paths[k].exists():  # made meanwhile by another process sharing the folder
                    stage.update(1, f"chunk {k + 1}/{chunks} (already there)")
                    continue
                make_chunk(paths[k], k, model, cfg, heads)
                stage.update(1, f"chunk {k + 1}/{chunks}")
        deadline = time.monotonic() + WAIT_FOR_RANKS_S
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                raise InputError(f"feature bank: other ranks' chunks never appeared in {folder}")
            time.sleep(2.0)
        parts = [torch.load(p, weights_only=True) for p in paths]
        samples = DeformationSample(**{f.name: torch.cat([part[f.name] for part in parts]) for f in fields(DeformationSample)})
        return cls(samples, cfg.frame.slice_size)
