"""Symmetric velocity refinement: a fine-grid polish of a network's inverse-consistent pair.

The networks predict on a coarse grid and (ICON) smooth their velocities to a quarter of it, so
fine structure such as small lung vessels is beyond them. Instance optimisation of the weights
(:func:`.register.predict`) keeps that limit. This stage optimises a stationary velocity ``v``
directly, on a grid ``upsample`` times finer than the network grid, around the network result
``(Phi, Phi^-1)``:

    Phi' = e o Phi o e,      Phi'^-1 = e^-1 o Phi^-1 o e^-1,      e = exp(v / 2), e^-1 = exp(-v / 2)

(``o`` is :func:`diffusionreg.fields.compose`, right applied first). ``Phi'^-1`` is the inverse
of ``Phi'`` whenever ``Phi^-1`` is that of ``Phi`` (both networks guarantee it) up to the
interpolation of the composed fields, each factor is a diffeomorphism, and swapping the inputs swaps the optimum (``v -> -v``), so the
guarantees of the networks survive. ``v`` lives on a control grid ``control_factor`` times
coarser than the fine grid (plus ``coarse_levels`` grids, each twice as coarse, summed into it so
that large residual motion is reached in few steps); ``exp(+-v/2)`` is computed by scaling and squaring on a grid
``squaring_upsample`` times finer than that; the loss is the model's similarity in both
directions plus ``smoothness_weight`` times the squared gradient of ``v`` (on that squaring grid).
The loss is evaluated at the loss grid's voxels as points: each voxel ``x`` is carried through
``e``, ``Phi`` and ``e`` in turn, every field read trilinearly on its own grid
(:func:`refined_positions`), and the image is read where it lands. For pointwise similarities
(L1, MSE) of zero-background maps (vessel maps) only the voxels where the loss can be non-zero
are carried (:mod:`.loss_support`): same value and gradient, a fraction of the work.
The first ``coarse_iterations`` evaluate that loss on coarser grids over the same box (images
resized to them and blurred, coarsest first); the velocity parameters do not depend on the grid
the loss is evaluated on, so each stage continues from the last: large residual motion is found
cheaply on blurred maps (a wide capture range), the fine grid only polishes. With
``sample_fraction`` < 1 each iteration of the sparse loss draws that share of the supported
voxels at random (a stochastic gradient).
Fields are voxel displacements of the grid they live on (:mod:`diffusionreg.fields`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.layers import GaussianFilter

from diffusionreg import fields, spaces

from .loss_support import SPARSE_SIMILARITIES, dilated_supports, loss_support, pointwise_similarity
from .losses import gradient_loss, similarity_loss
from .pair_optimisation import adam_steps


@dataclass
class FieldRefineConfig:
    """Fine-grid refinement settings (``iterations`` 0 = off) and the output inverse's solve."""

    iterations: int = 0
    upsample: float = 1.0  # fine grid shape = network grid shape x upsample
    control_factor: int = 2  # velocity parameters on a grid this much coarser than the fine one
    coarse_levels: int = 0  # extra parameter grids, each 2x coarser, summed into v (large motion)
    learning_rate: float = 0.05  # Adam, fine-grid voxels per step
    smoothness_weight: float = 0.1  # x mean squared forward difference of v (dimensionless)
    squarings: int = 5  # scaling-and-squaring steps of exp(+-v/2)
    squaring_upsample: int = 2  # exp(+-v/2) is squared on the control grid x this (<= fine)
    # Multi-resolution: the first ``coarse_iterations`` of ``iterations`` evaluate the loss on
    # coarser grids over the same box (same velocity parameters, a fraction of the work):
    # ``coarse_stages`` grids, coarsest first, the finest ``coarse_scale`` times the fine shape and
    # each further one half of the next; the coarse iterations are shared evenly (the remainder
    # to the finest). The images of the finest coarse stage are blurred by a Gaussian of
    # ``coarse_sigma`` of its voxels, each coarser stage's by twice as many of its own: zero-background
    # maps (vessels) only pull where they overlap, so the blur is what widens the capture range.
    coarse_iterations: int = 0
    coarse_scale: float = 0.5
    coarse_stages: int = 1
    coarse_sigma: float = 0.0
    # The written inverse solved against the written forward field (.inverse_field; 0 = off).
    # Not part of the velocity refinement: it runs whether or not ``iterations`` is 0.
    # Pointwise similarities (l1, mse) of zero-background maps are evaluated only where they can be
    # non-zero (.loss_support): the maps' supports dilated by ``support_margin`` voxels of the loss
    # grid, re-selected from the current pair every ``support_every`` iterations (-1: dense).
    support_margin: int = 2
    support_every: int = 10
    # ... and of those voxels, each iteration draws ``sample_fraction`` at random (1 = all; a
    # stochastic gradient, as elastix's random samplers; the generator is seeded with
    # ``sample_seed``, so a registration repeats exactly).
    sample_fraction: float = 1.0
    sample_seed: int = 0
    inverse_iterations: int = 10  # Newton steps per moving voxel at most
    inverse_tolerance_mm: float = 1e-3

    def fine_shape(self, shape) -> tuple[int, int, int]:
        return tuple(max(4, int(round(s * self.upsample))) for s in shape)

    def loss_stages(self, fine: tuple[int, ...]) -> list[tuple[int, tuple[int, ...], float]]:
        """``(iterations, loss grid shape, blur sigma in its voxels)`` per stage, coarsest first;
        the last is the fine grid (unblurred) with the iterations left."""
        coarse_total = min(self.coarse_iterations, self.iterations)
        stages = []
        if coarse_total > 0:
            count = self.coarse_stages
            for level in reversed(range(count)):  # level 0 = the finest coarse stage
                scale = self.coarse_scale / 2**level
                steps = coarse_total // count + (coarse_total % count if level == 0 else 0)
                shape = tuple(max(4, int(round(s * scale))) for s in fine)
                stages.append((steps, shape, self.coarse_sigma * 2**level))
        stages.append((self.iterations - coarse_total, tuple(fine), 0.0))
        return [stage for stage in stages if stage[0] > 0]


