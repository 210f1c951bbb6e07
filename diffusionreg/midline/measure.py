"""Measure the midline shift of a head CT (the Python API behind ``diffusionreg midline``).

1. HU: HU + 1024 data is detected and converted (reported in the result); not-a-head-CT is refused.
2. Pose: ``T`` (template LPS -> CT LPS), rigid + isotropic scale (:mod:`midline.pose`).
3. Slices: the measured template levels, each the CT's mean over ``slice_mm`` at ``T(p)``.
4. Networks: ``r = eps_normal - eps_all`` at ``representation_t`` (fixed noise seeds, so a
   measurement is repeatable), the deformation network, scaling and squaring; the velocity
   averaged over the config's noise draws and, optionally, the mirrored slices.
5. Read-out (:mod:`midline.readout`) per slice; the landmarks are mapped through ``T`` into the
   CT's world and the MLS is their distance there, i.e. in the CT's own millimetres (the pose's
   scale and the CT's spacing included). Case MLS = the largest slice MLS.

Every output is in the CT's world (LPS mm): landmarks, and the displacement field on the CT grid
(``q -> T(phi(T^-1 q))`` on the measured slabs, zero elsewhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from diffusionreg.image import Image
from diffusionreg.spaces import apply_affine, sample

from .config import MidlineConfig
from .diffusion import ddpm_scheduler, diffusion_noise, representation
from .headframe import intracranial_mask, midline_column, slab_hu, slice_affine, window
from .heads import calibrate_soft_tissue
from .network import MidlineModel, as_volume, integrate, mirror_field, mirror_slices
from .pose import Pose, align_to_template, check_head_ct, to_hounsfield
from .readout import falx_rows, read_slice
from .synthetic import measured_levels

LANDMARK_NAMES = ("anterior_falx", "posterior_falx", "shifted", "normal")
#: Seed of the representation's noise (a measurement is deterministic).
NOISE_SEED = 0
#: Below this shift (mm) no side is reported ('none').
SIDE_MIN_MM = 0.5
#: A calibration shift (HU) this large is reported as a note: scanners differ by tens of HU, a few
#: HU is the normal spread of a soft-tissue median.
CALIBRATION_NOTE_HU = 10.0


@dataclass
class SliceResult:
    index: int  # 0-based measured slice
    z_template_mm: float
    mls_mm: float  # CT mm
    side: str  # 'left', 'right' or 'none' (the direction the midline structure moved)
    landmarks: dict[str, list[float]]  # name -> LPS mm of the CT
    rows_read: int


@dataclass
class MidlineResult:
    case_mls_mm: float
    flag: bool  # case MLS >= flag_mm
    flag_mm: float
    side: str
    max_slice: int | None  # index of the slice of the maximum (None: nothing measured)
    slices: list[SliceResult]
    pose: Pose
    hu_offset_removed: bool
    model: str
    soft_tissue_shift_hu: float = 0.0  # the calibration applied before measuring (HU)
    seconds: dict[str, float] = field(default_factory=dict)
    field_slices: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (z, u (2, N, N) px)

    def notes(self) -> list[str]:
        """What was done to the CT before measuring that a reader should know (one line each)."""
        notes = []
        if self.hu_offset_removed:
            notes.append("stored as HU + 1024: 1024 was subtracted before measuring")
        if abs(self.soft_tissue_shift_hu) >= CALIBRATION_NOTE_HU:
            notes.append(
                f"shifted by {self.soft_tissue_shift_hu:+.0f} HU to the soft-tissue calibration the model was "
                "trained at, before measuring"
            )
        return notes

    def to_dict(self) -> dict:
        return {
            "case_mls_mm": self.case_mls_mm,
            "flag": self.flag,
            "flag_threshold_mm": self.flag_mm,
            "side": self.side,
            "slice_of_maximum": self.max_slice,
            "slices": [
                {
                    "index": s.index,
                    "z_template_mm": s.z_template_mm,
                    "mls_mm": s.mls_mm,
                    "side": s.side,
                    "landmarks_lps_mm": s.landmarks,
                    "rows_read": s.rows_read,
                }
                for s in self.slices
            ],
            "pose_template_to_ct_lps": self.pose.matrix.tolist(),
            "pose_scale": self.pose.scale,
            "hu_offset_removed": self.hu_offset_removed,
            "soft_tissue_shift_hu": self.soft_tissue_shift_hu,
            "notes": self.notes(),
            "model": self.model,
            "seconds": self.seconds,
        }


@torch.no_grad()
def slice_fields(model: MidlineModel, cfg: MidlineConfig, x: torch.Tensor, device=None) -> torch.Tensor:
    """Displacements ``(S, 2, N, N)`` (slice pixels) of windowed slices ``x`` ``(S, 1, N, N)``.

    The velocity is averaged over ``inference.noise_draws`` draws of the representation's noise
    and, with ``inference.mirror_average``, over the mirrored slices (their velocity mirrored back),
    then integrated once. One draw without mirroring is the spec's single pass."""
    device = torch.device(device or "cpu")
    model = model.to(device).eval()
    x = x.to(device)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    t = torch.full((len(x),), cfg.diffusion.representation_t, dtype=torch.long, device=device)
    scheduler = ddpm_scheduler(cfg.diffusion)
    pool = cfg.frame.diffusion_pool

    def velocity(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        r = representation(model.eps_normal, model.eps_all, scheduler, images, t, noise, pool)
        return model.deform(torch.cat([images, r], 1))

    total = torch.zeros((len(x), 2, *x.shape[2:]), device=device)
    passes = 0
    for _ in range(cfg.inference.noise_draws):
        noise = diffusion_noise(x, pool, gen).to(device)
        total += velocity(x, noise)
        passes += 1
        if cfg.inference.mirror_average:
            # The same (not mirrored) noise: a mirrored input then sees the same pairs of
            # (image, noise), so its field is exactly the mirrored field.
            total += mirror_field(velocity(mirror_slices(x), noise))
            passes += 1
    return integrate(total / passes, cfg.deformation.squaring_steps).cpu()


def template_image(model: MidlineModel) -> Image:
    return Image(model.template_hu.numpy().astype(np.float32), model.template_affine.double().numpy())


def measure_midline(ct: Image, model: MidlineModel, model_name: str = "", device=None, stage=None) -> MidlineResult:
    """Measure ``ct`` (any units the HU detection accepts). ``stage``: optional progress stage
    (advanced once per pose level and once for the networks)."""
    cfg: MidlineConfig = model.cfg
    frame = cfg.frame
    seconds: dict[str, float] = {}
    start = time.monotonic()
    ct, offset = to_hounsfield(ct)
    check_head_ct(ct, cfg.inference)
    calibration = 0.0
    if cfg.inference.brain_median_hu is not None:
        ct, calibration = calibrate_soft_tissue(ct, cfg.inference.brain_median_hu)
    pose = align_to_template(ct, template_image(model), cfg.inference, stage)
    seconds["pose"] = time.monotonic() - start
    start = time.monotonic()
    levels = measured_levels(frame)
    volume = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))
    hu = slab_hu(volume, ct.affine, torch.as_tensor(pose.matrix), frame, levels, [frame.slice_mm] * len(levels))
    u = slice_fields(model, cfg, window(hu, frame), device)
    seconds["networks"] = time.monotonic() - start
    if stage is not None:
        stage.update(1)
    column = midline_column(frame)
    slices = []
    for index, z in enumerate(levels):
        rows = falx_rows(intracranial_mask(hu[index, 0].numpy()), column, frame.falx_margin_mm / frame.pixel_mm)
        if rows is None:
            continue  # no closed skull or no brain on the midline at this level
        reading = read_slice(u[index].numpy(), column, rows, (frame.pixel_mm, frame.pixel_mm), frame.midline_band_mm)
        to_ct = pose.matrix @ slice_affine(frame, z)
        world = {name: apply_affine(to_ct, np.array([[*getattr(reading, name), 0.0]]))[0].tolist() for name in LANDMARK_NAMES}
        mls = float(np.linalg.norm(np.subtract(world["shifted"], world["normal"])))
        moved = reading.shifted[0] - reading.normal[0]  # +i is the template's +x: patient left
        side = "none" if mls < SIDE_MIN_MM else ("left" if moved > 0 else "right")
        slices.append(SliceResult(index, z, mls, side, world, reading.rows_read))
    best = max(slices, key=lambda s: s.mls_mm) if slices else None
    case = best.mls_mm if best is not None else 0.0
    return MidlineResult(
        case_mls_mm=case,
        flag=case >= cfg.inference.flag_mm,
        flag_mm=cfg.inference.flag_mm,
        side=best.side if best is not None else "none",
        max_slice=best.index if best is not None else None,
        slices=slices,
        pose=pose,
        hu_offset_removed=offset,
        soft_tissue_shift_hu=calibration,
        model=model_name,
        seconds=seconds,
        field_slices=list(zip(levels, u.numpy())),
    )


