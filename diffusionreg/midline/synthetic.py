"""Synthetic midline shift of known size, made from a normal head (the training data the method needs).

Everything is defined in template space (SCCT/MNI, LPS mm, midsagittal plane ``x = m``):

* A **mass effect** is a map ``phi(q) = q + u(q)`` with ``u = (u_x, 0, 0)``. A shifted head shows
  at ``q`` what the normal head shows at ``phi(q)`` (the ITK direction: shifted -> normal), so a
  structure whose normal place is on the midline appears where ``phi`` sends a point to the
  plane ``x = m``, displaced by ``-u`` there.
  ``u_x(q) = -side A h(x - m) w_y(y) w_z(z)`` with ``h(d) = (1 - (d/W)^2)^2`` (zero at the inner
  table ``|d| = W``), ``w_y`` a sin^2 window that is zero at both falx attachments and one at
  ``y0``, ``w_z`` a Gaussian about ``z0``. ``A`` is chosen so that the midline at ``(y0, z0)`` is
  displaced by exactly ``peak_mm``; the map is a diffeomorphism because ``|du_x/dx| < 1``
  (checked). Its Jacobian determinant is ``1 + du_x/dx``.
* A **lesion** (hyperdense haemorrhage 50-90 HU or hypodense oedema) is painted on the side the
  midline moves away from, in normal-anatomy coordinates (so it moves with the tissue).
* The **landmarks** of a slice come from the field: on each row, the point the map sends to the
  ideal midline (the shifted structure) and its image (its normal position); the row of the largest
  displacement gives the slice's shifted/normal pair, the midline at the falx attachments gives
  the anterior/posterior falx points.

Slices for training (:func:`synth_slices`) add what a scanner and an imperfect alignment vary:
residual pose (rotation, pitch, shift, scale), slice thickness (partial volume), noise, HU offset.
:func:`synth_case` writes a whole CT of a chosen pose and slice thickness (``diffusionreg midline synth``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from diffusionreg.image import Image
from diffusionreg.spaces import homogeneous, rotation_about_axis

from .config import HeadFrame, SynthConfig
from .headframe import AIR_HU, THICKNESS_SAMPLES, map_points, midline_column, sample_hu, slice_affine, slice_points, window

#: Edge width (mm) of the painted lesion's logistic border.
LESION_EDGE_MM = 2.0
#: HU range of the tissue a lesion replaces (not air, not bone).
LESION_TISSUE_HU = (-5.0, 70.0)
#: Bisection steps of the landmark solve (bracket of ~2 W mm halves each step).
BISECTION_STEPS = 48


@dataclass(frozen=True)
class MassEffect:
    """One synthetic mass effect in template space (mm, LPS)."""

    peak_mm: float  # displacement of the midline at (shift_y, shift_z), >= 0
    side: int  # +1: the midline moves towards +x (patient left); -1: towards the right
    shift_y_mm: float
    shift_z_mm: float
    sigma_z_mm: float
    half_width_mm: float  # W: the field is zero at |x - m| >= W
    falx_y_mm: tuple[float, float]  # (anterior, posterior) attachments: the field is zero there
    midline_x_mm: float
    lesion_centre_mm: tuple[float, float, float]
    lesion_radius_mm: float
    lesion_hu: float

    @property
    def amplitude(self) -> float:
        """A such that the midline point at the maximum moves by exactly ``peak_mm``."""
        return self.peak_mm / (1.0 - (self.peak_mm / self.half_width_mm) ** 2) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    # --------------------------------------------------------------------------- the field
    def _profile(self, d: torch.Tensor) -> torch.Tensor:
        inside = (d / self.half_width_mm).clamp(-1.0, 1.0)
        return (1.0 - inside**2) ** 2

    def _window_y(self, y: torch.Tensor) -> torch.Tensor:
        anterior, posterior = self.falx_y_mm
        y0 = self.shift_y_mm
        s = torch.where(y < y0, 0.5 * (y - anterior) / (y0 - anterior), 0.5 + 0.5 * (y - y0) / (posterior - y0))
        return torch.where((s > 0) & (s < 1), torch.sin(math.pi * s) ** 2, torch.zeros_like(s))

    def weight(self, q: torch.Tensor) -> torch.Tensor:
        """``w_y(y) w_z(z)`` at points ``(B, 3, ...)``: the field's fall-off away from the maximum."""
        return self._window_y(q[:, 1]) * torch.exp(-0.5 * ((q[:, 2] - self.shift_z_mm) / self.sigma_z_mm) ** 2)

    def displacement_x(self, q: torch.Tensor) -> torch.Tensor:
        """``u_x`` (mm) at template points ``q`` ``(B, 3, ...)``: ``(B, ...)``."""
        return -self.side * self.amplitude * self._profile(q[:, 0] - self.midline_x_mm) * self.weight(q)

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """``phi(q)``: where the normal head shows what the shifted head shows at ``q``."""
        out = q.clone()
        out[:, 0] = q[:, 0] + self.displacement_x(q)
        return out

    def max_expansion(self) -> float:
        """Largest ``|du_x/dx|`` (must stay below 1 for a diffeomorphism)."""
        return self.amplitude * 8.0 / (3.0 * math.sqrt(3.0) * self.half_width_mm)

    def lesion_weight(self, q: torch.Tensor) -> torch.Tensor:
        """Lesion occupancy in [0, 1] at normal-anatomy points ``q`` (logistic edge)."""
        centre = torch.as_tensor(self.lesion_centre_mm, dtype=q.dtype).view(1, 3, *([1] * (q.dim() - 2)))
        distance = torch.linalg.vector_norm(q - centre, dim=1)
        return torch.sigmoid((self.lesion_radius_mm - distance) / (LESION_EDGE_MM / 4.0))


