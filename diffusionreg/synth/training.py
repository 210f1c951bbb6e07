"""Training of the paired-data generator: ``--stage vqae`` then ``--stage prior`` (engine adapters).

* **vqae** (spec 1.4): random crops at the same place in both scans of a random training pair,
  jointly jittered by an affine whose 3x4 entries are perturbed by N(0, jitter^2) (linear
  interpolation: the framed maps are soft); loss ½CE_w + ½CE_w + vq_weight * VQ; EMA codebook with
  dead-code restarts. Validation: whole-frame soft Dice of the reconstruction and codebook use on
  the validation pairs (training pairs when none are given); the best model has the highest Dice.
* **prior** (spec 1.5): the trained VQ-AE (frozen) tokenises every training pair and
  ``augmentations_per_pair`` jittered copies of it -- ten real pairs are far too few token grids
  for a transformer, and jittered copies teach it the geometry varies -- then the absorbing-diffusion
  transformer trains on them with the weighted ELBO. The exported model holds both networks
  (``vqae.*`` and ``prior.*``), the training token grids (for novelty) and the canonical frame.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusionreg.errors import InputError
from diffusionreg.progress import Progress
from diffusionreg.spaces import sample_affine, torch_space
from diffusionreg.training.engine import TrainingTask, run_training
from diffusionreg.training.lr import warmup_cosine
from diffusionreg.training.options import RunOptions

from .config import SynthConfig
from .frame import FramedPair, canonical_grid, load_framed_pair
from .generator import PairGenerator
from .vqae import PairedVQAE, codebook_usage, reconstruction_loss, soft_dice, vessel_probabilities


@dataclass
class SynthTrainOptions:
    """What ``diffusionreg train synth`` trains on."""

    stage: str  # "vqae" or "prior"
    pairs: list[str]  # folders of case_XXX_1 / case_XXX_2 vessel maps (or FIXED,MOVING items)
    config: SynthConfig
    val_pairs: list[str] | None = None
    vqae: Path | None = None  # prior stage: the trained VQ-AE (folder or model.safetensors)
    modality: str = "lung-vessels"


def load_pairs(items: list[str], config: SynthConfig) -> list[FramedPair]:
    from diffusionreg.deformable.training import list_pairs

    return [load_framed_pair(a, b, config.frame) for a, b, _ in list_pairs(items)]


# ----------------------------------------------------------------------------- augmentation
def jitter(volumes: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Each ``(2, *frame)`` item of a batch resampled through its own affine: identity 3x4 with
    N(0, std^2) entries added, in ``align_corners=False`` normalised coordinates (spec 1.4)."""
    batch = volumes.shape[0]
    matrix = torch.eye(4).repeat(batch, 1, 1)
    matrix[:, :3, :] += torch.randn(batch, 3, 4, generator=generator) * std
    space = torch_space(tuple(volumes.shape[2:]))
    return sample_affine(volumes, matrix.double(), space, space, padding_mode="zeros")


def random_crops(volumes: torch.Tensor, crop: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """One crop per item, at the same place in both channels (a pair stays a pair)."""
    out = []
    for item in volumes:
        start = [int(torch.randint(s - c + 1, (1,), generator=generator)) for s, c in zip(item.shape[1:], crop)]
        out.append(item[:, start[0] : start[0] + crop[0], start[1] : start[1] + crop[1], start[2] : start[2] + crop[2]])
    return torch.stack(out)


def _stack(pairs: list[FramedPair]) -> torch.Tensor:
    return torch.from_numpy(np.stack([p.volumes for p in pairs]).astype(np.float32))


# ----------------------------------------------------------------------------- VQ-AE stage
class _VQAEStep(nn.Module):
    """One VQ-AE iteration (DDP wraps this): loss of a batch and, every ``restart_every`` calls,
    dead-code restarts from the batch's encoder outputs."""

    def __init__(self, model: PairedVQAE) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, batch: torch.Tensor, generator: torch.Generator):
        cfg = self.model.config
        logits, vq_loss, encodings = self.model(batch)
        rec = reconstruction_loss(logits, batch, cfg.class_weights)
        loss = rec + cfg.vq_weight * vq_loss
        self.calls += 1
        restarted = 0
        if cfg.restart_every and self.calls % cfg.restart_every == 0:
            restarted = self.model.restart_dead_codes(encodings, generator)
        with torch.no_grad():
            dice = soft_dice(vessel_probabilities(logits), batch).mean()
        return loss, {"rec": float(rec.detach()), "vq": float(vq_loss.detach()), "dice": float(dice), "restarted": restarted}