#: CT slices (the grid's last axis) whose field values are computed together: bounds the working
#: arrays (about 6 MB per float64 point array per 512^2 slice) without changing any value.
FIELD_CHUNK_SLICES = 1


def _map_rows(linear: np.ndarray, offset: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points @ linear.T + offset`` for points ``(N, 3)``, element by element (float64): a point's
    value does not depend on how many points are mapped with it, so chunks give the same bits."""
    points = np.asarray(points, dtype=np.float64)
    return points[:, :1] * linear[:, 0] + points[:, 1:2] * linear[:, 1] + points[:, 2:3] * linear[:, 2] + offset


def displacement_field(ct_grid, result: MidlineResult, cfg: MidlineConfig, chunk_slices: int = FIELD_CHUNK_SLICES) -> Image:
    """The result's map as an ITK displacement field on the CT grid (LPS mm, ``(X, Y, Z, 3)``):
    ``D(q) = T(phi(T^-1 q)) - q`` on the measured slabs, zero elsewhere. Computed ``chunk_slices``
    CT slices at a time (any chunk size gives the same field, bit for bit)."""
    frame = cfg.frame
    pose = result.pose.matrix
    shape = tuple(ct_grid.shape)
    out = np.zeros(shape + (3,), dtype=np.float32)
    to_template = np.linalg.inv(pose) @ ct_grid.affine
    half = frame.slice_mm / 2.0
    linear = pose[:3, :3]
    slabs = [
        (z, np.linalg.inv(slice_affine(frame, z)), as_volume(torch.from_numpy(u)[None].double())) for z, u in result.field_slices
    ]
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for start in range(0, shape[2], max(1, int(chunk_slices))):
        stop = min(start + max(1, int(chunk_slices)), shape[2])
        k = np.arange(start, stop)
        index = np.stack(np.broadcast_arrays(i[..., None], j[..., None], k[None, None]), axis=-1).reshape(-1, 3)
        template_points = _map_rows(to_template[:3, :3], to_template[:3, 3], index)
        flat = np.zeros((len(index), 3), dtype=np.float32)
        for z, to_pixel, volume in slabs:
            inside = np.abs(template_points[:, 2] - z) <= half
            if not inside.any():
                continue
            pixel = _map_rows(to_pixel[:3, :3], to_pixel[:3, 3], template_points[inside])
            within = np.all((pixel[:, :2] >= -0.5) & (pixel[:, :2] <= frame.slice_size - 0.5), axis=1)
            positions = torch.from_numpy(np.c_[pixel[within, :2], np.zeros(int(within.sum()))].T[None])
            values = sample(volume, positions)[0, :2].numpy()  # (2, M) pixels
            displacement = np.zeros((int(within.sum()), 3))
            displacement[:, 0] = values[0] * frame.pixel_mm
            displacement[:, 1] = values[1] * frame.pixel_mm
            rows = np.nonzero(inside)[0][within]
            flat[rows] = _map_rows(linear, np.zeros(3), displacement).astype(np.float32)
        out[:, :, start:stop] = flat.reshape(shape[0], shape[1], stop - start, 3)
    return Image(out, ct_grid.affine.copy())
