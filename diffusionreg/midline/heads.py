"""Normal heads for the generator, and the template the pose is measured against.

The SCCT template (Rorden et al. 2012) comes in two forms in ``../shared/data/headct``: a 2 mm
head *with* skull in "Cormack" units (a compressed HU scale, BSD-2) and an unsmoothed 1 mm
skull-stripped brain in HU with its mask (GPL-2, ichseg). The pose template is the 2 mm head in
HU; the template *head* for training is the 1 mm brain (sharper ventricles and septum) inside its
mask and the 2 mm head outside it. Other normal heads (a real scan) enter with their pose found by
:func:`pose.align_to_template`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from diffusionreg.errors import InputError
from diffusionreg.image import Image, read_image, resample
from diffusionreg.io_atomic import atomic_output

from .config import MidlineInference
from .pose import align_to_template, check_head_ct, to_hounsfield
from .synthetic import NormalHead

TEMPLATE_HEAD = "scct_head_template_2mm.nii.gz"
TEMPLATE_BRAIN_HU = "scct_unsmooth_SS_0.01_1mm_HU.nii.gz"
TEMPLATE_BRAIN_MASK = "scct_unsmooth_SS_0.01_1mm_mask.nii.gz"

# Cormack units (Rorden's h2c): -1000..-100 HU -> 0..900, -100..100 HU -> 900..2900 (x10), then +1.
CORMACK_DARK = 900.0
CORMACK_MID_TOP = 2900.0
CORMACK_SCALE = 10.0


def cormack_to_hu(values: np.ndarray) -> np.ndarray:
    """Invert Rorden's HU -> Cormack compression (piecewise linear)."""
    values = np.asarray(values, dtype=np.float32)
    return np.where(
        values < CORMACK_DARK,
        values - 1000.0,
        np.where(values <= CORMACK_MID_TOP, (values - CORMACK_DARK) / CORMACK_SCALE - 100.0, values - CORMACK_MID_TOP + 100.0),
    ).astype(np.float32)


@functools.lru_cache(maxsize=2)
def pose_template(template_dir: Path) -> Image:
    """The 2 mm SCCT head with skull, in HU (the pose reference; read once per process)."""
    image = read_image(Path(template_dir) / TEMPLATE_HEAD, what="head template", dtype=np.float32)
    return image.with_array(cormack_to_hu(image.array))


@functools.lru_cache(maxsize=2)
def template_head(template_dir: Path) -> NormalHead:
    """The template as a normal head on the 1 mm grid (pose: identity; built once per process)."""
    template_dir = Path(template_dir)
    head = pose_template(template_dir)
    brain = read_image(template_dir / TEMPLATE_BRAIN_HU, what="template brain", dtype=np.float32)
    mask = read_image(template_dir / TEMPLATE_BRAIN_MASK, what="template brain mask", dtype=np.float32)
    outside = resample(head, brain.grid, None, "linear", default=-1000.0).array
    array = np.where(mask.array > 0.5, brain.array, outside).astype(np.float32)
    brain_mask = (torch.from_numpy((mask.array > 0.5).astype(np.float32)), brain.affine)
    return NormalHead("scct-template", torch.from_numpy(array), brain.affine, np.eye(4), brain_mask)


#: Soft-tissue range (HU) whose median calibrates a training head's brain to the template's.
BRAIN_RANGE_HU = (10.0, 90.0)


def brain_median_hu(array: np.ndarray) -> float:
    """Median of the soft-tissue voxels (a brain-dominated figure of a head's calibration)."""
    values = array[::2, ::2, ::2]
    return float(np.median(values[(values > BRAIN_RANGE_HU[0]) & (values < BRAIN_RANGE_HU[1])]))


def calibrate_soft_tissue(image: Image, target_hu: float) -> tuple[Image, float]:
    """``image`` (HU) shifted so that its soft-tissue median is ``target_hu``, and the shift (HU).
    Scanners (and scans of unverified calibration) differ by tens of HU; the networks learnt
    "normal" at one calibration."""
    shift = float(target_hu) - brain_median_hu(image.array)
    return image.with_array(image.array + np.float32(shift)), shift


def load_normal_head(
    path: Path,
    template: Image,
    settings: MidlineInference,
    log=print,
    brain_hu: float | None = None,
    pose_cache: Path | None = None,
) -> NormalHead:
    """A real normal head CT in HU with its pose relative to ``template``; with ``brain_hu``, shifted
    so that its soft-tissue median is that value (a scan of unverified calibration, e.g. the cadaver).
    ``pose_cache``: a JSON file of poses found before (by resolved path), read and extended."""
    image = read_image(path, what="normal head", dtype=np.float32)
    image, offset = to_hounsfield(image)
    if offset:
        log(f"{path}: stored as HU + 1024; subtracted 1024")
    if brain_hu is not None:
        image, shift = calibrate_soft_tissue(image, brain_hu)
        log(f"{path}: soft tissue calibrated to the template by {shift:+.1f} HU")
    check_head_ct(image, settings, what=str(path))
    key = str(Path(path).resolve())
    cached = json.loads(pose_cache.read_text(encoding="utf-8")) if pose_cache is not None and pose_cache.exists() else {}
    if key in cached:
        matrix = np.asarray(cached[key], dtype=np.float64)
        log(f"{path}: pose from {pose_cache}")
    else:
        pose = align_to_template(image, template, settings)
        matrix = pose.matrix
        log(f"{path}: pose scale {pose.scale:.3f}, MI {pose.score:.3f}")
        if pose_cache is not None:
            cached[key] = matrix.tolist()
            with atomic_output(pose_cache) as temporary:
                temporary.write_text(json.dumps(cached, indent=2), encoding="utf-8")
    return NormalHead(Path(path).name, torch.from_numpy(np.ascontiguousarray(image.array)), image.affine, matrix)


def training_heads(
    template_dir: Path, normal: list[Path], settings: MidlineInference, log=print, pose_cache: Path | None = None
) -> list[NormalHead]:
    """The template head plus each given normal head (aligned; poses cached in ``pose_cache``)."""
    if not (Path(template_dir) / TEMPLATE_HEAD).exists():
        raise InputError(f"head template not found: {Path(template_dir) / TEMPLATE_HEAD}")
    heads = [template_head(Path(template_dir))]
    reference = pose_template(Path(template_dir))
    brain_hu = brain_median_hu(heads[0].volume.numpy())
    for path in normal:
        head = load_normal_head(path, reference, settings, log, brain_hu, pose_cache)
        head.brain = heads[0].brain  # aligned to the template: its brain mask applies
        heads.append(head)
    return heads