def validate_vqae(model: PairedVQAE, pairs: list[FramedPair]) -> dict:
    """Whole-frame reconstruction soft Dice (fixed and moving) and codebook use of ``pairs``."""
    model.eval()
    dices, tokens = [], []
    with torch.no_grad():
        for pair in pairs:
            volumes = _stack([pair])
            logits, _, _ = model(volumes)
            dices.append(soft_dice(vessel_probabilities(logits), volumes)[0])
            tokens.append(model.tokenise(volumes))
    model.train()
    dice = torch.stack(dices)
    usage = codebook_usage(torch.cat(tokens), model.config.num_embeddings)
    return {
        "val_dice_fixed": float(dice[:, 0].mean()),
        "val_dice_moving": float(dice[:, 1].mean()),
        "val_dice": float(dice.mean()),
        "codes_used": usage["codes_used"],
        "codebook_usage": usage["usage"],
        "perplexity": usage["perplexity"],
    }


def _train_vqae(opts: SynthTrainOptions, run: RunOptions, progress: Progress | None) -> dict:
    cfg = opts.config
    data = load_pairs(opts.pairs, cfg)
    val = load_pairs(opts.val_pairs, cfg) if opts.val_pairs else data
    volumes = _stack(data)
    torch.manual_seed(cfg.seed)
    model = PairedVQAE(cfg.vqae)
    v = cfg.vqae

    def step(module: nn.Module, generator: torch.Generator):
        pick = torch.randint(len(data), (v.batch_size,), generator=generator)
        batch = random_crops(jitter(volumes[pick], v.jitter, generator), v.crop, generator)
        return module(batch, generator)

    n_params = sum(p.numel() for p in model.parameters())
    task = TrainingTask(
        name="synth",
        network=model,
        config_json=_stage_config_json(cfg, "vqae", data),
        seed=cfg.seed,
        modality=opts.modality,
        optimizer=torch.optim.Adam(model.parameters(), lr=v.lr),
        train_module=_VQAEStep(model),
        step=step,
        lr_factor=lambda s: warmup_cosine(s, 100, run.steps),
        validate=lambda m: validate_vqae(m, val),
        score=lambda metrics: -metrics["val_dice"],
        description=(
            f"synth vqae, config {cfg.name}: {len(data)} pairs in a {cfg.frame.shape} frame at {cfg.frame.spacing_mm} mm, "
            f"{len(val)} validation pairs, {n_params} parameters, tokens {cfg.token_grid}"
        ),
        data=list(opts.pairs),
        val_data=list(opts.val_pairs or []),
        weights_metadata={"method": "synth-vqae"},
    )
    return run_training(task, run, progress)


def _stage_config_json(cfg: SynthConfig, stage: str, pairs: list[FramedPair]) -> str:
    """The config written beside the weights: the synth config with the canonical frame of the
    training pairs (where generated volumes are placed) and the stage."""
    grid = canonical_grid([p.grid for p in pairs], cfg.frame)
    affine = tuple(tuple(float(x) for x in row) for row in grid.affine)
    return replace(cfg, stage=stage, canonical_affine=affine, training_figures=_pair_figures(pairs)).to_json()


def _pair_figures(pairs: list[FramedPair]) -> dict[str, float]:
    """Realism reference of the training pairs: vessel fraction and fixed/moving soft Dice."""
    from .generate import realism_figures

    figures = [realism_figures(p.volumes) for p in pairs]  # the figures the manifest gives generated pairs
    return {key: float(np.mean([f[key] for f in figures])) for key in ("vessel_fraction", "overlap_dice")}


# ----------------------------------------------------------------------------- prior stage
def tokenise_pairs(model: PairedVQAE, pairs: list[FramedPair], copies: int, jitter_std: float, seed: int) -> torch.Tensor:
    """Token grids ``(len(pairs) * (1 + copies), N)`` (int64) of each pair and its jittered copies."""
    generator = torch.Generator().manual_seed(seed)
    grids = []
    model.eval()
    for pair in pairs:
        volumes = _stack([pair])
        batch = torch.cat([volumes] + [jitter(volumes, jitter_std, generator) for _ in range(copies)])
        for chunk in batch.split(4):
            grids.append(model.tokenise(chunk).reshape(chunk.shape[0], -1))
    return torch.cat(grids)


