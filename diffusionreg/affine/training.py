"""Self-supervised training of the spatial-diffusion affine network (an adapter of the training engine).

Per sample: a training volume (on a canonical grid of twice the network resolution, same
field of view) gets a shared global augmentation (rotation, scale, shift, gamma) while it is
sampled onto the network grid; the fixed and moving copies then get independent artifacts
and crops; the moving copy is warped by a one-jump forward sample M at a random t; the target
is M^-1 and the loss the mean Frobenius norm. Adam with warm-up + cosine LR, gradient norm
clipped at 1, EMA; validation: loss + recovery error in mm of random known affines on held-back
volumes (best = lowest mean recovery error). Checkpoints, resume, DDP, export and progress are
the engine's (:mod:`diffusionreg.training`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusionreg.errors import InputError
from diffusionreg.image import read_image
from diffusionreg.progress import Progress
from diffusionreg.spaces import coordinates, sample_affine, torch_space
from diffusionreg.training.ema import EMA
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.export import export_weights as _export_weights
from diffusionreg.training.lr import warmup_cosine
from diffusionreg.training.options import RunOptions

from .artifacts import apply_artifacts
from .config import AffineConfig
from .network import AffineDiffusionNet, count_parameters
from .preprocess import foreground_centroid, network_filter, network_grid, network_window, to_network
from .reverse import reverse_process
from .sampling import (
    euler_rotation,
    frobenius_loss,
    sample_forward,
    sample_uniform_affine,
    warp,
)
from .schedule import Schedule

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


# --- data ---------------------------------------------------------------------------------
def list_volumes(paths) -> list[Path]:
    """Files given directly, or every image file of given folders (sorted). Files whose name
    contains 'seg', 'aseg', 'label', 'mask' or 'maxprob' are skipped in folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                name = f.name.lower()
                if name.endswith(VOLUME_SUFFIXES) and not any(s in name for s in ("seg", "label", "mask", "maxprob")):
                    out.append(f)
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"training data not found: {p}")
    if not out:
        raise InputError("no training volumes found in " + ", ".join(map(str, paths)))
    return out


def load_subject(path: Path, cfg: AffineConfig, modality: str = "mri") -> torch.Tensor:
    """(1, 2S, 2S, 2S) tensor in [-1, 1] at half the network spacing (same field of view as
    the network grid), centred on the intensity centroid, canonical LPS orientation.
    Anti-aliased for the network spacing; intensity window and venous CLAHE as at inference
    (``network_window``, ``to_network``)."""
    image = read_image(path, what="training volume", dtype=np.float32)
    window = network_window(image.array, cfg, modality)
    centre = foreground_centroid(image, window)
    grid = network_grid(cfg, centre, size=2 * cfg.grid_size, spacing=cfg.spacing_mm / 2)
    return torch.from_numpy(to_network(image, grid, cfg, window, modality).array)[None]


def batch_loss(model: torch.nn.Module, batch, cfg: AffineConfig, modality: str) -> torch.Tensor:
    """Training loss of a :func:`make_batch` batch: the network sees its input through the same
    filter as at inference (the Gabor bank for OCT/OCTA, ``network_filter``)."""
    x, t, cls, target, _ = batch
    return frobenius_loss(model(x, t, cls if cfg.n_classes > 1 else None, network_filter(modality)), target)


def _global_theta(cfg: AffineConfig, gen: torch.Generator) -> torch.Tensor:
    """Shared augmentation as a normalised (3,4) matrix: rotation (about the configured
    axes; x, y, z are the torch axes k, j, i), isotropic scale, shift in voxels / (S/2)."""
    ang = torch.zeros(3, dtype=torch.float64)
    lim = math.radians(cfg.global_rotation_deg)
    for a, name in enumerate("xyz"):
        if name in cfg.global_rotation_axes:
            ang[a] = (torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1) * lim
    lo, hi = cfg.global_scale
    scale = lo + (hi - lo) * float(torch.rand((), generator=gen))
    rot = euler_rotation(ang[None])[0] * scale
    shift = (torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1) * cfg.global_shift_vox
    theta = torch.zeros(3, 4, dtype=torch.float64)
    theta[:, :3] = rot
    theta[:, 3] = shift / (cfg.grid_size / 2)
    return theta


def make_batch(
    subjects: list[torch.Tensor],
    cfg: AffineConfig,
    sched: Schedule,
    gen: torch.Generator,
    modality: str = "mri",
    batch_size: int | None = None,
):
    """Returns (x (B,2,S,S,S), t (B,), cls (B,), target (B,3,4), M (B,4,4))."""
    b = batch_size or cfg.batch_size
    s = cfg.grid_size
    fixed, moving = [], []
    for _ in range(b):
        vol = subjects[int(torch.randint(len(subjects), (), generator=gen))]
        theta = _global_theta(cfg, gen).float()[None]
        base = sample_affine((vol[None] + 1) / 2, theta, torch_space((s, s, s)))[0]
        g_lo, g_hi = cfg.gamma_range
        gamma = g_lo + (g_hi - g_lo) * float(torch.rand((), generator=gen))
        base = base.clamp(0, 1) ** gamma * 2 - 1
        for out in (fixed, moving):
            v = apply_artifacts(base, cfg, gen, modality)
            if cfg.noise_std > 0:
                v = v + cfg.noise_std * torch.randn(v.shape, generator=gen)
            out.append(v.clamp(-1, 1))
    fixed_t = torch.stack(fixed)
    moving_t = torch.stack(moving)
    t = torch.randint(1, cfg.timesteps + 1, (b,), generator=gen)
    mat, target = sample_forward(t, sched, (s, s, s), cfg.affine_prob, cfg.clamp_sigmas, gen)
    moving_t = warp(moving_t, mat)
    cls = torch.full((b,), cfg.class_index(modality), dtype=torch.long)
    if cfg.n_classes > 1 and cfg.class_dropout > 0:
        drop = torch.rand((b,), generator=gen) < cfg.class_dropout
        cls = torch.where(drop, torch.zeros_like(cls), cls)
    return torch.cat([fixed_t, moving_t], 1), t, cls, target, mat


