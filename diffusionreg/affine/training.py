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

import json
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
from diffusionreg.training.batches import to_device
from diffusionreg.training.ema import EMA
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.export import export_weights as _export_weights
from diffusionreg.training.lr import warmup_cosine
from diffusionreg.training.options import RunOptions
from diffusionreg.vocabulary import ANY_MODALITY, MODALITIES

from .artifacts import apply_artifacts
from .config import AffineConfig
from .contrast import remap_contrast
from .network import AffineDiffusionNet, count_parameters
from .preprocess import foreground_centroid, network_filter, network_grid, network_window, to_network
from .reverse import reverse_process
from .sampling import (
    euler_rotation,
    frobenius_loss,
    sample_forward,
    sample_uniform_affine,
    translation_to_normalized,
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
    """(1, 2 D0, 2 D1, 2 D2) tensor in [-1, 1] at half the network spacing (same field of view as
    the network grid, :func:`network_grid` with ``oversample=2``), centred on the intensity
    centroid, canonical LPS orientation.
    Anti-aliased for the network spacing; intensity window and venous CLAHE as at inference
    (``network_window``, ``to_network``)."""
    image = read_image(path, what="training volume", dtype=np.float32)
    window = network_window(image.array, cfg, modality)
    centre = foreground_centroid(image, window)
    grid = network_grid(cfg, centre, oversample=2)
    return torch.from_numpy(to_network(image, grid, cfg, window, modality).array)[None]


def batch_loss(model: torch.nn.Module, batch, cfg: AffineConfig, modality: str) -> torch.Tensor:
    """Training loss of a :func:`make_batch` batch: the network sees its input through the same
    filter as at inference (the Gabor bank for OCT/OCTA, ``network_filter``)."""
    x, t, cls, target, _ = batch
    return frobenius_loss(model(x, t, cls if cfg.n_classes > 1 else None, network_filter(modality)), target)


def _global_theta(cfg: AffineConfig, gen: torch.Generator) -> torch.Tensor:
    """Shared augmentation as a normalised (3,4) matrix: rotation (about the configured
    axes; x, y, z are the torch axes k, j, i), isotropic scale, shift in network voxels per axis
    (normalised by each axis' half size). The rotation acts on normalised coordinates, so on a
    per-axis grid it is a physical rotation only between axes of equal extent in mm (OCT: about
    y, the depth axis, between the two en-face axes)."""
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
    theta[:, 3] = translation_to_normalized(shift[None], cfg.grid_shape)[0]
    return theta


def make_batch(
    subjects: list[torch.Tensor],
    cfg: AffineConfig,
    sched: Schedule,
    gen: torch.Generator,
    modality: str = "mri",
    batch_size: int | None = None,
):
    """Returns (x (B,2,D0,D1,D2), t (B,), cls (B,), target (B,3,4), M (B,4,4)) on the network grid.

    ``cls`` is the class id of ``modality`` (:meth:`AffineConfig.class_index`) for every sample,
    except that with several classes each sample becomes class 0 (agnostic) with probability
    ``cfg.class_dropout``; such a sample's two copies get independent contrast changes
    (:func:`~.contrast.remap_contrast`)."""
    b = batch_size or cfg.batch_size
    shape = cfg.grid_shape
    conditional = cfg.n_classes > 1
    fixed, moving, classes = [], [], []
    for _ in range(b):
        vol = subjects[int(torch.randint(len(subjects), (), generator=gen))]
        agnostic = conditional and float(torch.rand((), generator=gen)) < cfg.class_dropout
        classes.append(0 if agnostic else cfg.class_index(modality))
        theta = _global_theta(cfg, gen).float()[None]
        base = sample_affine((vol[None] + 1) / 2, theta, torch_space(shape))[0]
        g_lo, g_hi = cfg.gamma_range
        gamma = g_lo + (g_hi - g_lo) * float(torch.rand((), generator=gen))
        base = base.clamp(0, 1) ** gamma * 2 - 1
        for out in (fixed, moving):
            v = remap_contrast(base, cfg, gen) if agnostic else base
            v = apply_artifacts(v, cfg, gen, modality)
            if cfg.noise_std > 0:
                v = v + cfg.noise_std * torch.randn(v.shape, generator=gen)
            out.append(v.clamp(-1, 1))
    fixed_t = torch.stack(fixed)
    moving_t = torch.stack(moving)
    t = torch.randint(1, cfg.timesteps + 1, (b,), generator=gen)
    mat, target = sample_forward(t, sched, shape, cfg.affine_prob, cfg.clamp_sigmas, gen)
    moving_t = warp(moving_t, mat)
    return torch.cat([fixed_t, moving_t], 1), t, torch.tensor(classes, dtype=torch.long), target, mat


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
    device = next(net.parameters()).device  # the draws stay on the CPU: the same numbers on any device
    batch = to_device(make_batch(subjects, cfg, sched, gen, modality, batch_size=n_loss), device)
    loss = float(batch_loss(net, batch, cfg, modality))
    shape = cfg.grid_shape
    errs = []
    # normalised unit in mm per component (x, y, z) = array axes (k, j, i)
    half_mm = torch.tensor([n * sp / 2 for n, sp in zip(shape, cfg.grid_spacing)][::-1], dtype=torch.float64)
    for i in range(n_recover):
        vol = subjects[i % len(subjects)]
        base = F.interpolate(vol[None], size=shape, mode="trilinear", align_corners=False)
        mat = sample_uniform_affine(1, sched, shape, generator=gen)
        moving = warp(base, mat)
        cls = torch.tensor([cfg.class_index(modality)], device=device) if cfg.n_classes > 1 else None
        comp, _ = reverse_process(net, base.to(device), moving.to(device), sched, steps, cls, preprocess=network_filter(modality))
        truth = torch.linalg.inv(mat)
        # displacement error over brain voxels of the fixed grid
        pts = coordinates(torch_space(shape), dtype=torch.float64).movedim(1, -1)
        mask = base[0, 0] > -0.8
        p = pts[0][mask]
        ph = torch.cat([p, torch.ones(len(p), 1, dtype=torch.float64)], 1)
        d = ((ph @ (comp[0] - truth[0])[:3].T) * half_mm).norm(dim=1)
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


@dataclass(frozen=True)
class TrainingSet:
    """One dataset of a training: volumes (files or folders) of one modality."""

    data: list[str]
    modality: str = "mri"
    val: list[str] | None = None  # held-back volumes of this modality (files or folders)


def read_manifest(path: Path) -> list[TrainingSet]:
    """The datasets of a manifest ``{"datasets": [{"data": [...], "modality": "ct", "val": [...]}]}``
    (``val`` optional; relative paths are relative to the manifest's folder)."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))["datasets"]
        if not isinstance(records, list) or not records:
            raise ValueError("'datasets' must be a non-empty list")
        sets = []
        for record in records:
            unknown = set(record) - {"data", "modality", "val"}
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r} in a dataset")
            if record.get("modality") not in MODALITIES or record["modality"] == ANY_MODALITY:
                raise ValueError(f"modality {record.get('modality')!r}: use one of {', '.join(MODALITIES[:-1])}")
            sets.append(
                TrainingSet(
                    [str(Path(path).parent / p) for p in _strings(record.get("data"), "data")],
                    record["modality"],
                    [str(Path(path).parent / p) for p in _strings(record["val"], "val")] if "val" in record else None,
                )
            )
        return sets
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"training manifest {path}: {error}") from None


def _strings(value, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a non-empty list of paths")
    return value


@dataclass
class TrainOptions:
    """What the affine training needs besides the run settings (:class:`RunOptions`).

    Several datasets train one conditional model as published: class ids 1..N follow the
    order of their (distinct) modalities, class 0 is the agnostic class (``class_dropout``), and
    each step draws its batch from one dataset chosen uniformly."""

    datasets: list[TrainingSet]
    config: AffineConfig
    val_recover: int = 4  # known affines recovered per validation and dataset


@dataclass
class _LoadedSet:
    spec: TrainingSet
    files: list[Path]
    val_files: list[Path]
    subjects: list[torch.Tensor]
    val_subjects: list[torch.Tensor]


def _load_set(spec: TrainingSet, cfg: AffineConfig) -> _LoadedSet:
    files = list_volumes(spec.data)
    val_files = list_volumes(spec.val) if spec.val else []
    val_set = {f.resolve() for f in val_files}
    files = [f for f in files if f.resolve() not in val_set]
    if not files:
        raise InputError(f"every {spec.modality} training volume is also a validation volume")
    subjects = [load_subject(f, cfg, spec.modality) for f in files]
    val_subjects = [load_subject(f, cfg, spec.modality) for f in val_files] or subjects[:1]
    return _LoadedSet(spec, files, val_files, subjects, val_subjects)


def _validate_sets(net, sets: list[_LoadedSet], cfg: AffineConfig, sched: Schedule, n_recover: int) -> dict:
    """:func:`validate` of each dataset with its modality; several: the means, and each
    dataset's recovery as ``recovery_mm_mean_<modality>``."""
    per = [validate(net, s.val_subjects, cfg, sched, n_recover=n_recover, modality=s.spec.modality) for s in sets]
    if len(per) == 1:
        return per[0]
    metrics = {key: float(np.mean([m[key] for m in per])) for key in per[0]}
    for loaded, m in zip(sets, per):
        metrics[f"recovery_mm_mean_{loaded.spec.modality}"] = m["recovery_mm_mean"]
    return metrics


def train(opts: TrainOptions, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train (every rank under torchrun); returns the final summary. Rank 0 writes ``run.output``
    (see :func:`diffusionreg.training.engine.run_training`); the exported weights are the EMA's,
    with a config whose ``class_names`` are the datasets' modalities."""
    if not opts.datasets:
        raise InputError("no training data given")
    cfg = opts.config.with_classes(s.modality for s in opts.datasets)
    sets = [_load_set(spec, cfg) for spec in opts.datasets]
    sched = Schedule.from_config(cfg)

    torch.manual_seed(cfg.seed)
    net = AffineDiffusionNet(cfg)

    def draw(gen: torch.Generator):
        # one dataset per step, as published (one modality's preprocessing per batch)
        chosen = sets[int(torch.randint(len(sets), (), generator=gen))] if len(sets) > 1 else sets[0]
        modality = chosen.spec.modality
        return make_batch(chosen.subjects, cfg, sched, gen, modality), modality

    def loss(model: torch.nn.Module, drawn):
        batch, modality = drawn
        return batch_loss(model, batch, cfg, modality), {}

    described = "; ".join(
        f"{s.spec.modality}: {len(s.files)} volumes ({', '.join(f.name for f in s.files)}), validation "
        f"{', '.join(f.name for f in s.val_files) or '(train[0])'}"
        for s in sets
    )
    modalities = cfg.modalities
    task = TrainingTask(
        name="affine",
        network=net,
        config_json=cfg.to_json(),
        seed=cfg.seed,
        modality=modalities[0] if len(modalities) == 1 else ANY_MODALITY,
        modalities=modalities if len(modalities) > 1 else (),
        optimizer=torch.optim.Adam(net.parameters(), lr=cfg.lr),
        step=None,
        draw=draw,
        loss=loss,
        lr_factor=lambda s: warmup_cosine(s, cfg.warmup_steps, run.steps),
        ema=EMA(net, cfg.ema_beta, cfg.ema_power, cfg.ema_start),
        clip_grad_norm=CLIP_GRAD_NORM,
        validate=lambda model: _validate_sets(model, sets, cfg, sched, opts.val_recover),
        score=lambda m: m["recovery_mm_mean"],
        description=f"{described}; {count_parameters(net)} parameters; config {cfg.name}; classes {', '.join(modalities)}",
        data=[f"{p} ({s.modality})" for s in opts.datasets for p in s.data],
        val_data=[f"{p} ({s.modality})" for s in opts.datasets for p in (s.val or [])],
    )
    return run_training(task, run, progress)
