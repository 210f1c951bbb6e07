"""Training of the deformable networks (an adapter of :mod:`diffusionreg.training`; torchrun/DDP).

Pairs are loaded once onto their network grids (:func:`.register.network_grid` of the fixed
image; the moving image resampled onto the same grid) and augmented on the fly per image:
random affine (probability ``augment_affine_prob``; translation std in normalised units,
rotation, log-scale, log-shear), a smooth random deformation (std ``augment_elastic_mm``) and,
for non-binary inputs, random gamma and scale. Each step takes the two images of a pair in a
random order (the methods are symmetric). The engine writes the run folder (checkpoint, latest
``model.safetensors``, ``best/`` with its registry entry, ``history.jsonl``).

Validation (zero-shot network, rank 0): landmark TRE in mm (when the pairs have
``case_XXX_landmarks_voxel.csv``), similarity, folding and inverse consistency; the best model
has the lowest TRE (mean L1 similarity without landmarks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusionreg import fields
from diffusionreg.distributed import rank_and_world
from diffusionreg.errors import InputError
from diffusionreg.image import IMAGE_SUFFIXES, read_image
from diffusionreg.progress import Progress
from diffusionreg.spaces import apply_affine, coordinates, rescale_displacement, sample, torch_space, voxel_space
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.options import RunOptions

from .config import DeformableConfig
from .register import (
    _sample_field,
    build_network,
    network_grid,
    pair_loss,
    to_network,
    triplet_loss,
)


# ----------------------------------------------------------------------------- data
def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def list_pairs(items: list[str]) -> list[tuple[Path, Path, Path | None]]:
    """``(fixed, moving, landmarks)`` triples from folders (``*_1``/``*_2`` files paired), explicit
    ``FIXED,MOVING`` items, or a list of single volumes (all ordered pairs among them)."""
    pairs: list[tuple[Path, Path, Path | None]] = []
    singles: list[Path] = []
    for item in items:
        if "," in item:
            a, b = (Path(p) for p in item.split(",", 1))
            for p in (a, b):
                if not _is_image(p):
                    raise InputError(f"training image not found: {p}")
            pairs.append((a, b, None))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_image(p))
            byname = {p.name: p for p in files}
            found = False
            for p in files:
                # case_XXX_1 / case_XXX_2 (Lung250M-4B) or pair_NNN_fixed / pair_NNN_moving (diffusionreg synth)
                m = re.match(r"(.*)_(1|fixed)(\.nii\.gz|\.nii|\.nrrd|\.mha)$", p.name)
                partner = m and f"{m.group(1)}_{'2' if m.group(2) == '1' else 'moving'}{m.group(3)}"
                if m and partner in byname:
                    lm = path / f"{m.group(1)}_landmarks_voxel.csv"
                    pairs.append((p, byname[partner], lm if lm.exists() else None))
                    found = True
            if not found:
                singles.extend(files)
        elif _is_image(path):
            singles.append(path)
        else:
            raise InputError(f"training data not found: {item}")
    for a in singles:
        for b in singles:
            if a != b:
                pairs.append((a, b, None))
    if not pairs:
        raise InputError("no training pairs found (give folders with *_1/*_2 files, FIXED,MOVING items or 2+ volumes)")
    return pairs


@dataclass
class LoadedPair:
    fixed: torch.Tensor  # (1, 1, *grid)
    moving: torch.Tensor
    grid: object
    landmarks: tuple[np.ndarray, np.ndarray] | None  # world mm (fixed, moving)
    name: str


def load_pair(fixed_path: Path, moving_path: Path, landmarks: Path | None, cfg: DeformableConfig) -> LoadedPair:
    fixed = read_image(fixed_path, what="fixed image")
    moving = read_image(moving_path, what="moving image")
    grid = network_grid(fixed, cfg)
    lms = None
    if landmarks is not None:
        from diffusionreg.evaluation import read_landmarks

        lm = read_landmarks(landmarks, fixed.grid, moving.grid)
        lms = (lm.fixed, lm.moving)
    return LoadedPair(to_network(fixed, grid, cfg), to_network(moving, grid, cfg), grid, lms, fixed_path.name.split(".")[0])


# ----------------------------------------------------------------------------- augmentation
def _random_affine(cfg: DeformableConfig, gen: torch.Generator) -> torch.Tensor:
    """A random ``(3, 4)`` affine in normalised coordinates (identity with prob 1 - p)."""
    if float(torch.rand((), generator=gen)) > cfg.augment_affine_prob:
        return torch.eye(3, 4)
    r = torch.randn(3, generator=gen) * math.radians(cfg.augment_rotation_deg)
    s = torch.randn(3, generator=gen) * cfg.augment_log_scale
    h = torch.randn(3, generator=gen) * cfg.augment_log_shear
    t = torch.randn(3, generator=gen) * cfg.augment_translation
    from .sitreg import HalfAffine

    m = HalfAffine.matrix(torch.cat([s, h, r, t])[None].double())[0].float()
    return m[:3]


def augment(image: torch.Tensor, cfg: DeformableConfig, gen: torch.Generator) -> torch.Tensor:
    """Random affine + smooth deformation (+ intensity) of a ``(1, 1, *grid)`` volume."""
    shape = image.shape[2:]
    theta = _random_affine(cfg, gen)[None]
    net_space = torch_space(shape)  # the augmentation matrix acts on align_corners=False coordinates
    positions = torch.einsum("bij,bj...->bi...", theta[:, :, :3], coordinates(net_space)) + theta[:, :, 3].view(1, 3, 1, 1, 1)
    if cfg.augment_elastic_mm > 0:
        coarse = torch.randn(1, 3, 5, 5, 5, generator=gen) * (cfg.augment_elastic_mm / cfg.spacing_mm)
        disp = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)  # voxels
        positions = positions + rescale_displacement(disp, voxel_space(shape), net_space)
    out = sample(image, positions, net_space, padding_mode="zeros")
    if cfg.augment_intensity and cfg.normalisation != "binary":
        gamma = float(torch.exp(torch.randn((), generator=gen) * 0.2))
        scale = float(1.0 + 0.1 * torch.randn((), generator=gen))
        out = out.clamp_min(0).pow(gamma) * scale
    return out


# ----------------------------------------------------------------------------- validation
def landmark_tre(u: torch.Tensor, grid, fixed_mm: np.ndarray, moving_mm: np.ndarray) -> np.ndarray:
    """Per-landmark TRE (mm): ``|G(x + u(x)) - p_moving|`` with ``x = G^-1 p_fixed``."""
    x = apply_affine(np.linalg.inv(grid.affine), fixed_mm)
    mapped = apply_affine(grid.affine, x + _sample_field(u, x))
    return np.linalg.norm(mapped - moving_mm, axis=1)


def validate(net: nn.Module, cfg: DeformableConfig, pairs: list[LoadedPair]) -> dict:
    net.eval()
    tre, tre0, sims, fold, ice = [], [], [], [], []
    with torch.no_grad():
        for pair in pairs:
            u, w = net(pair.moving, pair.fixed)
            warped = fields.warp(pair.moving, u)
            sims.append(float((warped - pair.fixed).abs().mean()))
            fold.append(float((fields.jacobian_determinant(u) <= 0).float().mean()) * 100)
            ice.append(float(fields.vector_length(fields.compose(u, w)).mean()) * cfg.spacing_mm)
            if pair.landmarks is not None:
                tre.extend(landmark_tre(u, pair.grid, *pair.landmarks).tolist())
                tre0.extend(np.linalg.norm(pair.landmarks[0] - pair.landmarks[1], axis=1).tolist())
    net.train()
    out = {"val_l1": float(np.mean(sims)), "val_folding_percent": float(np.mean(fold)), "val_ice_mm": float(np.mean(ice))}
    if tre:
        out.update(val_tre_mm=float(np.mean(tre)), val_tre_initial_mm=float(np.mean(tre0)))
    return out


# ----------------------------------------------------------------------------- training
class _LossModule(nn.Module):
    """Wraps the network so DDP sees one forward per step (the loss)."""

    def __init__(self, net: nn.Module, cfg: DeformableConfig) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, image3: torch.Tensor | None = None):
        if image3 is not None:
            return triplet_loss(self.net, self.cfg, image1, image2, image3)
        return pair_loss(self.net, self.cfg, image1, image2)


@dataclass
class TrainOptions:
    """What the deformable training needs besides the run settings (:class:`RunOptions`)."""

    pairs: list[str]
    config: DeformableConfig
    val_pairs: list[str] | None = None
    modality: str = "any"  # registry modality of the best model
    synthetic_pairs: list[str] | None = None  # generated pairs, drawn with probability config.synthetic_fraction


def _choose_source(real: list[LoadedPair], synthetic: list[LoadedPair], cfg: DeformableConfig, gen: torch.Generator):
    """The pairs of this step: synthetic ones with probability ``synthetic_fraction`` (when any)."""
    if synthetic and float(torch.rand((), generator=gen)) < cfg.synthetic_fraction:
        return synthetic
    return real


def _batch(data: list[LoadedPair], cfg: DeformableConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Augmented images of ``batch_size`` random pairs, each pair in a random order, plus (with the
    group-consistency term) a third image: the fixed image of another random pair (same grid shape;
    pairs have their own world placement, which the images do not carry)."""
    idx = torch.randint(len(data), (cfg.batch_size,), generator=gen).tolist()
    a, b = [], []
    for i in idx:
        first, second = data[i].moving, data[i].fixed
        if float(torch.rand((), generator=gen)) < 0.5:
            first, second = second, first
        a.append(augment(first, cfg, gen))
        b.append(augment(second, cfg, gen))
    images = [torch.cat(a), torch.cat(b)]
    if cfg.cycle_weight > 0:
        j = int(torch.randint(len(data), (1,), generator=gen))
        images.append(torch.cat([augment(data[j].fixed, cfg, gen) for _ in idx]))
    return images