# --- validation ------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    net,
    subjects,
    cfg,
    sched,
    n_loss: int = 8,
    n_recover: int = 4,
    steps: int | None = None,
    seed: int = 1234,
    modality: str = "mri",
) -> dict:
    """Single-step loss at random t and recovery error (mm) of random known affines
    (magnitude up to 1.2 Sigma(T)) by the reverse process, on held-back volumes."""
    gen = torch.Generator().manual_seed(seed)
    net.eval()
    loss = float(batch_loss(net, make_batch(subjects, cfg, sched, gen, modality, batch_size=n_loss), cfg, modality))
    s = cfg.grid_size
    errs = []
    half_mm = s * cfg.spacing_mm / 2  # normalised unit in mm (cubic grid)
    for i in range(n_recover):
        vol = subjects[i % len(subjects)]
        base = F.interpolate(vol[None], size=(s, s, s), mode="trilinear", align_corners=False)
        mat = sample_uniform_affine(1, sched, (s, s, s), generator=gen)
        moving = warp(base, mat)
        comp, _ = reverse_process(net, base, moving, sched, steps, preprocess=network_filter(modality))
        truth = torch.linalg.inv(mat)
        # displacement error over brain voxels of the fixed grid
        pts = coordinates(torch_space((s, s, s)), dtype=torch.float64).movedim(1, -1)
        mask = base[0, 0] > -0.8
        p = pts[0][mask]
        ph = torch.cat([p, torch.ones(len(p), 1, dtype=torch.float64)], 1)
        d = (ph @ (comp[0] - truth[0])[:3].T).norm(dim=1) * half_mm
        errs.append(float(d.mean()))
    return {
        "val_loss": loss,
        "recovery_mm_mean": float(np.mean(errs)),
        "recovery_mm_median": float(np.median(errs)),
        "recovery_mm_max": float(np.max(errs)),
    }


# --- the adapter --------------------------------------------------------------------------------
#: Gradient norm clip of the affine network (stabilises the first steps at high t).
CLIP_GRAD_NORM = 1.0


def export_weights(
    model: torch.nn.Module, cfg: AffineConfig, out_dir: Path, name: str = "model", meta: dict | None = None
) -> Path:
    """Write ``name.safetensors`` + ``config.json`` of an affine network (atomic)."""
    return _export_weights(model, cfg.to_json(), out_dir, name, {"task": "affine", **(meta or {})})


@dataclass
class TrainOptions:
    """What the affine training needs besides the run settings (:class:`RunOptions`)."""

    data: list[str]
    config: AffineConfig
    modality: str = "mri"
    val: list[str] | None = None  # held-back volumes (files or folders)
    val_recover: int = 4  # known affines recovered per validation


def train(opts: TrainOptions, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train (every rank under torchrun); returns the final summary. Rank 0 writes ``run.output``
    (see :func:`diffusionreg.training.engine.run_training`); the exported weights are the EMA's."""
    cfg = opts.config
    files = list_volumes(opts.data)
    val_files = list_volumes(opts.val) if opts.val else []
    val_set = {f.resolve() for f in val_files}
    files = [f for f in files if f.resolve() not in val_set]
    if not files:
        raise InputError("every training volume is also a validation volume")
    subjects = [load_subject(f, cfg, opts.modality) for f in files]
    val_subjects = [load_subject(f, cfg, opts.modality) for f in val_files] or subjects[:1]
    sched = Schedule.from_config(cfg)

    torch.manual_seed(cfg.seed)
    net = AffineDiffusionNet(cfg)

    def step(model: torch.nn.Module, gen: torch.Generator):
        return batch_loss(model, make_batch(subjects, cfg, sched, gen, opts.modality), cfg, opts.modality), {}

    task = TrainingTask(
        name="affine",
        network=net,
        config_json=cfg.to_json(),
        seed=cfg.seed,
        modality=opts.modality,
        optimizer=torch.optim.Adam(net.parameters(), lr=cfg.lr),
        step=step,
        lr_factor=lambda s: warmup_cosine(s, cfg.warmup_steps, run.steps),
        ema=EMA(net, cfg.ema_beta, cfg.ema_power, cfg.ema_start),
        clip_grad_norm=CLIP_GRAD_NORM,
        validate=lambda model: validate(model, val_subjects, cfg, sched, n_recover=opts.val_recover, modality=opts.modality),
        score=lambda m: m["recovery_mm_mean"],
        description=(
            f"{len(files)} volumes ({', '.join(f.name for f in files)}); validation: "
            f"{', '.join(f.name for f in val_files) or '(train[0])'}; {count_parameters(net)} "
            f"parameters; config {cfg.name}"
        ),
        data=list(opts.data),
        val_data=list(opts.val or []),
    )
    return run_training(task, run, progress)