def paint_lesion(hu: torch.Tensor, effect: MassEffect | None, q: torch.Tensor, brain: torch.Tensor | None = None) -> torch.Tensor:
    """HU ``(B, 1, ...)`` with the lesion painted over soft tissue at normal-anatomy points ``q``
    (only inside ``brain`` ``(B, 1, ...)`` in [0, 1] when given)."""
    if effect is None or effect.lesion_radius_mm <= 0:
        return hu
    low, high = LESION_TISSUE_HU
    weight = effect.lesion_weight(q)[:, None] * ((hu > low) & (hu < high)).to(hu.dtype)
    if brain is not None:
        weight = weight * brain
    return hu + weight * (effect.lesion_hu - hu)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def draw_mass_effect(cfg: SynthConfig, frame: HeadFrame, gen: torch.Generator, peak_mm: float | None = None) -> MassEffect:
    """A random mass effect (peak drawn from ``cfg.peak_mm`` unless given; side and lesion type random)."""
    side = 1 if float(torch.rand((), generator=gen)) < 0.5 else -1
    peak = _uniform(gen, *cfg.peak_mm) if peak_mm is None else float(peak_mm)
    hyper = float(torch.rand((), generator=gen)) < cfg.hyperdense_fraction
    y0 = _uniform(gen, *cfg.shift_y_mm)
    z0 = _uniform(gen, *cfg.shift_z_mm)
    radius = _uniform(gen, *cfg.lesion_radius_mm) * (0.3 + 0.7 * min(1.0, peak / max(cfg.peak_mm[1], 1e-6)))
    effect = MassEffect(
        peak_mm=peak,
        side=side,
        shift_y_mm=y0,
        shift_z_mm=z0,
        sigma_z_mm=_uniform(gen, *cfg.shift_sigma_z_mm),
        half_width_mm=cfg.skull_half_width_mm,
        falx_y_mm=tuple(cfg.falx_y_mm),
        midline_x_mm=frame.midline_x_mm,
        lesion_centre_mm=(
            frame.midline_x_mm - side * _uniform(gen, *cfg.lesion_x_mm),
            y0 + _uniform(gen, -15.0, 15.0),
            z0 + _uniform(gen, -10.0, 10.0),
        ),
        lesion_radius_mm=radius,
        lesion_hu=_uniform(gen, *cfg.lesion_hu[0 if hyper else 1]),
    )
    if effect.max_expansion() >= 1.0:
        raise ValueError(f"mass effect of {peak} mm is not diffeomorphic with half width {cfg.skull_half_width_mm} mm")
    return effect


