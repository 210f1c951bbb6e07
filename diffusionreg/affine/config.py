"""One configuration dataclass for spatial-diffusion affine registration.

Three presets:

* ``full``: the published method's sizes (widths 2-64-...-1024, 256^3 grid, T = 65,
  translation std 0.5-4 voxels, batch 4, 120k steps). Meant for a GPU.
* ``compact``: a laptop-CPU size (narrow widths, 64^3 grid at 3.5 mm). Voxel-valued
  parameters (translation std, artifact sizes) are scaled by grid_size / 256 so that they
  cover the same fraction of the field of view as in the full model.
* ``oct``: retinal OCT / OCTA on an anisotropic network grid (:func:`retinal_oct`).

The network grid is a cube (``grid_size`` an integer, ``spacing_mm`` a number) or a box
(``grid_size`` = [D0, D1, D2] voxels, ``spacing_mm`` = [s0, s1, s2] mm along the LPS axes);
:attr:`AffineConfig.grid_shape` and :attr:`AffineConfig.grid_spacing` read either form.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffusionreg.errors import InputError
from diffusionreg.strict_config import from_dict
from diffusionreg.vocabulary import ANY_MODALITY, INITIALIZATIONS


@dataclass(frozen=True)
class RefineLevel:
    """One resolution level: grid spacing (mm; a number: an isotropic cube around the pivot, as
    every MRI model; three numbers: per LPS axis over the fixed image's extent on each axis, for
    anisotropic scans such as OCT) and Adam iterations."""

    spacing_mm: float | tuple[float, float, float]
    iterations: int


@dataclass(frozen=True)
class RefineConfig:
    """Coarse-to-fine refinement. Parameters are scaled so a unit step is ``scale_mm`` of motion."""

    levels: tuple[RefineLevel, ...] = (RefineLevel(6.0, 50), RefineLevel(3.0, 50))
    learning_rate: float = 0.01  # Adam step at the first level; later levels scale it by spacing
    final_rate_fraction: float = 0.1  # per level, the rate decays (cosine) to this fraction of its start
    scale_mm: float = 100.0  # translation unit; also the lever arm of the linear part
    max_field_of_view_mm: float = 320.0  # cube side around the pivot: the fixed image's extent, capped
    foreground_fraction: float | None = None  # score only fixed voxels above this fraction of the
    # intensity window (None: all; MI needs the background)
    # The modalities whose refinement uses ``foreground_fraction`` (None: every modality). A head
    # CT's neck and table outside the template head pull the MI; a skull-stripped MRI's background
    # is part of its best evidence (head-ct on the 8 MRI pairs: Dice 0.664 without the mask, 0.659 with it).
    foreground_modalities: tuple[str, ...] | None = None
    max_linear_change: float = 0.5  # clamp on |C - I| entries, so refinement never runs away
    metric: str = "mi"  # 'mi' (Parzen-window mutual information) or 'ncc' (Pearson)
    histogram_bins: int = 16  # for 'mi' (32 was slower and no better on the benchmark)
    sampling_stride: int = 2  # score every n-th fixed voxel per axis (regular sampling)

    def for_modality(self, modality: str) -> RefineConfig:
        """These settings as they apply to ``modality`` (the foreground mask only where named)."""
        if self.foreground_modalities is not None and modality not in self.foreground_modalities:
            return dataclasses.replace(self, foreground_fraction=None, foreground_modalities=None)
        return self

    def with_iterations(self, iterations: int) -> RefineConfig:
        """The same levels with ``iterations`` steps each (0: no refinement)."""
        if iterations <= 0:
            return dataclasses.replace(self, levels=())
        return dataclasses.replace(self, levels=tuple(RefineLevel(l.spacing_mm, iterations) for l in self.levels))


@dataclass(frozen=True)
class PoseSearchConfig:
    """Any-pose start (:mod:`diffusionreg.affine.pose_search`): candidate rotations scored by
    normalised mutual information at low resolution, the best polished, ``keep`` of them run
    through the diffusion and refinement. Absent from a config: off (older models as before)."""

    enabled: bool = False
    candidates: str = "cube-corners"  # 'cube' (24 rotations) or 'cube-corners' (24 x 9 = 216)
    corner_offset_deg: float = 35.0  # 'cube-corners': angle of the 8 offsets towards the corners
    spacing_mm: float = 8.0  # grid of the candidate scoring
    polish: int = 6  # best candidates polished by the pattern search (3 missed 1 of 20 bench poses)
    polish_spacing_mm: float = 6.0  # grid of the pattern search
    rotation_step_deg: float = 16.0  # first pattern-search steps, halved when nothing improves
    translation_step_mm: float = 8.0
    min_rotation_step_deg: float = 3.0  # stop below this step (the diffusion and refinement do the rest)
    max_search_rounds: int = 40  # pattern-search rounds per start (12 poses scored per round)
    keep: int = 2  # distinct polished starts that go on to the diffusion and refinement
    distinct_deg: float = 20.0  # two starts closer than this are one
    # A start after the first runs only when its search score is within this of the best's (or the
    # results so far are doubtful): near-ties are settled by the full registration, clear losers skipped.
    runner_up_margin: float = 0.05
    histogram_bins: int = 24
    max_field_of_view_mm: float = 320.0  # cube side around the fixed centre: the fixed extent, capped
    # Score only the fixed voxels above this fraction of its [0, 1] range, dilated by the margin
    # (None: the whole cube). The far air says nothing about the pose, and a moving scan that covers
    # more (face, neck, table: the cadaver CT onto the skull-cap CT template) outscores the right pose
    # with a flipped one when it is counted (bench/results/affine.md).
    foreground_fraction: float | None = None
    foreground_margin_mm: float = 16.0

    def validate(self) -> None:
        if self.candidates not in ("cube", "cube-corners"):
            raise InputError(f"inference.pose_search.candidates {self.candidates!r}: use cube or cube-corners")
        if self.keep < 1 or self.polish < self.keep:
            raise InputError("inference.pose_search needs keep >= 1 and polish >= keep")
        if min(self.spacing_mm, self.polish_spacing_mm, self.min_rotation_step_deg) <= 0 or self.histogram_bins < 2:
            raise InputError("inference.pose_search spacings and steps must be > 0 and histogram_bins >= 2")
        fraction = self.foreground_fraction
        if fraction is not None and not (0.0 <= fraction < 1.0 and self.foreground_margin_mm >= 0):
            raise InputError("inference.pose_search needs 0 <= foreground_fraction < 1 (or null) and foreground_margin_mm >= 0")


@dataclass(frozen=True)
class ModalityDoubt:
    """The doubt threshold of one modality (what a good alignment of that modality's images scores
    differs: cross-subject head CTs reach less normalised mutual information than T1 brains)."""

    modality: str
    doubtful_below: float


@dataclass(frozen=True)
class SimilarityCheck:
    """The final similarity of a registration and when to call it doubtful.

    Normalised mutual information (2 I / (H_f + H_m)) of the fixed image and the moving image
    through the result on a ``spacing_mm`` grid; below the threshold of the registration's
    modality (``per_modality``, else ``doubtful_below``) the command warns and the JSON report
    says ``"doubtful": true`` (None: never). Also ranks the pose-search starts."""

    spacing_mm: float = 4.0
    histogram_bins: int = 24
    doubtful_below: float | None = None  # every modality not in ``per_modality``
    max_field_of_view_mm: float = 320.0
    per_modality: tuple[ModalityDoubt, ...] = ()

    def threshold(self, modality: str) -> float | None:
        """The doubt threshold of ``modality`` (None: never doubtful)."""
        for entry in self.per_modality:
            if entry.modality == modality:
                return entry.doubtful_below
        return self.doubtful_below


@dataclass(frozen=True)
class AffineInference:
    """Registration defaults of a model: what ``register_affine``, ``diffusionreg affine`` and the
    Slicer panel use when not told otherwise (stored in the model's ``config.json``)."""

    steps: int | None = None  # reverse-process steps (None: all ``timesteps``)
    bidirectional: bool = False  # second pass with the images swapped (twice the time)
    initialize: str = "moments"  # pre-alignment of the network grids (vocabulary.INITIALIZATIONS)
    # Test-time refinement after the diffusion (no levels: the published method alone). On by
    # default: it took the benchmark from 10/10 synthetic failures to 0/10 (bench/results/affine.md).
    refine: RefineConfig = field(default_factory=RefineConfig)
    pose_search: PoseSearchConfig = field(default_factory=PoseSearchConfig)
    similarity: SimilarityCheck = field(default_factory=SimilarityCheck)

    def validate(self) -> None:
        self.pose_search.validate()
        if self.similarity.spacing_mm <= 0 or self.similarity.histogram_bins < 2:
            raise InputError("inference.similarity needs spacing_mm > 0 and histogram_bins >= 2")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"inference.steps must be >= 1 or null, got {self.steps}")
        if self.initialize not in INITIALIZATIONS:
            raise InputError(f"inference.initialize {self.initialize!r}: use one of {', '.join(INITIALIZATIONS)}")
        if any(level.iterations < 0 or min(np.atleast_1d(level.spacing_mm)) <= 0 for level in self.refine.levels):
            raise InputError("inference.refine levels need iterations >= 0 and spacing_mm > 0")
        if self.refine.metric not in ("mi", "ncc"):
            raise InputError(f"inference.refine.metric {self.refine.metric!r}: use mi or ncc")