def train(opts: TrainOptions, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train (every rank under torchrun); returns the final summary. Rank 0 validates and writes
    ``run.output`` (see :func:`diffusionreg.training.engine.run_training`)."""
    cfg = opts.config
    rank, _ = rank_and_world()
    data = [load_pair(a, b, lm, cfg) for a, b, lm in list_pairs(opts.pairs)]
    synthetic = [load_pair(a, b, None, cfg) for a, b, _ in list_pairs(opts.synthetic_pairs)] if opts.synthetic_pairs else []
    val_list = list_pairs(opts.val_pairs) if opts.val_pairs else []
    val = [load_pair(a, b, lm, cfg) for a, b, lm in val_list] if rank == 0 else []

    torch.manual_seed(cfg.seed)
    net = build_network(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    task = TrainingTask(
        name="deformable",
        network=net,
        config_json=cfg.to_json(),
        seed=cfg.seed,
        modality=opts.modality,
        optimizer=torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999)),
        train_module=_LossModule(net, cfg),
        step=lambda module, gen: module(*_batch(_choose_source(data, synthetic, cfg, gen), cfg, gen)),
        validate=(lambda model: validate(model, cfg, val)) if opts.val_pairs else None,
        score=lambda m: m.get("val_tre_mm", m["val_l1"]),
        description=(
            f"{cfg.method}, config {cfg.name}: {len(data)} pairs"
            + (f" + {len(synthetic)} synthetic pairs (drawn with probability {cfg.synthetic_fraction})" if synthetic else "")
            + f", {len(val_list)} validation pairs, {n_params} parameters"
        ),
        data=list(opts.pairs) + list(opts.synthetic_pairs or []),
        val_data=list(opts.val_pairs or []),
        weights_metadata={"method": cfg.method},
    )
    return run_training(task, run, progress)
