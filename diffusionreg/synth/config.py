"""One configuration dataclass for the paired-data generator (Unleashing Registration, spec 1.3-1.6).

Sections: the fixed training frame (where pairs are cropped/padded and which grid the tokens
cover), the paired VQ-AE, the absorbing-diffusion transformer (the "prior" over token grids), the
sampler defaults (stored in the model's config.json: ``diffusionreg synth`` and a Slicer panel read
them from there) and the training of both stages.

Two presets:

* ``compact``: a CPU size. The frame is 96x80x96 voxels at 3 mm (288x240x288 mm, the whole lung
  field of every Lung250M-4B case), three stride-2 stages (8x) give 12x10x12 = 1,440 tokens; MONAI
  VQ-VAE widths 16/32/64, 256 codes of dimension 32; transformer width 64, 4 layers. Its voxels
  are finer than the compact registration network's grid (3.6 mm), which is what it feeds.
* ``full``: the paper's sizes: 256x208x256 at 1 mm, four stride-2 stages (16x) -> 16x13x16 =
  3,328 tokens, 1,024 codes of dimension 384, transformer width 512, 12 layers, 16 heads, FFN 1,024.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from diffusionreg.errors import InputError
from diffusionreg.strict_config import from_dict


@dataclass(frozen=True)
class FrameConfig:
    """The fixed frame every pair is cropped/padded into (spec 1.3), in the pair's own voxel axes.

    A pair is first resampled to ``spacing_mm`` (isotropic), then centred in ``shape`` along each
    axis; ``offset_voxels`` shifts the window towards the high-index end (the reference shifts its
    W axis by 8 voxels at 1 mm). Zero padding. The voxel-to-world mapping of the frame is recorded
    per pair, so decoded volumes carry exact geometry.
    """

    shape: tuple[int, int, int] = (96, 80, 96)
    spacing_mm: float = 3.0
    offset_voxels: tuple[int, int, int] = (0, 3, 0)
    max_extent_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # > 0: frame only the first mm of an axis


@dataclass(frozen=True)
class VQAEConfig:
    """The paired VQ-AE: two channels (fixed, moving vessel maps) in, two 2-class softmaxes out."""

    channels: tuple[int, ...] = (16, 32, 64)  # one stride-2 stage per entry (MONAI VQVAE)
    num_res_layers: int = 1
    num_res_channels: tuple[int, ...] = (16, 32, 64)
    num_embeddings: int = 256  # codebook size
    embedding_dim: int = 32
    commitment_cost: float = 0.25  # beta of the VQ loss (spec 1.4)
    ema_decay: float = 0.99  # codebook by EMA updates (MONAI EMAQuantizer)
    dead_code_usage: float = 0.03  # a code whose EMA count falls below this is restarted ...
    restart_every: int = 50  # ... on a random encoder output, every this many steps
    class_weights: tuple[float, float] = (1.0, 2.5)  # CE weights (background, vessel)
    vq_weight: float = 0.1  # L = L_rec + vq_weight * L_VQ
    crop: tuple[int, int, int] = (48, 48, 48)  # training crop (same place in both scans)
    batch_size: int = 4
    lr: float = 1e-3
    jitter: float = 0.05  # std of the entrywise affine perturbation (nearest neighbour, spec 1.4)


@dataclass(frozen=True)
class PriorConfig:
    """The absorbing-diffusion transformer over the flattened token grid (spec 1.5)."""

    width: int = 64
    depth: int = 4
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.1  # residual and feed-forward paths (PyTorch's default, as the reference)
    attention_dropout: float = 0.0  # on the attention weights (samb-t: 0; see prior.py)
    norm_first: bool = True  # pre-LayerNorm (the issue asks for it; the reference is post-LN)
    diffusion_steps: int = 256  # T of the masking process
    batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 200
    augmentations_per_pair: int = 24  # token grids encoded from jittered copies of each training pair


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of ``diffusionreg synth`` (spec 1.6)."""

    steps: int = 256
    temperature: float = 0.9
    batch_size: int = 2


@dataclass
class SynthConfig:
    """All hyper-parameters of the paired-data generator."""

    name: str = "compact"
    seed: int = 0
    frame: FrameConfig = field(default_factory=FrameConfig)
    vqae: VQAEConfig = field(default_factory=VQAEConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # written by training beside the weights:
    stage: str = "untrained"  # "vqae" (a VQ-AE alone) or "generator" (VQ-AE + prior)
    canonical_affine: tuple[tuple[float, ...], ...] = ()  # frame voxel -> LPS mm of generated volumes
    training_figures: dict[str, float] = field(default_factory=dict)  # realism reference of the training pairs

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Token grid shape: the frame divided by the VQ-AE's total stride."""
        factor = 2 ** len(self.vqae.channels)
        return tuple(s // factor for s in self.frame.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        g = self.token_grid
        return g[0] * g[1] * g[2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        cfg = from_dict(cls, data, "synth config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        factor = 2 ** len(self.vqae.channels)
        if any(s % factor for s in self.frame.shape):
            raise InputError(f"synth config: frame.shape {self.frame.shape} must be divisible by the VQ-AE stride {factor}")
        if any(c % factor for c in self.vqae.crop):
            raise InputError(f"synth config: vqae.crop {self.vqae.crop} must be divisible by the VQ-AE stride {factor}")
        if len(self.vqae.num_res_channels) != len(self.vqae.channels):
            raise InputError("synth config: vqae.channels and vqae.num_res_channels differ in length")
        if self.prior.width % self.prior.heads:
            raise InputError("synth config: prior.width must be divisible by prior.heads")
        if self.sampling.steps < 1 or self.sampling.temperature <= 0:
            raise InputError("synth config: sampling.steps must be >= 1 and sampling.temperature > 0")


def compact() -> SynthConfig:
    return SynthConfig()


def full() -> SynthConfig:
    return SynthConfig(
        name="full",
        frame=FrameConfig(shape=(256, 208, 256), spacing_mm=1.0, offset_voxels=(0, 8, 0), max_extent_mm=(0.0, 0.0, 280.0)),
        vqae=VQAEConfig(
            channels=(48, 64, 128, 256),
            num_res_channels=(48, 64, 128, 256),
            num_res_layers=1,
            num_embeddings=1024,
            embedding_dim=384,
            crop=(128, 128, 128),
            batch_size=8,
            lr=5e-4,
        ),
        prior=PriorConfig(
            width=512, depth=12, heads=16, ffn=1024, attention_dropout=0.1, batch_size=8, lr=1e-4, warmup_steps=500
        ),
    )


PRESETS = {"compact": compact, "full": full}


def get_config(name_or_path: str) -> SynthConfig:
    """A preset by name, or a config.json file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    from pathlib import Path

    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(f"unknown synth config {name_or_path!r}: use one of {', '.join(PRESETS)} or a config.json file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read synth config {path}: {error}") from None
    return SynthConfig.from_dict(data)