# ------------------------------------------------------------------------------ landmarks
def _midline_crossing(effect: MassEffect | None, view: torch.Tensor, rows: torch.Tensor, frame: HeadFrame, z: float):
    """Column ``i`` on each row ``j`` of a slice where ``phi(view(p))`` lies on the midsagittal plane.

    ``view`` (4x4, float64) maps slice-frame LPS to template LPS (a residual pose); the slice is the
    frame plane at ``z``. Bisection on the exact map (the crossing is unique: ``|du_x/dx| < 1`` and
    the view is a small rotation)."""
    affine = torch.as_tensor(slice_affine(frame, z), dtype=torch.float64)
    band = frame.midline_band_mm / frame.pixel_mm + 2.0
    centre = midline_column(frame)
    low = torch.full_like(rows, centre - 3 * band)
    high = torch.full_like(rows, centre + 3 * band)

    def offset(i: torch.Tensor) -> torch.Tensor:
        pixel = torch.stack([i, rows, torch.zeros_like(i), torch.ones_like(i)], dim=0)
        world = (view @ affine @ pixel)[:3].T[:, :, None]  # (R, 3, 1) template points
        mapped = world[:, 0, 0] if effect is None else effect.apply(world)[:, 0, 0]
        return mapped - (effect.midline_x_mm if effect is not None else frame.midline_x_mm)

    sign_low = torch.sign(offset(low))
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (low + high)
        same = torch.sign(offset(mid)) == sign_low
        low, high = torch.where(same, mid, low), torch.where(same, high, mid)
    return 0.5 * (low + high)


def slice_landmarks(effect: MassEffect | None, frame: HeadFrame, z: float, view: np.ndarray | None = None) -> dict:
    """The four landmarks of the slice at ``z`` in slice pixels ``(i, j)``, from the field.

    Returns ``{"anterior_falx", "posterior_falx", "shifted", "normal"}`` (each ``(i, j)``) and
    ``mls_mm`` (template mm between shifted and normal, in the slice frame). ``view``: slice frame
    -> template LPS (default identity)."""
    view_t = torch.as_tensor(np.eye(4) if view is None else view, dtype=torch.float64)
    affine = torch.as_tensor(slice_affine(frame, z), dtype=torch.float64)
    anterior, posterior = effect.falx_y_mm if effect is not None else _default_falx(frame)
    to_row = float((view_t @ affine)[1, 1])
    first = (anterior + frame.falx_margin_mm - float((view_t @ affine)[1, 3])) / to_row
    last = (posterior - frame.falx_margin_mm - float((view_t @ affine)[1, 3])) / to_row
    rows = torch.arange(math.ceil(first), math.floor(last) + 1, dtype=torch.float64)
    columns = _midline_crossing(effect, view_t, rows, frame, z)
    pixels = torch.stack([columns, rows, torch.zeros_like(rows), torch.ones_like(rows)], dim=0)
    normal_pixels = _normal_pixels(effect, view_t @ affine, pixels)  # (4, R)
    distance = torch.linalg.vector_norm((pixels - normal_pixels)[:2], dim=0) * frame.pixel_mm
    best = int(torch.argmax(distance))
    ends = _midline_crossing(None, view_t, torch.tensor([float(rows[0]), float(rows[-1])], dtype=torch.float64), frame, z)
    return {
        "anterior_falx": (float(ends[0]), float(rows[0])),
        "posterior_falx": (float(ends[1]), float(rows[-1])),
        "shifted": (float(columns[best]), float(rows[best])),
        "normal": (float(normal_pixels[0, best]), float(normal_pixels[1, best])),
        "mls_mm": float(distance[best]),
    }


def _default_falx(frame: HeadFrame) -> tuple[float, float]:
    return SynthConfig().falx_y_mm


# ------------------------------------------------------------------------------ training slices
@dataclass
class NormalHead:
    """A normal head CT for the generator: HU volume ``(D0, D1, D2)`` on its world grid, and its
    pose (template LPS -> head LPS, 4x4)."""

    name: str
    volume: torch.Tensor
    affine: np.ndarray
    pose: np.ndarray
    brain: tuple[torch.Tensor, np.ndarray] | None = None  # template-space brain mask in [0, 1] and its
    # affine (the lesions stay inside it)
    _air_referenced: torch.Tensor | None = None  # volume - AIR_HU, made once (sampled with zero padding)

    def hu_at(self, points: torch.Tensor) -> torch.Tensor:
        """HU ``(B, 1, ...)`` at head-world LPS points ``(B, 3, ...)`` (air beyond the grid)."""
        if self._air_referenced is None:
            self._air_referenced = self.volume.float() - AIR_HU
        return sample_hu(self._air_referenced, self.affine, points, outside_hu=AIR_HU, referenced=True)