def _train_prior(opts: SynthTrainOptions, run: RunOptions, progress: Progress | None) -> dict:
    from diffusionreg.synth.prior import weighted_elbo_loss

    if opts.vqae is None:
        raise InputError("train synth --stage prior needs --vqae (the folder of a trained VQ-AE)")
    vqae, vqae_cfg = load_stage_weights(opts.vqae, "vqae")
    cfg = replace(opts.config, frame=vqae_cfg.frame, vqae=vqae_cfg.vqae)  # the tokeniser fixes these
    data = load_pairs(opts.pairs, cfg)
    p = cfg.prior
    tokens = tokenise_pairs(vqae, data, p.augmentations_per_pair, cfg.vqae.jitter, cfg.seed)
    real_tokens = tokens[:: p.augmentations_per_pair + 1]
    usage = codebook_usage(tokens, cfg.vqae.num_embeddings)
    torch.manual_seed(cfg.seed)
    generator_model = PairGenerator(cfg, real_tokens)
    generator_model.vqae.load_state_dict(vqae.state_dict())
    generator_model.vqae.requires_grad_(False)
    val_tokens = None
    if opts.val_pairs:
        val_tokens = tokenise_pairs(vqae, load_pairs(opts.val_pairs, cfg), 0, 0.0, cfg.seed)

    def step(module: nn.Module, gen: torch.Generator):
        pick = torch.randint(tokens.shape[0], (p.batch_size,), generator=gen)
        return weighted_elbo_loss(module, tokens[pick], gen, p.diffusion_steps)

    def validate(model: nn.Module) -> dict:
        model.eval()
        held = val_tokens if val_tokens is not None else real_tokens
        with torch.no_grad():
            loss, _ = weighted_elbo_loss(model.prior, held, torch.Generator().manual_seed(1), p.diffusion_steps)
        model.train()
        return {"val_elbo_bits": float(loss), **{f"train_{k}": v for k, v in usage.items()}}

    n_params = sum(q.numel() for q in generator_model.prior.parameters())
    task = TrainingTask(
        name="synth",
        network=generator_model,
        train_module=generator_model.prior,
        config_json=_stage_config_json(cfg, "generator", data),
        seed=cfg.seed,
        modality=opts.modality,
        optimizer=torch.optim.Adam(generator_model.prior.parameters(), lr=p.lr),
        step=step,
        lr_factor=lambda s: min(1.0, (s + 1) / max(p.warmup_steps, 1)),
        validate=validate,
        score=lambda metrics: metrics["val_elbo_bits"],
        description=(
            f"synth prior, config {cfg.name}: {tokens.shape[0]} token grids ({len(data)} pairs x {1 + p.augmentations_per_pair}) "
            f"of {cfg.num_tokens} tokens, codes used {usage['codes_used']}/{cfg.vqae.num_embeddings} "
            f"(perplexity {usage['perplexity']:.1f}), {n_params} transformer parameters"
        ),
        data=list(opts.pairs),
        val_data=list(opts.val_pairs or []),
        weights_metadata={"method": "synth-generator"},
    )
    return run_training(task, run, progress)


def load_stage_weights(path: Path, stage: str) -> tuple[PairedVQAE, SynthConfig]:
    """A trained VQ-AE run (folder with ``model.safetensors`` + ``config.json``; ``best/`` preferred)."""
    from diffusionreg.synth.generator import read_weights

    state, cfg = read_weights(path, stage)
    model = PairedVQAE(cfg.vqae)
    model.load_state_dict(state)
    model.eval()
    return model, cfg


def train(opts: SynthTrainOptions, run: RunOptions, progress: Progress | None = None) -> dict:
    """Train one stage (every rank under torchrun); rank 0 writes ``run.output``."""
    if opts.stage == "vqae":
        return _train_vqae(opts, run, progress)
    if opts.stage == "prior":
        return _train_prior(opts, run, progress)
    raise InputError(f"unknown synth stage {opts.stage!r}: use vqae or prior")