@dataclass
class AffineConfig:
    """All hyper-parameters of the network, the diffusion schedule and training."""

    name: str = "compact"
    # --- network grid -------------------------------------------------------------
    # An integer / a number: a cube (every shipped MRI model); [D0, D1, D2] / [s0, s1, s2]: a box
    # with per-axis spacing (OCT). Array axes (i, j, k) run along L, P, S (preprocess.network_grid).
    grid_size: int | tuple[int, int, int] = 64  # network grid, voxels (per side or per axis)
    spacing_mm: float | tuple[float, float, float] = 3.5  # network grid spacing (isotropic or per axis)
    # --- network ------------------------------------------------------------------
    widths: tuple[int, ...] = (2, 16, 32, 64, 64, 128, 128)
    norm_groups: int = 8  # GroupNorm groups (full: 32)
    time_dim: int = 128  # sinusoidal embedding size (full: 256)
    time_hidden: int = 512  # MLP hidden size (full: 1024)
    n_classes: int = 1  # modality classes; >1 adds class embeddings
    class_names: tuple[str, ...] = ("mri",)
    class_dropout: float = 0.15  # training: share of samples whose class id becomes 0 (agnostic)
    # Class-0 samples of a multi-modality training get random contrast changes on each copy
    # (:mod:`diffusionreg.affine.contrast`), so the agnostic class does not learn one modality's look.
    agnostic_remap_prob: float = 0.8  # random monotone intensity curve (MONAI RandHistogramShift)
    agnostic_remap_points: int = 6  # its control points (ends fixed)
    agnostic_invert_prob: float = 0.3  # inverted foreground contrast (T1 <-> T2 like)
    agnostic_foreground: float = 0.05  # [0, 1] intensity above which a voxel counts as foreground
    zero_init_head: bool = True  # reference does not zero-init (full: False)
    # --- diffusion schedule -------------------------------------------------------
    timesteps: int = 65
    schedule: str = "cosine"  # 'cosine' | 'linear'
    lin_std: tuple[float, float] = (0.01, 0.07)
    trans_std_vox: tuple[float, float] = (0.125, 1.0)  # full: (0.5, 4.0) at 256^3
    affine_prob: float = 0.8
    clamp_sigmas: float = 2.5
    # --- augmentation -------------------------------------------------------------
    global_rotation_deg: float = 15.0  # full: 180 (about y only, as the reference)
    global_rotation_axes: str = "xyz"  # full: 'y'
    global_shift_vox: float = 6.0  # full: 15
    global_scale: tuple[float, float] = (0.9, 1.1)  # full: (1, 1)
    artifact_prob: float = 0.5
    elastic_grid: tuple[int, int, int] = (14, 7, 7)  # along (axial, en-face, en-face)
    elastic_std_vox: float = 0.75  # full: 3
    motion_max: int = 9
    motion_band: tuple[int, int] = (2, 4)  # frames; full (5, 16)
    motion_shift: tuple[int, int] = (2, 7)  # voxels; full (5, 29)
    doubling_alpha: float = 0.35
    doubling_shift: int = 6  # voxels; full 25
    shadow_grid: tuple[int, int, int] = (12, 6, 6)
    stretch_prob: float = 0.25  # the reference never used its stretch artifact
    stretch_band: tuple[int, int] = (2, 6)
    crop_floor: float = 0.6  # keep at least this fraction (MRI 0.6, OCT 0.75)
    gamma_range: tuple[float, float] = (0.7, 1.4)
    noise_std: float = 0.02
    # --- optimisation -------------------------------------------------------------
    lr: float = 1e-4 * 5
    warmup_steps: int = 300
    batch_size: int = 4
    ema_beta: float = 0.995
    ema_power: float = 0.75
    ema_start: int = 100
    seed: int = 42
    # --- preprocessing ------------------------------------------------------------
    intensity_percentile: float = 99.8  # upper clip before min-max to [-1, 1] (OCT/OCTA: none)
    clahe_kernel_mm: float = 32.0  # venous MRI: CLAHE tile side (spec: 32 voxels at about 1 mm)
    clahe_clip: float = 0.05  # venous MRI: CLAHE clip limit, fraction of a tile's voxels per bin
    # --- registration defaults ------------------------------------------------------
    inference: AffineInference = field(default_factory=AffineInference)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AffineConfig:
        """Strict: unknown keys and wrong types are refused (:mod:`diffusionreg.strict_config`)."""
        cfg = from_dict(cls, data, "affine config")
        cfg.validate_grid()
        cfg.inference.validate()
        for where, named in (
            ("similarity.per_modality", [entry.modality for entry in cfg.inference.similarity.per_modality]),
            ("refine.foreground_modalities", list(cfg.inference.refine.foreground_modalities or ())),
        ):
            unknown = sorted(set(named) - set(cfg.modalities))
            if unknown or len(set(named)) != len(named):
                raise InputError(
                    f"affine config.inference.{where}: {', '.join(unknown) or 'a repeated modality'}; "
                    f"name each of the model's modalities ({', '.join(cfg.modalities)}) at most once"
                )
        return cfg

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Network grid shape (D0, D1, D2) = array axes (i, j, k)."""
        size = self.grid_size
        return (size,) * 3 if isinstance(size, int) else tuple(size)  # type: ignore[return-value]

    @property
    def grid_spacing(self) -> tuple[float, float, float]:
        """Network grid spacing (mm) along array axes (i, j, k)."""
        spacing = self.spacing_mm
        return (spacing,) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)  # type: ignore[return-value]

    def validate_grid(self) -> None:
        """A network grid of >= 2 voxels per axis and positive spacings (the one-line error names the key)."""
        size, spacing = (list(v) if isinstance(v, tuple) else v for v in (self.grid_size, self.spacing_mm))  # as in JSON
        if len(self.grid_shape) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.grid_shape):
            raise InputError(f"affine config.grid_size {size}: use an integer >= 2 or three of them [D0, D1, D2]")
        if len(self.grid_spacing) != 3 or any(not s > 0 for s in self.grid_spacing):
            raise InputError(f"affine config.spacing_mm {spacing}: use a number > 0 or three of them [s0, s1, s2] (mm)")

    @classmethod
    def from_json_file(cls, path: str) -> AffineConfig:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    @property
    def modalities(self) -> tuple[str, ...]:
        """What ``--modality`` may name with this model: its classes, and ``any`` when it has a
        trained agnostic class 0 (several classes with class dropout)."""
        agnostic = self.n_classes > 1 and self.class_dropout > 0
        return tuple(self.class_names) + ((ANY_MODALITY,) if agnostic else ())

    def with_classes(self, modalities) -> AffineConfig:
        """This config for a training on ``modalities`` (in order, repeats removed): class ids
        1..N in that order, one class (no embedding) when there is one modality."""
        names = tuple(dict.fromkeys(modalities))
        return dataclasses.replace(self, class_names=names, n_classes=len(names) if len(names) > 1 else 1)

    def class_index(self, modality: str | None) -> int:
        """Class id for a modality: 1..N as listed in class_names, 0 = modality-agnostic."""
        if self.n_classes <= 1 or modality in (None, ANY_MODALITY):
            return 0
        if modality not in self.class_names:
            return 0
        return self.class_names.index(modality) + 1

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Spatial shape of the last encoder feature map (= head kernel), per axis."""

        def last(size: int) -> int:
            size = (size + 2 - 4) // 2 + 1  # in_conv: kernel 4, stride 2, padding 1
            for _ in range(len(self.widths) - 2):  # each block: kernel 3, stride 2, padding 1
                size = (size - 1) // 2 + 1
            return size

        return tuple(last(n) for n in self.grid_shape)  # type: ignore[return-value]


