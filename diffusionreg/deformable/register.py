"""File-pair deformable registration with exact geometry.

Pipeline (all world coordinates LPS mm):

1. A network grid ``G`` (config shape and isotropic spacing, axes of the fixed image without
   obliquity, centred on the fixed image's foreground box) is built with
   :func:`diffusionreg.image.centred_grid`.
2. The fixed image is resampled onto ``G``; the moving image through the initial transform
   ``T0`` (fixed -> moving) onto ``G``; both are normalised as the model was trained.
3. The network (optionally after instance optimisation on the pair) gives voxel-unit fields
   on ``G``: ``u`` with ``moving_G(x + u(x)) ~ fixed_G(x)`` and its inverse ``w``. The optional
   velocity refinement (:mod:`.field_refine`) polishes them on a finer grid over the same box,
   which then takes the place of ``G`` below.
4. The output field on the fixed grid is exact in world terms:
   ``D(p) = T0(G (x + u(x))) - p`` with ``x = G^-1 p`` (``u`` trilinear, border-extended
   outside ``G``); the inverse on the moving grid is ``Dinv(q) = G (y + w(y)) - q`` with
   ``y = G^-1 T0^-1 q`` (``T0`` must then be affine). That ``Dinv`` is only the start: it is
   then solved against ``D`` as written (:mod:`.inverse_field`), so ``D(q + Dinv(q)) + Dinv(q)``
   is within the configured tolerance at every moving voxel whose image lies in the fixed grid.

So ``D`` alone (an ITK displacement field) carries the moving image onto the fixed one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from diffusionreg import fields, spaces
from diffusionreg.errors import InputError, ParameterError
from diffusionreg.image import (
    Grid,
    Image,
    as_probability,
    centred_grid,
    check_registrable,
    nearest_axis_direction,
    resample,
    resized_grid,
)
from diffusionreg.spaces import apply_affine
from diffusionreg.transforms import AffineTransform, DisplacementFieldTransform, compose

from .config import DeformableConfig
from .field_refine import refine_pair
from .icon import TwoStepICON
from .inverse_field import solve_inverse
from .losses import gradient_loss, ndv_loss, similarity_loss
from .pair_optimisation import adam_steps
from .sitreg import SITReg


# ----------------------------------------------------------------------------- models
def build_network(cfg: DeformableConfig) -> nn.Module:
    cfg.validate()
    if cfg.method == "sitreg":
        return SITReg(cfg.sitreg, cfg.grid_shape)
    return TwoStepICON(cfg.icon, cfg.grid_shape)


@dataclass
class DeformableModel:
    net: nn.Module
    cfg: DeformableConfig
    name: str = "untrained"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def export_model(net: nn.Module, cfg: DeformableConfig, out_dir: Path, name: str = "model", meta: dict | None = None) -> Path:
    """Write ``<name>.safetensors`` and ``config.json`` atomically (the training engine's exporter)."""
    from diffusionreg.training.export import export_weights

    return export_weights(net, cfg.to_json(), out_dir, name, {"task": "deformable", "method": cfg.method, **(meta or {})})


def load_model(
    name_or_path: str | None, device: torch.device | str = "cpu", method: str | None = None, modality: str | None = None
) -> DeformableModel:
    """A registered deformable model (Models.json, sha256-checked) or a weights file/folder."""
    from diffusionreg import models

    if name_or_path is None:
        entry = None
        for candidate in models.list_models("deformable"):
            if modality is not None and candidate.modality not in (modality, "any"):
                continue
            if method is not None:
                try:
                    if models.load_config_json(candidate).get("method") != method:
                        continue
                except InputError:
                    continue
            entry = candidate
            break
        if entry is None:
            raise InputError(
                f"no deformable model registered for method {method or 'any'} and modality "
                f"{modality or 'any'}; pass --model NAME|PATH"
            )
    else:
        entry = models.resolve(name_or_path, task="deformable", modality=modality)
    cfg = DeformableConfig.from_dict(models.load_config_json(entry))
    if method is not None and cfg.method != method:
        raise InputError(f"model {entry.name} is a {cfg.method} model, not {method}")
    state = models.load_state_dict(entry)
    net = build_network(cfg)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"model {entry.name}: weights do not match its config ({str(exc).splitlines()[0]})") from None
    device = torch.device(device)
    net.to(device).eval()
    return DeformableModel(net, cfg, entry.name, device)