@dataclass
class SliceBatch:
    """Training slices: network input, the normal counterpart, and the truth."""

    x: torch.Tensor  # (B, 1, N, N) windowed to [-1, 1]
    hu: torch.Tensor  # (B, 1, N, N) the same in HU
    normal: torch.Tensor  # (B, 1, N, N) the same slice without the mass effect and lesion
    landmarks: torch.Tensor  # (B, 4, 2) slice pixels (i, j): anterior falx, posterior falx, shifted, normal
    midline: torch.Tensor  # (B, K, 2, 2) extra (shifted, normal) pairs along the midline
    field: torch.Tensor  # (B, 2, N, N) the true field (slice pixels; zeros when truth=False)
    mls_mm: torch.Tensor  # (B,) case MLS (slice-frame mm): the peak of the mass effect
    slice_mls_mm: torch.Tensor  # (B,) this slice's MLS from its landmarks


def _residual_pose(cfg: SynthConfig, gen: torch.Generator) -> np.ndarray:
    """Slice frame -> template: a small rotation (in plane and pitch), shift and scale."""
    yaw = _uniform(gen, -cfg.rotation_deg, cfg.rotation_deg)
    pitch = _uniform(gen, -cfg.pitch_deg, cfg.pitch_deg)
    scale = _uniform(gen, 1.0 - (1.0 - cfg.scale[0]) / 3.0, 1.0 + (cfg.scale[1] - 1.0) / 3.0)
    linear = rotation_about_axis((0, 0, 1), yaw) @ rotation_about_axis((1, 0, 0), pitch) * scale
    shift = [_uniform(gen, -cfg.shift_pose_mm, cfg.shift_pose_mm) for _ in range(3)]
    return homogeneous(linear, shift)


def synth_slices(
    heads: list[NormalHead],
    frame: HeadFrame,
    cfg: SynthConfig,
    gen: torch.Generator,
    batch: int,
    shifted_fraction: float = 1.0,
    z_range: tuple[float, float] | None = None,
    truth: bool = True,
    midline_points: int = 8,
) -> SliceBatch:
    """A batch of training slices: each a random head, residual pose, level, thickness, noise and HU
    offset; a mass effect with probability ``shifted_fraction`` (its peak may be 0: ``cfg.zero_fraction``)."""
    z_low, z_high = z_range or frame.training_z_mm
    xs, hus, normals, marks, pairs, mls, slice_mls, fields = [], [], [], [], [], [], [], []
    k = midline_points
    for _ in range(batch):
        head = heads[int(torch.randint(len(heads), (), generator=gen))]
        view = _residual_pose(cfg, gen)
        z = _uniform(gen, z_low, z_high)
        thickness = _uniform(gen, *cfg.slice_mm)
        effect = None
        if float(torch.rand((), generator=gen)) < shifted_fraction:
            zero = float(torch.rand((), generator=gen)) < cfg.zero_fraction
            effect = draw_mass_effect(cfg, frame, gen, peak_mm=0.0 if zero else None)
            # put the maximum near this slice often enough to see large shifts
            effect = _near(effect, z, gen)
        points = map_points(torch.as_tensor(view), slice_points(frame, torch.tensor([z]), torch.tensor([thickness])))
        both = []
        for deform in (True, False):
            q = effect.apply(points) if (deform and effect is not None) else points
            hu = head.hu_at(map_points(torch.as_tensor(head.pose), q))
            if deform:
                hu = paint_lesion(hu, effect, q, _brain_at(head, q))
            both.append(hu.mean(dim=-1))
        noise = _uniform(gen, *cfg.noise_hu) * torch.randn(both[0].shape, generator=gen)
        offset = _uniform(gen, -cfg.window_jitter_hu, cfg.window_jitter_hu)
        hus.append(both[0] + noise + offset)
        xs.append(window(hus[-1], frame))
        normals.append(window(both[1] + offset, frame))
        mls.append(0.0 if effect is None else effect.peak_mm / float(np.cbrt(np.linalg.det(view[:3, :3]))))
        if not truth:
            marks.append(torch.zeros(4, 2))
            pairs.append(torch.zeros(k, 2, 2))
            fields.append(torch.zeros(2, frame.slice_size, frame.slice_size))
            slice_mls.append(0.0)
            continue
        lm = slice_landmarks(effect, frame, z, view)
        marks.append(torch.tensor([lm["anterior_falx"], lm["posterior_falx"], lm["shifted"], lm["normal"]]))
        pairs.append(_midline_pairs(effect, frame, z, view, k))
        fields.append(slice_field(effect, frame, z, view))
        slice_mls.append(lm["mls_mm"])
    return SliceBatch(
        x=torch.cat(xs).float(),
        hu=torch.cat(hus).float(),
        normal=torch.cat(normals).float(),
        landmarks=torch.stack(marks).float(),
        midline=torch.stack(pairs).float(),
        field=torch.stack(fields),
        mls_mm=torch.tensor(mls, dtype=torch.float32),
        slice_mls_mm=torch.tensor(slice_mls, dtype=torch.float32),
    )