#: Registration defaults that a model trained from a preset is exported with: the any-pose start
#: on (issue 16). A config.json without ``pose_search`` (a model from before it) keeps it off.
TRAINED_INFERENCE = AffineInference(pose_search=PoseSearchConfig(enabled=True))


def compact() -> AffineConfig:
    return AffineConfig(inference=TRAINED_INFERENCE)


def full() -> AffineConfig:
    return AffineConfig(
        name="full",
        inference=TRAINED_INFERENCE,
        grid_size=256,
        spacing_mm=1.0,
        widths=(2, 64, 128, 256, 256, 512, 1024),
        norm_groups=32,
        time_dim=256,
        time_hidden=1024,
        zero_init_head=False,
        trans_std_vox=(0.5, 4.0),
        global_rotation_deg=180.0,
        global_rotation_axes="y",
        global_shift_vox=15.0,
        global_scale=(1.0, 1.0),
        elastic_std_vox=3.0,
        motion_band=(5, 16),
        motion_shift=(5, 29),
        doubling_shift=25,
        stretch_prob=0.0,
        stretch_band=(5, 16),
        gamma_range=(1.0, 1.0),
        noise_std=0.0,
        lr=1e-4,
        warmup_steps=5000,
    )


def retinal_oct() -> AffineConfig:
    """Retinal OCT / OCTA on an anisotropic network grid (the compact network's widths).

    The spec's volumes are 245 x 384 x 245 voxels with depth (A-scan) along the second array
    axis; a ~6 x 2 x 6 mm scan is sampled at about (0.024, 0.005, 0.024) mm. A cube cannot hold
    that: at the depth spacing it would need 1200 voxels per side, at the en-face spacing it
    would keep 80 depth voxels of 384. The network grid here is 64 x 96 x 64 voxels of
    (0.094, 0.020, 0.094) mm = 6.0 x 1.9 x 6.0 mm: the scan's field of view, with each axis
    downsampled about 4x (245 / 64, 384 / 96), so layer spacing in depth keeps its share of the
    grid; 64 x 96 x 64 = 0.39 M voxels is 1.5x the compact 64^3 brain grid, so a CPU trains it,
    and 96 = 64 x 1.5 survives the six stride-2 stages (head kernel 1 x 2 x 1). Depth is expected
    along the second array axis in LPS (P), the published loader's axis 1 (a file that stores
    depth elsewhere is resampled by its own header: the network grid is LPS-aligned).

    Augmentations as published for retina: the global rotation turns only about the depth axis
    (torch y = array axis j, an en-face rotation; a rotation in normalised coordinates is a
    physical one only between axes of equal extent, here the two en-face axes), the random crop
    keeps >= 75 % en face (artifacts.py), and the Gabor filter bank is applied to the network
    input in training and inference (``preprocess.network_filter``). Registration defaults are
    sized in mm for a retina: refinement on per-axis grids (2x, then 1x the network spacing) with a
    3 mm lever arm, similarity
    on a 0.1 mm grid, no pose search (its candidates are whole-head cube rotations).
    """
    base = compact()
    refine = RefineConfig(
        # per axis, over the scan's own extent: twice the network spacing, then the network spacing
        levels=(RefineLevel((0.188, 0.040, 0.188), 50), RefineLevel((0.094, 0.020, 0.094), 50)),
        scale_mm=3.0,  # a unit step moves ~3 mm: half the en-face extent, as 100 mm is for a head
        max_field_of_view_mm=8.0,
    )
    inference = AffineInference(
        refine=refine,
        pose_search=PoseSearchConfig(enabled=False),
        similarity=SimilarityCheck(spacing_mm=0.1, max_field_of_view_mm=8.0),
    )
    return dataclasses.replace(
        base,
        name="oct",
        grid_size=(64, 96, 64),
        spacing_mm=(0.094, 0.020, 0.094),
        class_names=("oct",),
        global_rotation_deg=180.0,
        global_rotation_axes="y",
        inference=inference,
    )


PRESETS = {"compact": compact, "full": full, "oct": retinal_oct}


def get_config(name_or_path: str) -> AffineConfig:
    """Preset name ('compact' | 'full' | 'oct') or a JSON file written by ``to_json``."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    if name_or_path.endswith(".json"):
        try:
            return AffineConfig.from_json_file(name_or_path)
        except OSError as exc:
            raise InputError(f"cannot read config {name_or_path}: {exc}") from exc
    raise InputError(f"unknown config {name_or_path!r}; use {', '.join(PRESETS)} or a .json file")