# ----------------------------------------------------------------------------- preprocessing
def normalise(array: np.ndarray, cfg: DeformableConfig) -> np.ndarray:
    """Raw intensities -> the network's input range (float32)."""
    a = np.asarray(array)
    mode = cfg.normalisation
    if mode == "binary":
        return (a > 0).astype(np.float32)
    if mode == "probability":
        return as_probability(a)
    a = a.astype(np.float32)
    if mode == "none":
        return a
    if mode == "clip":
        lo, hi = cfg.clip_range
        return ((np.clip(a, lo, hi) - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    if mode == "minmax":
        lo, hi = float(a.min()), float(a.max())
    else:  # percentile
        lo, hi = (float(v) for v in np.percentile(a[::2, ::2, ::2], (1.0, 99.5)))
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def network_grid(fixed: Image, cfg: DeformableConfig) -> Grid:
    """The network grid: config shape and spacing, the fixed image's (un-obliqued) axes, centred
    on the bounding box of the fixed foreground (normalised value > 0.05; whole image if none)."""
    values = normalise(fixed.array if fixed.array.ndim == 3 else fixed.array[..., 0], cfg)
    fg = np.argwhere(values > 0.05)
    if len(fg):
        centre_index = (fg.min(0) + fg.max(0)) / 2.0
    else:
        centre_index = (np.asarray(fixed.shape, dtype=np.float64) - 1.0) / 2.0
    centre = apply_affine(fixed.affine, centre_index)
    return centred_grid(cfg.grid_shape, cfg.spacing_mm, centre, nearest_axis_direction(fixed.grid.direction))


def to_network(image: Image, grid: Grid, cfg: DeformableConfig, transform=None) -> torch.Tensor:
    """Normalise, then resample (linear) onto ``grid`` through ``transform``: ``(1, 1, *shape)``."""
    scalar = image.array if image.array.ndim == 3 else image.array[..., 0]
    normalised = Image(normalise(scalar, cfg), image.affine)
    on_grid = resample(normalised, grid, transform, "linear", default=0.0)
    return torch.from_numpy(np.ascontiguousarray(on_grid.array, dtype=np.float32))[None, None]


# ----------------------------------------------------------------------------- network + IO
def pair_loss(net: nn.Module, cfg: DeformableConfig, image1: torch.Tensor, image2: torch.Tensor, return_fields: bool = False):
    """Training / instance-optimisation loss of one batch of pairs (image1 -> image2).

    SITReg: ``1/2 [S(I1 o phi_fwd, I2) + S(I2 o phi_inv, I1)] + lambda 1/2 [R(phi_fwd) + R(phi_inv)]``
    (+ NDV); ICON: the sum of the greedy per-step losses. ``return_fields`` (SITReg) also returns
    ``(phi_fwd, phi_inv)``.
    """
    if cfg.method == "icon":
        losses = net.step_losses(image1, image2, cfg.similarity, cfg.regularisation_weight, cfg.ncc_window)
        total = sum(losses)
        return total, {f"step{i + 1}": float(v.detach()) for i, v in enumerate(losses)}
    phi_fwd, phi_inv, dense_fwd, dense_inv = net(image1, image2, return_dense=True)
    sim = 0.5 * (
        similarity_loss(fields.warp(image1, phi_fwd), image2, cfg.similarity, cfg.ncc_window)
        + similarity_loss(fields.warp(image2, phi_inv), image1, cfg.similarity, cfg.ncc_window)
    )
    reg = 0.5 * (gradient_loss(dense_fwd) + gradient_loss(dense_inv))
    total = sim + cfg.regularisation_weight * reg
    stats = {"similarity": float(sim.detach()), "regulariser": float(reg.detach())}
    if cfg.ndv_weight > 0:
        ndv = 0.5 * (ndv_loss(phi_fwd) + ndv_loss(phi_inv))
        total = total + cfg.ndv_weight * ndv
        stats["ndv"] = float(ndv.detach())
    if return_fields:
        return total, stats, phi_fwd, phi_inv
    return total, stats


def triplet_loss(net: nn.Module, cfg: DeformableConfig, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """Group consistency (SITReg): mean of the three pair losses + ``cycle_weight`` x
    :func:`.losses.cycle_consistency_loss` of ``phi_ab o phi_bc o phi_ca`` and the reverse chain.
    (The reference spreads the three pairs over 3 GPUs; here they run in one process.)"""
    from .losses import cycle_consistency_loss

    if cfg.method != "sitreg":
        raise InputError("group consistency is implemented for SITReg")
    l1, s1, u_ab, u_ba = pair_loss(net, cfg, a, b, return_fields=True)
    l2, _, u_bc, u_cb = pair_loss(net, cfg, b, c, return_fields=True)
    l3, _, u_ca, u_ac = pair_loss(net, cfg, c, a, return_fields=True)
    cycle = cycle_consistency_loss(u_ab, u_bc, u_ca, u_ba, u_cb, u_ac)
    return (l1 + l2 + l3) / 3.0 + cfg.cycle_weight * cycle, {**s1, "cycle": float(cycle.detach())}


def predict(
    model: DeformableModel,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    io_steps: int = 0,
    io_lr: float | None = None,
    progress=None,
    seconds: dict[str, float] | None = None,
    io_frozen_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``(u, w, io_losses)``: ``warp(moving, u) ~ fixed``, ``w = u^-1``; optional instance optimisation
    (``io_steps`` Adam steps on this pair from the trained weights; the model is not changed).
    ``io_frozen_steps`` (ICON): the first step networks keep their weights, their midpoint pair is
    computed once and the losses are those of the later steps only.
    ``seconds``, when given, gains the wall seconds of ``instance_optimization`` and ``network``."""
    net = model.net
    wait_for(model.device)
    start = time.perf_counter()
    moving = moving.to(model.device)
    fixed = fixed.to(model.device)
    losses: list[float] = []
    if io_steps > 0:
        cfg = model.cfg
        net = copy.deepcopy(model.net)
        net.train()
        if io_frozen_steps > 0:
            for frozen in net.nets[:io_frozen_steps]:
                frozen.requires_grad_(False)
            # the frozen steps' output does not change between IO steps: computed once
            midpoints = net.advance(moving, fixed, io_frozen_steps)

            def loss_fn() -> torch.Tensor:
                return sum(
                    net.step_losses(*midpoints, cfg.similarity, cfg.regularisation_weight, cfg.ncc_window, io_frozen_steps)
                )

        else:

            def loss_fn() -> torch.Tensor:
                return pair_loss(net, cfg, moving, fixed)[0]

        trained = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trained, lr=io_lr if io_lr is not None else cfg.inference.io_lr)
        losses = adam_steps(opt, loss_fn, io_steps, progress, "instance optimisation")
    wait_for(model.device)
    optimised = time.perf_counter()
    net.eval()
    with torch.no_grad():
        u, w = net(moving, fixed)
    wait_for(model.device)
    if seconds is not None:
        seconds["instance_optimization"] = optimised - start
        seconds["network"] = time.perf_counter() - optimised
    return u, w, losses


def wait_for(device: torch.device | str) -> None:
    """Block until ``device``'s queued kernels are done (CUDA runs asynchronously, so a stage's
    wall time is only its own after this); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_field(u: torch.Tensor, index) -> np.ndarray:
    """Trilinear values ``(N, 3)`` of the voxel field ``u`` ``(1, 3, ...)`` at float indices ``(N, 3)``
    (numpy or torch; border-extended outside the grid)."""
    positions = torch.as_tensor(index, dtype=torch.float64).T[None]  # (1, 3, N) voxel indices
    return spaces.sample(u.cpu(), positions)[0].T.double().numpy()


def _map_points(transform, points: np.ndarray) -> np.ndarray:
    return points if transform is None else transform.map_points(points)


def _affine_slab(matrix: np.ndarray, start: int, stop: int, shape) -> torch.Tensor:
    """``matrix @ (i, j, k, 1)`` for ``i`` in ``[start, stop)`` and all ``j, k``: ``(rows, n1, n2, 3)`` float64."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    i = torch.arange(start, stop, dtype=torch.float64).view(-1, 1, 1, 1)
    j = torch.arange(shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    k = torch.arange(shape[2], dtype=torch.float64).view(1, 1, -1, 1)
    return i * m[:3, 0] + j * m[:3, 1] + k * m[:3, 2] + m[:3, 3]


def world_field(
    u: torch.Tensor, net_grid: Grid, target: Grid, outer=None, slab_points: int = 4_000_000, reference: np.ndarray | None = None
) -> np.ndarray:
    """``outer(G (x + u(x))) - r`` at every voxel of ``target`` (``x = G^-1 p``, ``p`` the voxel
    centre, LPS): ``(*shape, 3)`` LPS mm, the displacement that carries ``r`` to the point the
    maps send ``p`` to (for the forward field: fixed -> moving, ITK's resampling direction). ``r``
    is ``p`` itself, or ``reference @ (i, j, k, 1)`` when a 4x4 ``reference`` is given. ``u``
    (network-grid voxels) is read trilinearly, border-extended outside ``G``;
    ``outer`` is the initial transform or None.

    When ``outer`` is affine (``A``; None = identity) the field is ``(A T - R) p + A_lin G_lin
    u(x)`` (``T``, ``R``: the target's and the reference's index-to-world matrices): the
    cancellation of ``G x`` against ``r`` is done on the matrices in float64, so ``u`` is
    resampled in its own dtype over slabs of ``target``, exact up to that dtype's rounding of
    the displacement itself. Any other ``outer`` maps the points (:func:`world_field_points`).
    """
    matrix = _affine_part(outer)
    if matrix is None:
        return world_field_points(u, net_grid, target, outer, slab_points, reference)
    shape = target.shape
    out = np.empty(shape + (3,), dtype=np.float32)
    ref = target.affine if reference is None else reference
    offset = matrix @ target.affine - ref  # index -> mm, what the affine parts leave
    offset = None if not offset.any() else torch.as_tensor(offset[:3], dtype=torch.float64)
    linear = torch.as_tensor(matrix[:3, :3] @ net_grid.affine[:3, :3], dtype=u.dtype)
    to_net = np.linalg.inv(net_grid.affine) @ target.affine  # target index -> network index
    field = u.detach().cpu()
    input_space = spaces.voxel_space(tuple(field.shape[2:]))
    rows = max(1, slab_points // (shape[1] * shape[2]))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        shift = np.eye(4)
        shift[0, 3] = start  # slab index -> target index
        slab = (stop - start, shape[1], shape[2])
        sampled = spaces.sample_affine(
            field, torch.as_tensor(to_net @ shift)[None], spaces.voxel_space(slab), input_space, padding_mode="border"
        )[0]
        values = torch.einsum("ab,b...->...a", linear, sampled)
        if offset is not None:
            values = values + _affine_slab(offset, start, stop, shape).to(values.dtype)
        out[start:stop] = values.numpy()
    return out


def world_field_points(
    u: torch.Tensor, net_grid: Grid, target: Grid, outer=None, slab_points: int = 4_000_000, reference: np.ndarray | None = None
) -> np.ndarray:
    """:func:`world_field` for any ``outer`` with ``map_points``: every voxel's point carried
    through ``G (x + u(x))`` and ``outer`` in float64, slab by slab."""
    shape = target.shape
    out = np.empty(shape + (3,), dtype=np.float32)
    to_net = np.linalg.inv(net_grid.affine) @ target.affine  # target index -> network index
    ref = target.affine if reference is None else reference
    g = torch.as_tensor(net_grid.affine, dtype=torch.float64)
    rows = max(1, slab_points // (shape[1] * shape[2]))
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        x = _affine_slab(to_net, start, stop, shape).reshape(-1, 3)
        y = x + torch.from_numpy(_sample_field(u, x))
        q = y @ g[:3, :3].T + g[:3, 3]
        if outer is not None:
            q = torch.from_numpy(outer.map_points(q.numpy()))
        r = _affine_slab(ref, start, stop, shape).reshape(-1, 3)
        out[start:stop] = (q - r).reshape(stop - start, shape[1], shape[2], 3).numpy()
    return out


def _affine_part(transform):
    """The 4x4 matrix of an all-affine transform, else None."""
    if transform is None:
        return np.eye(4)
    t = compose([transform])
    return t.matrix if isinstance(t, AffineTransform) else None


@dataclass
class DeformableResult:
    forward: DisplacementFieldTransform  # on the fixed grid, fixed -> moving (mm)
    inverse: DisplacementFieldTransform | None  # on the moving grid, moving -> fixed (mm)
    jacobian: Image | None  # det of D's map on the fixed grid
    metrics: dict
    u: torch.Tensor  # network-grid fields (voxels)
    w: torch.Tensor
    grid: Grid

    def to_dict(self) -> dict:
        return dict(self.metrics)


def field_metrics(u: torch.Tensor, w: torch.Tensor, spacing) -> dict:
    """Folding (% det J <= 0), NDV (%), inverse-consistency error (mm) on the fields' grid
    (``spacing``: mm, one value or one per axis). In float32: the fields are voxel displacements
    of a few hundred voxels at most, so rounding stays ~1e-5 voxel, far below what is reported."""
    from diffusionreg import metrics

    u = u.detach().cpu().float()
    w = w.detach().cpu().float()
    det = fields.jacobian_determinant(u)[0]
    det_inv = fields.jacobian_determinant(w)[0]
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    ice = metrics.inverse_consistency_summary(u, w, spacing)
    ice_rev = metrics.inverse_consistency_summary(w, u, spacing)
    return {
        "folding_percent": 100.0 * metrics.folding_fraction(det),
        "folding_percent_inverse": 100.0 * metrics.folding_fraction(det_inv),
        "ndv_percent": metrics.ndv_percent(u),
        "ndv_percent_inverse": metrics.ndv_percent(w),
        "min_jacobian": float(det.min()),
        "ice_mean_mm": max(ice.mean_mm, ice_rev.mean_mm),
        "ice_p95_mm": max(ice.p95_mm, ice_rev.p95_mm),
        "ice_max_mm": max(ice.max_mm, ice_rev.max_mm),
    }


def register_deformable(
    fixed: Image,
    moving: Image,
    model: DeformableModel,
    initial=None,
    io_steps: int | None = None,
    want_inverse: bool = True,
    want_jacobian: bool = False,
    progress=None,
    refine_iterations: int | None = None,
    quality: str | None = None,
) -> DeformableResult:
    """Register ``moving`` onto ``fixed`` (see the module docstring for the geometry).

    ``quality``: a preset of the model's config (``fast``, ``default``, ``best``; None: ``default``,
    i.e. ``model.cfg.inference`` from its config.json, exactly as ``diffusionreg deformable`` does).
    ``io_steps`` / ``refine_iterations``: instance-optimisation steps and velocity-refinement
    iterations, replacing the preset's (None: the preset's; 0: off; the preset's share of
    coarse-grid refinement iterations is kept). ``want_inverse``: also the
    inverse field on the moving grid (solved against the forward field; it costs seconds, so
    only when it is used).
    """
    cfg = model.cfg
    seconds: dict[str, float] = {}  # stage -> wall seconds, reported as seconds_<stage>
    t0 = last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        wait_for(model.device)
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - last
        last = now

    check_registrable(fixed, "fixed image")
    check_registrable(moving, "moving image")
    settings = cfg.inference.at_quality(quality)
    steps = settings.io_steps if io_steps is None else int(io_steps)
    if steps < 0:
        raise ParameterError("io_steps", "must be >= 0")
    refine_cfg = settings.refine
    if refine_iterations is not None:
        if refine_iterations < 0:
            raise ParameterError("refine_iterations", "must be >= 0")
        # the preset's share of coarse-grid iterations is kept
        share = refine_cfg.coarse_iterations / refine_cfg.iterations if refine_cfg.iterations else 0.0
        coarse = int(round(share * int(refine_iterations)))
        refine_cfg = replace(refine_cfg, iterations=int(refine_iterations), coarse_iterations=coarse)
    initial_matrix = _affine_part(initial)
    if want_inverse and initial_matrix is None:
        raise InputError("the inverse field needs an affine (or no) initial transform")
    grid = network_grid(fixed, cfg)
    fixed_t = to_network(fixed, grid, cfg)
    moving_t = to_network(moving, grid, cfg, initial)
    lap("preprocess")
    u, w, io_losses = predict(
        model,
        moving_t,
        fixed_t,
        steps,
        settings.io_lr,
        progress=progress,
        seconds=seconds,
        io_frozen_steps=settings.io_frozen_steps,
    )
    last = time.perf_counter()
    refine_losses: list[float] = []
    refine_stats: dict[str, float] = {}
    if refine_cfg.iterations > 0:
        grid = resized_grid(grid, refine_cfg.fine_shape(cfg.grid_shape))
        fixed_fine = to_network(fixed, grid, cfg).to(model.device)
        moving_fine = to_network(moving, grid, cfg, initial).to(model.device)
        lap("refine_preprocess")
        u, w, refine_losses = refine_pair(
            u, w, moving_fine, fixed_fine, refine_cfg, cfg.similarity, cfg.ncc_window, progress=progress, stats=refine_stats
        )
    u, w = u.detach().cpu(), w.detach().cpu()
    lap("refine")
    forward = DisplacementFieldTransform(Image(world_field(u, grid, fixed.grid, initial), fixed.affine.copy()))
    lap("forward_field")
    inverse = inverse_residual = None
    if want_inverse:
        # Dinv(q) = G (y + w(y)) - q with y = G^-1 T0^-1 q: w seen on the moving grid pulled back
        # through T0^-1 (an affine, so it folds into the grid matrix), relative to q itself.
        mgrid = moving.grid
        pulled = Grid(mgrid.shape, np.linalg.inv(initial_matrix) @ mgrid.affine)
        field_inv = world_field(w, grid, pulled, reference=mgrid.affine)
        lap("inverse_field")
        if refine_cfg.inverse_iterations > 0:  # exact against D as written, not just on the network grid
            field_inv, inverse_residual = solve_inverse(
                forward.field, field_inv, mgrid, refine_cfg.inverse_iterations, refine_cfg.inverse_tolerance_mm
            )
            lap("inverse_solve")
        inverse = DisplacementFieldTransform(Image(field_inv, moving.affine.copy()))
    jac_image = None
    if want_jacobian:
        det = fields.jacobian_determinant(u.double())[0].float()[None, None]
        det_world = world_field_scalar(det, grid, fixed.grid)
        if initial_matrix is not None:
            det_world = det_world * float(np.linalg.det(initial_matrix[:3, :3]))
        else:
            det_world = _finite_difference_det(forward.field)
        jac_image = Image(det_world.astype(np.float32), fixed.affine.copy())
        lap("jacobian")
    metrics = field_metrics(u, w, grid.spacing)
    lap("metrics")
    if inverse_residual is not None:  # |D(q + Dinv(q)) + Dinv(q)| at the moving voxels, as written
        metrics.update(
            {
                "inverse_residual_mean_mm": inverse_residual.mean_mm,
                "inverse_residual_p95_mm": inverse_residual.p95_mm,
                "inverse_residual_max_mm": inverse_residual.max_mm,
            }
        )
    metrics.update(
        {
            "method": cfg.method,
            "model": model.name,
            "quality": quality or "default",
            "instance_optimization_steps": steps,
            "instance_optimization_frozen_steps": settings.io_frozen_steps if steps else 0,
            "io_loss_first": io_losses[0] if io_losses else None,
            "io_loss_last": io_losses[-1] if io_losses else None,
            "refine_iterations": refine_cfg.iterations,
            "refine_coarse_iterations": refine_cfg.coarse_iterations,
            "refine_loss_first": refine_losses[0] if refine_losses else None,
            "refine_loss_last": refine_losses[-1] if refine_losses else None,
            **{f"refine_{key}": value for key, value in refine_stats.items()},
            "network_grid_shape": list(cfg.grid_shape),
            "network_spacing_mm": cfg.spacing_mm,
            "field_grid_shape": list(grid.shape),
            "field_spacing_mm": [round(float(s), 4) for s in grid.spacing],
            **{f"seconds_{stage}": round(value, 3) for stage, value in seconds.items()},
            "seconds_total": round(time.perf_counter() - t0, 3),
        }
    )
    return DeformableResult(forward, inverse, jac_image, metrics, u, w, grid)


def world_field_scalar(values: torch.Tensor, net_grid: Grid, target: Grid, slab_points: int = 4_000_000) -> np.ndarray:
    """A scalar network-grid map ``(1, 1, ...)`` sampled (trilinear, border) at ``target``'s voxels."""
    shape = target.shape
    to_net = np.linalg.inv(net_grid.affine) @ target.affine
    rep = values.expand(1, 3, *values.shape[2:]).contiguous()
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, slab_points // (shape[1] * shape[2]))
    for start_row in range(0, shape[0], rows):
        stop = min(start_row + rows, shape[0])
        x = _affine_slab(to_net, start_row, stop, shape).reshape(-1, 3)
        out[start_row:stop] = _sample_field(rep, x)[:, 0].reshape(stop - start_row, shape[1], shape[2])
    return out


def _finite_difference_det(field_image: Image) -> np.ndarray:
    """det(I + dD/dp) of an LPS-mm displacement image by central differences in world units."""
    d = field_image.array.astype(np.float64)
    lin_inv = np.linalg.inv(field_image.affine[:3, :3])
    grads = [np.stack(np.gradient(d[..., c]), -1) for c in range(3)]  # d D_c / d index
    jac = np.stack(grads, -2) @ lin_inv  # (..., 3 comp, 3 world)
    jac = jac + np.eye(3)
    return np.linalg.det(jac)
