"""Generating synthetic pairs from a trained generator, and the figures that judge them.

Pair ``i`` of a run with seed ``s`` is drawn with its own generator seeded ``(s, i)``: the pair is
the same whichever process makes it and whatever else is generated, so ``torchrun`` ranks can
split the indices and a run can be extended.

Figures per pair (all on the frame grid, vessel = probability > 0.5 unless said "soft"):

* **novelty**: the highest Dice of the generated fixed (moving) volume to any *training* volume
  as the generator knows it (the decoded training token grids, both scans of every pair), and the
  highest fraction of tokens equal to a training grid. Memorised pairs have Dice close to the
  VQ-AE's reconstruction Dice; the target is no Dice above ``MEMORISED_DICE``.
* **realism**: vessel fraction and fixed/moving soft Dice (overlap of the two scans), next to the
  same figures of the real training pairs stored in the model's config; optionally the mean
  displacement (mm, over vessel voxels) a deformable model finds between fixed and moving.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusionreg.errors import InputError
from diffusionreg.image import Grid, Image

from .config import SynthConfig
from .generator import PairGenerator
from .vqae import soft_dice

#: Dice to a training volume above which a generated volume counts as memorised (issue target).
MEMORISED_DICE = 0.9
#: Probability above which a voxel is vessel when Dice is computed on hard maps.
VESSEL_THRESHOLD = 0.5


@dataclass
class LoadedGenerator:
    model: PairGenerator
    config: SynthConfig
    name: str
    grid: Grid  # where generated volumes are placed (frame voxel -> LPS mm)


def load_generator(name_or_path: str | None, device: str | torch.device = "cpu") -> LoadedGenerator:
    """A registered generator (Models.json, sha256-checked) or a run / model folder."""
    from diffusionreg import models

    entry = models.resolve(name_or_path, task="synth", modality="lung-vessels")
    cfg = SynthConfig.from_dict(models.load_config_json(entry))
    if cfg.stage != "generator":
        raise InputError(f"model {entry.name} is a synth {cfg.stage}, not a trained generator (train --stage prior)")
    state = models.load_state_dict(entry)
    model = PairGenerator(cfg, state["training_tokens"].long())
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"model {entry.name}: weights do not match its config ({str(exc).splitlines()[0]})") from None
    model.to(torch.device(device)).eval()
    if not cfg.canonical_affine:
        raise InputError(f"model {entry.name}: config.json has no canonical_affine (where generated volumes lie)")
    grid = Grid(cfg.frame.shape, np.asarray(cfg.canonical_affine, dtype=np.float64))
    return LoadedGenerator(model, cfg, entry.name, grid)


def pair_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of pair ``index`` in a run of ``seed`` (independent of the other pairs)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


@torch.no_grad()
def generate_pair(
    gen: LoadedGenerator,
    index: int,
    seed: int,
    steps: int,
    temperature: float,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """One pair: vessel probabilities ``(2, *frame)`` float32 [fixed, moving] and its tokens ``(N,)``."""
    from .sampler import sample_tokens

    model = gen.model
    tokens = sample_tokens(
        model.prior, 1, steps, temperature, pair_generator(seed, index), batch_size=1, on_step=on_step, should_stop=should_stop
    )
    grid_tokens = tokens.reshape(1, *gen.config.token_grid).to(next(model.parameters()).device)
    volumes = model.vqae.decode_tokens(grid_tokens)[0].float().cpu().numpy()
    return volumes, tokens[0].cpu()


class NoveltyReference:
    """The training volumes as the generator knows them (decoded training grids), for novelty."""

    def __init__(self, gen: LoadedGenerator) -> None:
        tokens = gen.model.training_tokens
        with torch.no_grad():
            decoded = gen.model.vqae.decode_tokens(tokens.reshape(-1, *gen.config.token_grid))
        # both scans of every pair: (2P, *frame) hard maps
        self.volumes = (decoded.reshape(-1, *decoded.shape[2:]) > VESSEL_THRESHOLD).cpu()
        self.tokens = tokens.cpu()

    def figures(self, volumes: np.ndarray, tokens: torch.Tensor) -> dict:
        """Nearest-training-volume Dice of each generated scan and nearest token agreement."""
        hard = torch.from_numpy(volumes > VESSEL_THRESHOLD)
        dims = tuple(range(1, hard.ndim))
        result = {}
        for scan, key in ((0, "fixed"), (1, "moving")):
            overlap = (self.volumes & hard[scan]).sum(dims).double()
            total = self.volumes.sum(dims).double() + hard[scan].sum().double()
            dice = 2.0 * overlap / total.clamp_min(1.0)
            result[f"nearest_dice_{key}"] = float(dice.max())
        agreement = (self.tokens == tokens[None]).double().mean(1) if len(self.tokens) else torch.zeros(1)
        result["nearest_token_agreement"] = float(agreement.max())
        result["memorised"] = max(result["nearest_dice_fixed"], result["nearest_dice_moving"]) > MEMORISED_DICE
        return result


def realism_figures(volumes: np.ndarray) -> dict:
    """Vessel fraction (soft, both scans) and fixed/moving soft Dice of one pair."""
    t = torch.from_numpy(volumes)[None]
    return {
        "vessel_fraction": float(t.mean()),
        "overlap_dice": float(soft_dice(t[:, :1], t[:, 1:])[0, 0]),
    }


def displacement_figure(volumes: np.ndarray, grid: Grid, model) -> dict:
    """Mean and 95th percentile displacement (mm) over the fixed scan's vessel voxels, from a
    zero-shot deformable registration (``model``: a loaded deformable model)."""
    from diffusionreg.deformable.register import register_deformable

    fixed, moving = Image(volumes[0], grid.affine), Image(volumes[1], grid.affine)
    result = register_deformable(fixed, moving, model, io_steps=0, refine_iterations=0, want_inverse=False)
    magnitude = np.linalg.norm(np.asarray(result.forward.field.array, dtype=np.float64), axis=-1)
    vessel = volumes[0] > VESSEL_THRESHOLD
    values = magnitude[vessel] if vessel.any() else np.zeros(1)
    return {"displacement_mean_mm": float(values.mean()), "displacement_p95_mm": float(np.percentile(values, 95))}


def iter_indices(count: int, rank: int, world: int, start: int = 0) -> Iterator[int]:
    """The pair indices this rank makes: ``start + rank, start + rank + world, ...``."""
    return iter(range(start + rank, start + count, world))


def manifest(gen: LoadedGenerator, seed: int, steps: int, temperature: float, pairs: list[dict]) -> dict:
    """The run's manifest: model, settings, the training pairs' reference figures and every pair."""
    from .manifest import assemble

    header = {
        "model": gen.name,
        "seed": seed,
        "steps": steps,
        "temperature": temperature,
        "frame": {"shape": list(gen.config.frame.shape), "spacing_mm": gen.config.frame.spacing_mm},
        "memorised_dice": MEMORISED_DICE,
        "training_reference": gen.config.training_figures,
    }
    return assemble(header, pairs)


def write_manifest(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
