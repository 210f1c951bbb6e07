"""The three midline trainings as adapters of the training engine (:mod:`diffusionreg.training`).

* ``diffusion-normal``: eps_normal on synthetic-free slices of the normal heads.
* ``diffusion-all``: eps_all on all slices: normal ones and synthetic mass effects
  (``diffusion.shifted_fraction`` of them, the README's oversampling of MLS cases).
  Both: epsilon MSE at uniform t, AdamW, EMA; augmentation: left-right flip and in-plane rotation
  (spec 2.2). Validation: the denoising loss on held-out heads at fixed noise.
* ``deformation``: the deformation network on ``[x, r]`` with both diffusion models frozen; per
  slice a synthetic mass effect (peak 0-15 mm, ``synth.zero_fraction`` of them 0), ``r`` at a
  uniform t and the guided pseudo-normal image (made once for a bank of slices when
  ``deformation.bank_slices`` > 0, :mod:`~diffusionreg.midline.feature_bank`); losses of spec 2.6 (image term ramped over the
  run, smoothness, landmarks at the falx points, the shifted landmark and ``midline_points`` more
  pairs along the displaced midline, the per-sample hinge). The exported network is the whole
  :class:`~diffusionreg.midline.network.MidlineModel` (what ``diffusionreg midline`` loads).
  Validation: slice-level read-out MAE (mm) and the bias on unshifted slices of held-out heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffusionreg.distributed import rank_and_world
from diffusionreg.errors import InputError
from diffusionreg.progress import Progress
from diffusionreg.training.batches import to_device
from diffusionreg.training.ema import EMA
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.lr import warmup_cosine
from diffusionreg.training.options import RunOptions

from .config import MidlineConfig
from .diffusion import NoisedBatch, build_unet, ddpm_scheduler, denoising_loss, draw_noise
from .feature_bank import FOLDER as FEATURE_BANK
from .feature_bank import DeformationSample, FeatureBank, with_features
from .headframe import intracranial_mask, midline_column
from .heads import brain_median_hu, pose_template, training_heads
from .losses import field_loss, hinge_loss, image_loss, landmark_loss, smoothness_loss
from .network import MidlineModel, integrate
from .readout import falx_rows, read_slice
from .synthetic import SliceBatch, synth_slices

STAGES = ("diffusion-normal", "diffusion-all", "deformation")
#: Fixed seed of the validation slices (the same slices at every validation).
VALIDATION_SEED = 4321
VALIDATION_BATCHES = 3


@dataclass
class MidlineTrainOptions:
    """What a midline training needs besides the run settings."""

    stage: str
    template_dir: Path
    config: MidlineConfig
    normal: list[Path] = field(default_factory=list)  # extra normal heads (the template is always in)
    val: list[Path] = field(default_factory=list)  # held-out normal heads
    eps_normal: Path | None = None  # trained weights (deformation stage)
    eps_all: Path | None = None
    pose_cache: Path | None = None  # JSON of the normal heads' poses, shared by the stages


def _flip(batch: SliceBatch, gen: torch.Generator, flip_prob: float) -> torch.Tensor:
    """Left-right flips (about the slice centre, the template midline) of the images (the
    rotation augmentation is part of the slices' residual pose)."""
    x = batch.x.clone()
    flips = torch.rand(len(x), generator=gen) < flip_prob
    x[flips] = torch.flip(x[flips], dims=[2])
    return x


def _load_unet(path: Path, cfg: MidlineConfig) -> torch.nn.Module:
    from safetensors.torch import load_file

    if path is None or not Path(path).exists():
        raise InputError(f"diffusion model weights not found: {path}")
    net = build_unet(cfg.diffusion)
    net.load_state_dict(load_file(str(path)))
    return net


def train(opts: MidlineTrainOptions, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train one stage (every rank under torchrun); returns the final summary."""
    if opts.stage not in STAGES:
        raise InputError(f"unknown midline stage {opts.stage!r}; use one of {', '.join(STAGES)}")
    cfg = opts.config
    progress = progress or Progress("none")
    val_set = {Path(p).resolve() for p in opts.val}
    normal = [p for p in opts.normal if Path(p).resolve() not in val_set]
    heads = training_heads(opts.template_dir, normal, cfg.inference, progress.log, opts.pose_cache)
    val_heads = (
        training_heads(opts.template_dir, list(opts.val), cfg.inference, progress.log, opts.pose_cache)[1:]
        if opts.val
        else heads[:1]
    )
    # Measurements calibrate a CT as the training heads were (MidlineInference.brain_median_hu).
    cfg = dataclasses.replace(
        cfg, inference=dataclasses.replace(cfg.inference, brain_median_hu=brain_median_hu(heads[0].volume.numpy()))
    )
    torch.manual_seed(cfg.seed)
    if opts.stage == "deformation":
        task = _deformation_task(opts, cfg, heads, val_heads, run, progress)
    else:
        task = _diffusion_task(opts, cfg, heads, val_heads)
    task.data = [str(opts.template_dir), *map(str, normal)]
    task.val_data = [str(p) for p in opts.val]
    return run_training(task, run, progress)


def _diffusion_task(opts: MidlineTrainOptions, cfg: MidlineConfig, heads, val_heads) -> TrainingTask:
    d = cfg.diffusion
    shifted = 0.0 if opts.stage == "diffusion-normal" else d.shifted_fraction
    synth = dataclasses.replace(cfg.synth, rotation_deg=d.rotate_deg)
    net = build_unet(d)
    scheduler = ddpm_scheduler(d)
    frame = cfg.frame.diffusion_frame()

    def draw(gen: torch.Generator) -> NoisedBatch:
        batch = synth_slices(heads, frame, synth, gen, d.batch_size, shifted_fraction=shifted, truth=False)
        return draw_noise(_flip(batch, gen, d.flip_prob), scheduler, gen)

    def loss(model, batch: NoisedBatch):
        return denoising_loss(model, scheduler, batch), {}

    @torch.no_grad()
    def validate(model) -> dict:
        model.eval()
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        losses = []
        for _ in range(VALIDATION_BATCHES):
            batch = synth_slices(val_heads, frame, cfg.synth, gen, d.batch_size, shifted_fraction=shifted, truth=False)
            losses.append(float(denoising_loss(model, scheduler, to_device(draw_noise(batch.x, scheduler, gen), device))))
        return {"val_loss": float(np.mean(losses))}

    return TrainingTask(
        name="midline",
        network=net,
        config_json=cfg.to_json(),
        optimizer=torch.optim.AdamW(net.parameters(), lr=d.lr, weight_decay=0.0),
        step=None,
        draw=draw,
        loss=loss,
        seed=cfg.seed + (0 if shifted == 0 else 1),
        modality="ct",
        ema=EMA(net, d.ema_beta, d.ema_power, d.ema_start),
        validate=validate,
        score=lambda m: m["val_loss"],
        description=f"{opts.stage}: {len(heads)} heads, {sum(p.numel() for p in net.parameters())} parameters",
        weights_metadata={"stage": opts.stage},
    )


def deformation_losses(model: MidlineModel, cfg: MidlineConfig, sample: DeformationSample, ramp: float):
    """Spec 2.6's total loss of a batch, its terms and the field (``ramp`` in [0, 1]: training
    progress)."""
    d, f = cfg.deformation, cfg.frame
    u = integrate(model.deform(torch.cat([sample.x, sample.r], 1)), d.squaring_steps)
    shifted = torch.cat([sample.landmarks[:, :3], sample.midline[:, :, 0]], 1)
    targets = torch.cat(
        [
            torch.zeros_like(sample.landmarks[:, :2]),
            (sample.landmarks[:, 3] - sample.landmarks[:, 2])[:, None],
            sample.midline[:, :, 1] - sample.midline[:, :, 0],
        ],
        1,
    )
    terms = {
        "image": image_loss(sample.x, sample.x_tilde, u, sample.mask),
        "smooth": smoothness_loss(u),
        "landmark": landmark_loss(u, shifted, targets, d.landmark_delta_px),
        "hinge": hinge_loss(u, sample.mls_mm / f.pixel_mm),
    }
    if d.field_weight:
        terms["field"] = field_loss(u, sample.field, d.landmark_delta_px)
    total = (
        d.image_weight * (1.0 + d.image_weight_ramp * ramp) * terms["image"]
        + d.smooth_weight * terms["smooth"]
        + d.landmark_weight * terms["landmark"]
        + d.hinge_weight * terms["hinge"]
        + d.field_weight * terms.get("field", 0.0)
    )
    return total, terms, u


def read_batch(u: torch.Tensor, hu: torch.Tensor, cfg: MidlineConfig) -> list[float]:
    """Slice MLS (frame mm) read from fields ``(B, 2, N, N)`` with the slices' HU for the brain."""
    f = cfg.frame
    column = midline_column(f)
    out = []
    for k in range(len(u)):
        rows = falx_rows(intracranial_mask(hu[k, 0].numpy()), column, f.falx_margin_mm / f.pixel_mm)
        if rows is None:
            out.append(0.0)
            continue
        out.append(read_slice(u[k].detach().numpy(), column, rows, (f.pixel_mm, f.pixel_mm), f.midline_band_mm).mls_mm)
    return out


def _deformation_task(
    opts: MidlineTrainOptions, cfg: MidlineConfig, heads, val_heads, run: RunOptions, progress: Progress
) -> TrainingTask:
    d = cfg.deformation
    template = pose_template(opts.template_dir)
    model = MidlineModel(cfg, template.shape)
    model.set_template(torch.from_numpy(template.array), template.affine)
    model.eps_normal.load_state_dict(_load_unet(opts.eps_normal, cfg).state_dict())
    model.eps_all.load_state_dict(_load_unet(opts.eps_all, cfg).state_dict())
    model.freeze_diffusion()
    optimizer = torch.optim.AdamW(model.deform.parameters(), lr=d.lr, weight_decay=0.0)

    def progress_fraction() -> float:
        states = [s for s in optimizer.state.values() if "step" in s]
        return min(1.0, float(states[0]["step"]) / run.steps) if states else 0.0

    bank: list[FeatureBank] = []  # made on the first step, after the engine's checks of the run folder

    def draw(module, gen) -> DeformationSample:
        if d.bank_slices == 0:
            batch = synth_slices(heads, cfg.frame, cfg.synth, gen, d.batch_size, midline_points=d.midline_points)
            return with_features(module, cfg, batch, gen)
        if not bank:
            rank, world = rank_and_world()
            bank.append(FeatureBank.build(run.output / FEATURE_BANK, module, cfg, heads, rank, world, progress))
        return bank[0].batch(gen, d.batch_size, d.flip_prob)

    def step(module, gen):
        module.freeze_diffusion()  # the engine puts every submodule in train mode
        total, terms, _ = deformation_losses(module, cfg, draw(module, gen), progress_fraction())
        return total, {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def validate(exported) -> dict:
        exported.eval()
        gen = torch.Generator().manual_seed(VALIDATION_SEED)
        errors, normals = [], []
        for _ in range(VALIDATION_BATCHES):
            batch = synth_slices(val_heads, cfg.frame, cfg.synth, gen, d.batch_size, z_range=cfg.frame.measured_z_mm)
            sample = with_features(exported, cfg, batch, gen, cfg.diffusion.representation_t)
            _, _, u = deformation_losses(exported, cfg, sample, 1.0)
            read = np.asarray(read_batch(u, batch.hu, cfg))
            truth = batch.slice_mls_mm.numpy()
            errors += list(np.abs(read - truth))
            normals += list(read[truth < 0.5])
        return {
            "slice_mae_mm": float(np.mean(errors)),
            "normal_mean_mm": float(np.mean(normals)) if normals else float("nan"),
        }

    return TrainingTask(
        name="midline",
        network=model,
        config_json=cfg.to_json(),
        optimizer=optimizer,
        step=step,
        lr_factor=(lambda s: warmup_cosine(s, 0, run.steps)) if d.lr_schedule == "cosine" else None,
        seed=cfg.seed + 2,
        modality="ct",
        validate=validate,
        score=lambda m: m["slice_mae_mm"],
        description=f"deformation: {len(heads)} heads, {sum(p.numel() for p in model.deform.parameters())} parameters",
        weights_metadata={"stage": "deformation"},
    )