def _brain_at(head: NormalHead, q: torch.Tensor) -> torch.Tensor | None:
    """The template brain mask at template points ``q`` (None: no mask known)."""
    if head.brain is None:
        return None
    mask, affine = head.brain
    return sample_hu(mask, affine, q, outside_hu=0.0, referenced=True)


def _near(effect: MassEffect, z: float, gen: torch.Generator) -> MassEffect:
    """Half the time, move the maximum within one sigma of the slice (more informative slices)."""
    if float(torch.rand((), generator=gen)) < 0.5:
        return effect
    z0 = z + _uniform(gen, -1.0, 1.0) * effect.sigma_z_mm * 0.5
    centre = effect.lesion_centre_mm
    return MassEffect(
        **{**effect.to_dict(), "shift_z_mm": z0, "lesion_centre_mm": (centre[0], centre[1], z0 + centre[2] - effect.shift_z_mm)}
    )


def _normal_pixels(effect: MassEffect | None, to_template: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Where the normal anatomy is for homogeneous slice pixels ``(4, M)`` (float64): each pixel is
    mapped to template LPS mm by ``to_template`` (slice pixels -> template), through the mass
    effect's ``phi`` (shifted -> normal, template mm) and back to slice pixels. ``(4, M)``."""
    template = to_template @ pixels
    mapped = template.clone()
    if effect is not None:
        mapped[:3] = effect.apply(template[:3].T[:, :, None])[:, :, 0].T
    return torch.linalg.inv(to_template) @ mapped


def slice_field(effect: MassEffect | None, frame: HeadFrame, z: float, view: np.ndarray) -> torch.Tensor:
    """The true field ``(2, N, N)`` of the slice at ``z`` (slice pixels, channel 0 along i): at every
    pixel ``p``, ``normal(p) - p``, the displacement of the map observed (shifted) slice -> normal
    anatomy that the landmarks and the losses' ``u`` use (0 everywhere without a mass effect).
    ``view``: slice frame -> template LPS."""
    n = frame.slice_size
    if effect is None:
        return torch.zeros(2, n, n)
    to_template = torch.as_tensor(view, dtype=torch.float64) @ torch.as_tensor(slice_affine(frame, z), dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    pixels = torch.stack(
        [i.flatten(), j.flatten(), torch.zeros(n * n, dtype=torch.float64), torch.ones(n * n, dtype=torch.float64)]
    )
    normal = _normal_pixels(effect, to_template, pixels)
    return (normal[:2] - pixels[:2]).reshape(2, n, n).float()


def _midline_pairs(effect: MassEffect | None, frame: HeadFrame, z: float, view: np.ndarray, count: int) -> torch.Tensor:
    """``count`` (shifted, normal) pixel pairs evenly along the displaced midline of the slice."""
    view_t = torch.as_tensor(view, dtype=torch.float64)
    affine = torch.as_tensor(slice_affine(frame, z), dtype=torch.float64)
    anterior, posterior = effect.falx_y_mm if effect is not None else _default_falx(frame)
    ys = torch.linspace(anterior + frame.falx_margin_mm, posterior - frame.falx_margin_mm, count, dtype=torch.float64)
    rows = (ys - float((view_t @ affine)[1, 3])) / float((view_t @ affine)[1, 1])
    columns = _midline_crossing(effect, view_t, rows, frame, z)
    pixels = torch.stack([columns, rows, torch.zeros_like(rows), torch.ones_like(rows)], dim=0)
    normal = _normal_pixels(effect, view_t @ affine, pixels)
    return torch.stack([pixels[:2].T, normal[:2].T], dim=1)  # (K, 2, 2)


# ------------------------------------------------------------------------------ whole cases
@dataclass(frozen=True)
class Acquisition:
    """How the synthetic CT is acquired: head pose in the scanner, grid, slice thickness, noise."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # about x (pitch), y (roll), z (yaw)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_mm: float = 0.9
    slice_mm: float = 5.0
    size: int = 256
    z_range_mm: tuple[float, float] = (-50.0, 80.0)  # template z covered
    noise_hu: float = 3.0
    hu_offset: float = 0.0  # 1024: stored as HU + 1024 (unsigned)


def synth_case(
    head: NormalHead, effect: MassEffect | None, frame: HeadFrame, acquisition: Acquisition, gen: torch.Generator
) -> tuple[Image, dict]:
    """A synthetic CT of ``head`` with ``effect``, and its truth (world LPS mm of the new CT).

    The new CT's grid is axial in the scanner; the scanner sees the head turned by
    ``acquisition.rotation_deg`` about its template centre. Truth: the case MLS (mm of the head),
    side, and per measured slice (template z levels of the frame) the four landmarks in LPS.
    """
    rx, ry, rz = acquisition.rotation_deg
    turn = rotation_about_axis((1, 0, 0), rx) @ rotation_about_axis((0, 1, 0), ry) @ rotation_about_axis((0, 0, 1), rz)
    head_scale = float(np.cbrt(abs(np.linalg.det(head.pose[:3, :3]))))
    # The scanner world is a rigid copy of the head's: the head turned about its centre c and shifted.
    centre = (head.pose @ np.array([frame.centre_mm[0], frame.centre_mm[1], 0.0, 1.0]))[:3]
    scan_to_head = homogeneous(turn, centre - turn @ (centre + np.asarray(acquisition.shift_mm, dtype=np.float64)))
    template_of_scan = np.linalg.inv(head.pose) @ scan_to_head  # scan world -> template
    n = acquisition.size
    z_low, z_high = (v * head_scale for v in acquisition.z_range_mm)
    depth = max(3, int(round((z_high - z_low) / acquisition.slice_mm)))
    half = (n - 1) / 2.0 * acquisition.pixel_mm
    affine = np.diag([acquisition.pixel_mm, acquisition.pixel_mm, acquisition.slice_mm, 1.0])
    affine[:3, 3] = [centre[0] - half, centre[1] - half, centre[2] + z_low + acquisition.slice_mm / 2]
    out = np.empty((n, n, depth), dtype=np.float32)
    axis = torch.arange(n, dtype=torch.float64)
    fractions = (torch.arange(THICKNESS_SAMPLES, dtype=torch.float64) + 0.5) / THICKNESS_SAMPLES - 0.5
    for k in range(depth):
        ii, jj, ff = torch.meshgrid(axis, axis, k + fractions, indexing="ij")
        voxel = torch.stack([ii, jj, ff, torch.ones_like(ii)], 0).reshape(4, -1)
        world = torch.as_tensor(affine, dtype=torch.float64) @ voxel
        q = (torch.as_tensor(template_of_scan) @ world)[:3].reshape(1, 3, n, n, THICKNESS_SAMPLES)
        q = effect.apply(q) if effect is not None else q
        hu = head.hu_at(map_points(torch.as_tensor(head.pose), q))
        hu = paint_lesion(hu, effect, q, _brain_at(head, q)).mean(dim=-1)[0, 0]
        hu = hu + acquisition.noise_hu * torch.randn(hu.shape, generator=gen)
        out[:, :, k] = hu.numpy() + acquisition.hu_offset
    if acquisition.hu_offset > 0:  # stored unsigned: nothing below 0 (a scanner's padding included)
        np.clip(out, 0.0, None, out=out)
    scan_of_template = np.linalg.inv(template_of_scan)
    slices = []
    for z in measured_levels(frame):
        lm = slice_landmarks(effect, frame, z)
        pixel_to_scan = scan_of_template @ slice_affine(frame, z)
        points = {name: _to_world(pixel_to_scan, lm[name]) for name in ("anterior_falx", "posterior_falx", "shifted", "normal")}
        mls = float(np.linalg.norm(np.subtract(points["shifted"], points["normal"])))
        slices.append({"z_template_mm": z, "mls_mm": mls, **points})
    truth = {
        "case_mls_mm": 0.0 if effect is None else effect.peak_mm * head_scale,
        "side": "none" if effect is None or effect.peak_mm == 0 else ("left" if effect.side > 0 else "right"),
        "mass_effect": None if effect is None else effect.to_dict(),
        "acquisition": asdict(acquisition),
        "slices": slices,
    }
    return Image(out, affine), truth


def measured_levels(frame: HeadFrame) -> list[float]:
    """Template z of the measured slices: ``measured_z_mm`` in steps of the slice thickness."""
    low, high = frame.measured_z_mm
    count = int(math.floor((high - low) / frame.slice_mm + 1e-9)) + 1
    return [low + k * frame.slice_mm for k in range(count)]


def _to_world(pixel_to_world: np.ndarray, point: tuple[float, float]) -> list[float]:
    return (pixel_to_world @ np.array([point[0], point[1], 0.0, 1.0]))[:3].tolist()