def _at(values: torch.Tensor, points: torch.Tensor, shape: tuple[int, ...], displacement: bool) -> torch.Tensor:
    """``values`` ``(B, C, *grid)`` over the refinement box, trilinear and border-extended, at
    ``points`` ``(B, 3, K)``: voxel indices of a grid of ``shape`` over the same box (the grids
    share their outer voxel faces, as :func:`diffusionreg.fields.resize_field`). A
    ``displacement`` field's values come back in voxels of ``shape``."""
    grid = tuple(values.shape[2:])
    if grid == tuple(shape):
        return spaces.sample(values, points)
    scale = torch.tensor([g / s for g, s in zip(grid, shape)], dtype=points.dtype, device=points.device).view(1, 3, 1)
    sampled = spaces.sample(values, (points + 0.5) * scale - 0.5)
    return sampled / scale if displacement else sampled


def refined_positions(
    points: torch.Tensor | None, half: torch.Tensor, pair: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """``(e o Phi o e)(x)`` (batch 0) and ``(e^-1 o Phi^-1 o e^-1)(x)`` (batch 1) at ``points``
    ``(2, 3, K)`` (voxels of ``shape``; None = every voxel of that grid, ``K`` = its size);
    ``half`` = ``(e, e^-1)``, ``pair`` = ``(Phi, Phi^-1)`` as displacements on their own grids
    over the box, each read where the previous map lands."""
    if points is None:  # at the grid's own voxels the first read is a resize (a fraction of the work)
        points = fields.identity_grid(shape, device=half.device, dtype=half.dtype).flatten(2)
        y = points + fields.resize_field(half, shape).flatten(2)
    else:
        y = points + _at(half, points, shape, True)
    y = y + _at(pair, y, shape, True)
    return y + _at(half, y, shape, True)


def refine_pair(
    u: torch.Tensor,
    w: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    cfg: FieldRefineConfig,
    similarity: str,
    window: int = 7,
    progress=None,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``(u', w', losses)`` on the grid of ``moving``/``fixed`` ``(1, 1, *fine)``.

    ``u``, ``w``: the network pair (``warp(moving, u) ~ fixed``, ``w = u^-1``) on any grid
    covering the same box. ``stats``, when given, gains ``support_fraction`` (mean share of the
    loss grid's voxels the sparse loss was evaluated on; 1 = dense) and ``support_leak`` (the
    largest share of the dense similarity found outside the support in use, checked at each
    support update; 0 = the sparse loss was the dense one).
    """
    fine = tuple(fixed.shape[2:])
    grids = [tuple(max(2, -(-s // (cfg.control_factor * 2**level))) for s in fine) for level in range(cfg.coarse_levels + 1)]
    control = grids[0]
    squaring = tuple(min(f, c * cfg.squaring_upsample) for f, c in zip(fine, control))
    params = [torch.zeros((1, 3) + g, dtype=fixed.dtype, device=fixed.device, requires_grad=True) for g in grids]
    # Adam moves each parameter by about lr per step. Parameters are in voxels of their own grid
    # and are summed on the finest control grid (resize_field rescales the units).
    opt = torch.optim.Adam([{"params": [p], "lr": cfg.learning_rate * g[0] / fine[0]} for p, g in zip(params, grids)])
    pair = torch.cat([u.to(fixed), w.to(fixed)], 0).detach()  # read on its own grid
    sparse = similarity in SPARSE_SIMILARITIES and cfg.support_margin >= 0
    fractions: list[float] = []
    draws = torch.Generator().manual_seed(cfg.sample_seed)
    leaks: list[float] = [0.0]

    def velocity_field() -> torch.Tensor:
        v = params[0]
        for p in params[1:]:
            v = v + fields.resize_field(p, control)
        return v

    def halves(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, (e, e^-1))`` with ``v`` on the squaring grid (never finer than the loss's own)."""
        # v is trilinear between control points, so its flow is about as smooth: square on a
        # grid a little finer than the control grid and read it where needed. The finer squaring
        # grid keeps e o e^-1 close to identity.
        v = fields.resize_field(velocity_field(), tuple(min(q, s) for q, s in zip(squaring, shape)))
        return v, fields.exp_velocity(torch.cat([0.5 * v, -0.5 * v], 0), cfg.squarings)

    def loss_on(shape: tuple[int, ...], sigma: float = 0.0):
        """The refinement loss with the images on a grid of ``shape`` over the box."""
        images = torch.cat([moving, fixed], 0)
        if shape != fine:  # images resampled over the same box (align_corners=False, as resized_grid)
            images = torch.nn.functional.interpolate(images, size=shape, mode="trilinear", align_corners=False)
        if sigma > 0:  # truncated at 3 sigma, so zero background stays zero beyond it (sparse loss)
            images = GaussianFilter(3, sigma, truncated=3.0)(images)
        targets = images.flip(0).flatten(2)  # (2, 1, N): fixed, moving
        voxels = math.prod(shape)
        # the sparse loss reads chosen voxels as points; the dense one reads every voxel (refined_positions(None, ...))
        points = (
            fields.identity_grid(shape, device=fixed.device, dtype=fixed.dtype).flatten(2).expand(2, 3, -1) if sparse else None
        )
        state = {"calls": 0, "active": None}
        dilated = dilated_supports(images, cfg.support_margin) if sparse else None

        def update_support(half: torch.Tensor) -> None:
            """Re-select the voxels from the current pair (dense, no gradient) and measure what the
            previous selection missed."""
            with torch.no_grad():
                positions = refined_positions(None, half, pair, shape)
                active = loss_support(images, dilated, positions)
                if state["active"] is not None:
                    per_voxel = pointwise_similarity(spaces.sample(images, positions), targets, similarity).flatten(1).sum(0)
                    total = float(per_voxel.sum())
                    leaks.append(float(per_voxel[~state["active"]].sum()) / total if total > 0 else 0.0)
                state["active"] = active
                state["index"] = active.nonzero()[:, 0]

        def loss_fn() -> torch.Tensor:
            v, half = halves(shape)
            # dimensionless: about the same on any grid over the box, so on the squaring grid
            regulariser = cfg.smoothness_weight * gradient_loss(v)
            if not sparse:
                warped = spaces.sample(images, refined_positions(None, half, pair, shape)).view(2, 1, *shape)
                flat = targets.view(2, 1, *shape)
                return (
                    similarity_loss(warped[:1], flat[:1], similarity, window)
                    + similarity_loss(warped[1:], flat[1:], similarity, window)
                    + regulariser
                )
            if state["calls"] % cfg.support_every == 0:
                update_support(half.detach())
            state["calls"] += 1
            index = state["index"]
            if cfg.sample_fraction < 1.0:
                keep = max(1, int(round(index.numel() * cfg.sample_fraction)))
                index = index[torch.randperm(index.numel(), generator=draws)[:keep].sort().values]
            fractions.append(index.numel() / voxels)
            warped = spaces.sample(images, refined_positions(points[..., index], half, pair, shape))
            scale = voxels * index.numel() / state["index"].numel()
            return pointwise_similarity(warped, targets[..., index], similarity).sum() / scale + regulariser

        return loss_fn

    losses: list[float] = []
    for steps, shape, sigma in cfg.loss_stages(fine):
        label = "velocity refinement" if shape == fine else f"velocity refinement (coarse grid {'x'.join(map(str, shape))})"
        losses += adam_steps(opt, loss_on(shape, sigma), steps, progress, label)
    with torch.no_grad():
        points = fields.identity_grid(fine, device=fixed.device, dtype=fixed.dtype).flatten(2)
        both = (refined_positions(None, halves(fine)[1], pair, fine) - points).view(2, 3, *fine)
    if stats is not None:
        stats["support_fraction"] = sum(fractions) / len(fractions) if fractions else 1.0
        stats["support_leak"] = max(leaks)
    return both[:1], both[1:], losses
