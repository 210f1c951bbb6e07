"""Configuration dataclasses of the deformable networks, with compact CPU and ``full`` presets.

A :class:`DeformableConfig` holds the method (``sitreg`` or ``icon``), the network grid
(shape in voxels and isotropic spacing in mm, array axes i, j, k), the intensity
normalisation the model was trained with, the network sub-config, the loss weights, training
settings and the registration defaults (``inference``: instance optimisation and velocity
refinement). It is stored as ``config.json`` beside the weights.

Presets (``get_config(name)``):

* ``compact-sitreg``, ``compact-icon``: CPU sizes (a few hundred K parameters, 64-96^3 grids).
* ``lung-icon``: the compact lung-vessel model (ICON, vessel label or probability maps, 3.6 mm grid).
* ``full-lumir``, ``full-oasis``, ``full-lung250m``: SITReg as the reference configs
  (LUMIR 2024: 6 levels 12..128 features, 12..256 head channels, GN 4, 160x224x192 at 1 mm,
  window 11, lr 4e-4; OASIS aligned: 4 levels, 8/40/40/40, 16/72/72/72, GN 2 none in heads;
  Lung250M-4B: 6 levels 8/36x5, 16/62x5, GN 2, 160x112x160 at 2 mm).
* ``full-unleashing``: the two-step ICON network of Unleashing Registration (128x104x128
  at 2 mm, channels 8..64, lr 0.015, batch 8, 50 instance-optimisation steps at lr 0.005).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusionreg.errors import InputError
from diffusionreg.strict_config import from_dict

from .field_refine import FieldRefineConfig
from .quality import QUALITIES, QualityPreset

METHODS = ("sitreg", "icon")
NORMALISATIONS = ("binary", "probability", "minmax", "percentile", "clip", "none")


@dataclass
class SITRegConfig:
    """Sizes of the SITReg network (one entry per level, level 0 = full resolution)."""

    feature_channels: tuple[int, ...] = (8, 16, 32, 32)
    head_channels: tuple[int, ...] = (8, 32, 64, 64)
    convs_per_level: int = 2
    norm_groups: int = 2  # GroupNorm groups in the encoder (0 = none)
    head_norm_groups: int = 2  # GroupNorm groups in the heads (0 = none, OASIS)
    predict_affine: bool = False  # symmetric half-affine stage from the coarsest features
    affine_hidden: int = 64  # MLP width of the affine stage (input is projected first)
    affine_input_channels: int = 4  # 1x1 projection of the coarsest features before the MLP
    invert_tolerance: float = 1e-2  # fixed-point stop, voxels (reference: 0.01)
    invert_max_iterations: int = 50
    invert_backward_tolerance: float = 1e-2
    invert_backward_max_iterations: int = 50

    @property
    def levels(self) -> int:
        return len(self.feature_channels)


@dataclass
class ICONConfig:
    """Two-step inverse-consistent network (Unleashing Registration / ConstrICON)."""

    channels: tuple[int, ...] = (8, 16, 32, 64, 64, 64)
    strides: tuple[int, ...] = (2, 2, 1, 2, 1)
    output_bound: float = 0.35  # a = bound * tanh(U(.)), normalised units
    smoothing_kernel: int = 7  # box-pool kernel of the velocity smoothing P
    squarings: int = 12  # scaling-and-squaring steps
    steps: int = 2  # 1 = single SVF, 2 = two-step (midpoint) network
    exp_factor: int = 1  # >1: scaling and squaring on a grid this much coarser
    # Every other argument of MONAI's UNet, recorded so the weights never depend on MONAI's defaults
    # (values: MONAI 1.3-1.6 defaults, with which the shipped lung-vessels model was trained).
    unet_kernel_size: int = 3
    unet_up_kernel_size: int = 3
    unet_num_res_units: int = 0
    unet_act: str = "PRELU"
    unet_norm: str = "INSTANCE"
    unet_dropout: float = 0.0
    unet_bias: bool = True
    unet_adn_ordering: str = "NDA"


@dataclass
class DeformableInference:
    """Registration defaults of a model: what ``register_deformable``, ``diffusionreg deformable``
    and the Slicer panel use when not told otherwise (stored in the model's ``config.json``).

    These are the ``default`` quality; ``qualities`` holds the other presets (``--quality``)."""

    io_steps: int = 0  # instance optimisation: Adam steps on the pair's weights
    io_lr: float = 1e-4
    # ICON: the first ``io_frozen_steps`` step networks keep their trained weights during instance
    # optimisation, so their part of the result is computed once and only the later steps are
    # optimised (lung: the fine step alone gives the same TRE at half the cost; issue 18).
    io_frozen_steps: int = 0
    # fine-grid symmetric velocity refinement after the network (see field_refine)
    refine: FieldRefineConfig = field(default_factory=FieldRefineConfig)
    qualities: tuple[QualityPreset, ...] = ()

    def at_quality(self, quality: str | None) -> DeformableInference:
        """These settings with the preset ``quality`` applied (None or ``"default"``: unchanged)."""
        if quality is None or quality == "default":
            return self
        presets = {preset.name: preset for preset in self.qualities}
        if quality not in presets:
            known = ", ".join(["default", *presets])
            raise InputError(f"unknown quality {quality!r}; this model has {known}")
        preset = presets[quality]
        refine = dataclasses.replace(
            self.refine,
            iterations=preset.refine_iterations,
            coarse_iterations=preset.refine_coarse_iterations,
            upsample=preset.refine_upsample,
        )
        return dataclasses.replace(self, io_steps=preset.io_steps, refine=refine)

    def validate(self) -> None:
        for settings in [self] + [self.at_quality(q.name) for q in self.qualities if q.name in QUALITIES]:
            refine = settings.refine
            if refine.iterations < 0 or refine.upsample <= 0 or refine.control_factor < 1:
                raise InputError("inference.refine needs iterations >= 0, upsample > 0 and control_factor >= 1")
            if not 0 <= refine.coarse_iterations <= refine.iterations or not 0 < refine.coarse_scale <= 1:
                raise InputError("inference.refine needs 0 <= coarse_iterations <= iterations and 0 < coarse_scale <= 1")
            if refine.support_margin < -1 or refine.support_every < 1:
                raise InputError("inference.refine needs support_margin >= -1 (-1: dense loss) and support_every >= 1")
            if refine.coarse_stages < 1 or refine.coarse_sigma < 0 or not 0 < refine.sample_fraction <= 1:
                raise InputError("inference.refine needs coarse_stages >= 1, coarse_sigma >= 0 and 0 < sample_fraction <= 1")
            if settings.io_steps < 0 or settings.io_lr <= 0 or settings.io_frozen_steps < 0:
                raise InputError("inference needs io_steps >= 0, io_lr > 0 and io_frozen_steps >= 0")
        names = [q.name for q in self.qualities]
        if len(set(names)) != len(names) or not set(names) <= set(QUALITIES) - {"default"}:
            raise InputError(f"inference.qualities: names must be distinct, from {QUALITIES[0]!r} and {QUALITIES[2]!r}")


@dataclass
class DeformableConfig:
    """Everything needed to rebuild, train and apply one deformable model."""

    name: str = "compact-sitreg"
    method: str = "sitreg"
    grid_shape: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: float = 3.0
    normalisation: str = "percentile"  # how raw intensities become network inputs
    clip_range: tuple[float, float] = (0.0, 1.0)  # for 'clip': clip then scale to [0, 1]
    sitreg: SITRegConfig = field(default_factory=SITRegConfig)
    icon: ICONConfig = field(default_factory=ICONConfig)
    # --- losses ------------------------------------------------------------------------
    similarity: str = "ncc"  # 'ncc' (squared local NCC) | 'l1' | 'mse'
    ncc_window: int = 7
    regularisation_weight: float = 1.0  # SITReg gradient loss lambda (ICON: 0.5)
    ndv_weight: float = 0.0  # LUMIR fine-tune 1e-5
    cycle_weight: float = 0.0  # group (3-cycle) consistency, LUMIR fine-tune 40
    # --- training ----------------------------------------------------------------------
    lr: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    augment_rotation_deg: float = 5.0
    augment_translation: float = 0.025  # std, normalised units (NLST)
    augment_log_scale: float = 0.05
    augment_log_shear: float = 0.025
    augment_affine_prob: float = 0.9
    augment_elastic_mm: float = 4.0  # std of a smooth random deformation (0 = off)
    augment_intensity: bool = True  # random gamma / scale (not for binary inputs)
    synthetic_fraction: float = 0.5  # share of training pairs drawn from --synthetic-pairs when given
    # --- registration defaults -----------------------------------------------------------
    inference: DeformableInference = field(default_factory=DeformableInference)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeformableConfig:
        """Strict: unknown keys and wrong types are refused (:mod:`diffusionreg.strict_config`)."""
        cfg = from_dict(cls, data, "deformable config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.normalisation not in NORMALISATIONS:
            raise InputError(f"unknown normalisation {self.normalisation!r}")
        if len(self.grid_shape) != 3 or min(self.grid_shape) < 4:
            raise InputError(f"grid_shape must be 3 sizes >= 4, got {self.grid_shape}")
        if self.method == "sitreg":
            if len(self.sitreg.head_channels) != self.sitreg.levels:
                raise InputError("sitreg.head_channels needs one entry per level")
        else:
            factor = 1
            for s in self.icon.strides:
                factor *= s
            factor = max(factor, 4)
            if any(s % factor for s in self.grid_shape):
                raise InputError(f"grid_shape {self.grid_shape} must be divisible by {factor} for ICON")
        frozen = self.inference.io_frozen_steps
        if frozen and (self.method != "icon" or frozen >= self.icon.steps):
            raise InputError(
                f"inference.io_frozen_steps {frozen}: only ICON step networks can be frozen, and at least one must "
                f"stay to optimise (0 <= io_frozen_steps < icon.steps)"
            )
        if self.spacing_mm <= 0:
            raise InputError("spacing_mm must be positive")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise InputError(f"synthetic_fraction must be within 0..1, got {self.synthetic_fraction}")
        self.inference.validate()


def _presets() -> dict[str, DeformableConfig]:
    p: dict[str, DeformableConfig] = {}
    p["compact-sitreg"] = DeformableConfig()
    p["compact-icon"] = DeformableConfig(
        name="compact-icon",
        method="icon",
        grid_shape=(64, 64, 64),
        spacing_mm=3.0,
        icon=ICONConfig(channels=(8, 16, 32, 32, 32, 32), exp_factor=2),
        regularisation_weight=0.5,
        lr=2e-3,
        inference=DeformableInference(io_steps=50, io_lr=5e-3),
    )
    p["lung-icon"] = DeformableConfig(
        name="lung-icon",
        method="icon",
        grid_shape=(80, 64, 80),
        spacing_mm=3.6,
        normalisation="probability",
        similarity="l1",
        regularisation_weight=0.5,
        icon=ICONConfig(exp_factor=2),
        lr=2e-3,
        batch_size=1,
        augment_elastic_mm=3.0,
        augment_intensity=False,
        # the shipped lung-vessels defaults (issue 18: no instance optimisation; a blurred two-stage coarse
        # start widens the refinement's capture range instead; sparse, sampled refinement loss; presets)
        inference=DeformableInference(
            io_steps=0,
            io_lr=5e-3,
            io_frozen_steps=1,
            refine=FieldRefineConfig(
                iterations=90,
                coarse_iterations=70,
                coarse_scale=0.667,
                coarse_stages=2,
                coarse_sigma=1.0,
                upsample=1.5,
                control_factor=8,
                coarse_levels=2,
                learning_rate=0.15,
                smoothness_weight=0.1,
                squaring_upsample=1,
                support_every=20,
                sample_fraction=0.25,
            ),
            qualities=(
                QualityPreset("fast", io_steps=0, refine_iterations=50, refine_coarse_iterations=40, refine_upsample=1.5),
                QualityPreset("best", io_steps=20, refine_iterations=150, refine_coarse_iterations=70, refine_upsample=1.5),
            ),
        ),
    )
    p["lung-sitreg"] = DeformableConfig(
        name="lung-sitreg",
        method="sitreg",
        grid_shape=(96, 80, 96),
        spacing_mm=3.0,
        normalisation="binary",
        similarity="ncc",
        ncc_window=7,
        sitreg=SITRegConfig(feature_channels=(8, 16, 32, 32), head_channels=(8, 32, 48, 48)),
        lr=1e-3,
        augment_intensity=False,
        inference=DeformableInference(io_steps=20, io_lr=1e-4),
    )
    p["brain-sitreg"] = DeformableConfig(
        name="brain-sitreg",
        method="sitreg",
        grid_shape=(64, 80, 64),
        spacing_mm=2.5,
        normalisation="percentile",
        sitreg=SITRegConfig(feature_channels=(8, 16, 32, 32), head_channels=(8, 32, 48, 48)),
        lr=5e-4,
        inference=DeformableInference(
            io_steps=0,
            io_lr=1e-4,
            # the shipped brain-mri defaults (issue 18: 16 of the 24 iterations on the half grid, squaring on the
            # control grid: Dice 0.777 in under 10 s on one CPU thread)
            refine=FieldRefineConfig(
                iterations=24,
                coarse_iterations=16,
                coarse_scale=0.5,
                control_factor=4,
                coarse_levels=2,
                learning_rate=0.1,
                smoothness_weight=1.0,
                squaring_upsample=1,
            ),
            qualities=(
                QualityPreset("fast", io_steps=0, refine_iterations=15, refine_coarse_iterations=10, refine_upsample=1.0),
                QualityPreset("best", io_steps=0, refine_iterations=30, refine_coarse_iterations=0, refine_upsample=1.0),
            ),
        ),
    )
    # ---- reference-sized presets (GPU) -------------------------------------------------
    p["full-lumir"] = DeformableConfig(
        name="full-lumir",
        method="sitreg",
        grid_shape=(160, 224, 192),
        spacing_mm=1.0,
        normalisation="minmax",
        sitreg=SITRegConfig(
            feature_channels=(12, 32, 64, 128, 128, 128),
            head_channels=(12, 64, 128, 256, 256, 256),
            norm_groups=4,
            head_norm_groups=4,
        ),
        ncc_window=11,
        lr=4e-4,
        batch_size=4,
        augment_elastic_mm=0.0,
        augment_affine_prob=0.0,
        augment_intensity=False,
    )
    p["full-oasis"] = DeformableConfig(
        name="full-oasis",
        method="sitreg",
        grid_shape=(160, 144, 192),
        spacing_mm=1.0,
        normalisation="none",
        sitreg=SITRegConfig(feature_channels=(8, 40, 40, 40), head_channels=(16, 72, 72, 72), norm_groups=2, head_norm_groups=0),
        ncc_window=7,
        lr=1e-4,
        augment_elastic_mm=0.0,
        augment_affine_prob=0.0,
        augment_intensity=False,
    )
    p["full-lung250m"] = DeformableConfig(
        name="full-lung250m",
        method="sitreg",
        grid_shape=(160, 112, 160),
        spacing_mm=2.0,
        normalisation="clip",
        clip_range=(0.0, 1024.0),
        sitreg=SITRegConfig(
            feature_channels=(8, 36, 36, 36, 36, 36), head_channels=(16, 62, 62, 62, 62, 62), norm_groups=2, head_norm_groups=2
        ),
        ncc_window=7,
        lr=1e-4,
        augment_elastic_mm=0.0,
        augment_affine_prob=0.0,
        augment_intensity=False,
    )
    p["full-unleashing"] = DeformableConfig(
        name="full-unleashing",
        method="icon",
        grid_shape=(128, 104, 128),
        spacing_mm=2.0,
        normalisation="binary",
        similarity="l1",
        regularisation_weight=0.5,
        icon=ICONConfig(),
        lr=0.015,
        batch_size=8,
        augment_affine_prob=0.0,
        augment_elastic_mm=0.0,
        augment_intensity=False,
        inference=DeformableInference(io_steps=50, io_lr=5e-3),
    )
    return p


PRESETS = tuple(_presets())


def get_config(name_or_path: str, method: str | None = None) -> DeformableConfig:
    """A preset by name (``compact`` = ``compact-<method>``) or a config JSON file."""
    presets = _presets()
    name = str(name_or_path)
    if name in ("compact", "full"):
        name = {
            "compact": f"compact-{method or 'sitreg'}",
            "full": "full-lumir" if (method or "sitreg") == "sitreg" else "full-unleashing",
        }[name]
    if name in presets:
        cfg = presets[name]
    else:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"unknown deformable config {name_or_path!r}: not one of {', '.join(presets)} nor a JSON file")
        try:
            cfg = DeformableConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise InputError(f"cannot parse config {path}: {exc}") from exc
    if method is not None and cfg.method != method:
        raise InputError(f"config {cfg.name} is for method {cfg.method}, not {method}")
    cfg.validate()
    return cfg
