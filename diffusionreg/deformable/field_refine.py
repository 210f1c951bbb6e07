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
``squaring_upsample`` times finer than that and upsampled trilinearly; the loss is the model's similarity in
both directions plus ``smoothness_weight`` times the squared gradient of ``v``.
The first ``coarse_iterations`` evaluate that loss on a coarser grid over the same box (images
and network pair resized to it); the velocity parameters do not depend on the grid the loss is
evaluated on, so the fine iterations continue from there: large residual motion is found
cheaply, the fine grid only polishes.
Fields are voxel displacements of the grid they live on (:mod:`diffusionreg.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusionreg import fields

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
    # Multi-resolution: the first ``coarse_iterations`` of ``iterations`` evaluate the loss on a
    # grid ``coarse_scale`` times the fine shape (same velocity parameters, a fraction of the work).
    coarse_iterations: int = 0
    coarse_scale: float = 0.5
    # The written inverse solved against the written forward field (.inverse_field; 0 = off).
    # Not part of the velocity refinement: it runs whether or not ``iterations`` is 0.
    inverse_iterations: int = 10  # Newton steps per moving voxel at most
    inverse_tolerance_mm: float = 1e-3

    def fine_shape(self, shape) -> tuple[int, int, int]:
        return tuple(max(4, int(round(s * self.upsample))) for s in shape)


def refine_pair(
    u: torch.Tensor,
    w: torch.Tensor,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    cfg: FieldRefineConfig,
    similarity: str,
    window: int = 7,
    progress=None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``(u', w', losses)`` on the grid of ``moving``/``fixed`` ``(1, 1, *fine)``.

    ``u``, ``w``: the network pair (``warp(moving, u) ~ fixed``, ``w = u^-1``) on any grid
    covering the same box (resized to the fine grid here).
    """
    fine = tuple(fixed.shape[2:])
    grids = [tuple(max(2, -(-s // (cfg.control_factor * 2**level))) for s in fine) for level in range(cfg.coarse_levels + 1)]
    control = grids[0]
    squaring = tuple(min(f, c * cfg.squaring_upsample) for f, c in zip(fine, control))
    params = [torch.zeros((1, 3) + g, dtype=fixed.dtype, device=fixed.device, requires_grad=True) for g in grids]
    # Adam moves each parameter by about lr per step. Parameters are in voxels of their own grid
    # and are summed on the finest control grid (resize_field rescales the units).
    opt = torch.optim.Adam([{"params": [p], "lr": cfg.learning_rate * g[0] / fine[0]} for p, g in zip(params, grids)])

    def velocity_field() -> torch.Tensor:
        v = params[0]
        for p in params[1:]:
            v = v + fields.resize_field(p, control)
        return v

    def loss_on(shape: tuple[int, ...]):
        """The refinement loss with the images and the network pair on a grid of ``shape``, and
        the refined pair on that grid."""
        pair = torch.cat([fields.resize_field(u.to(fixed), shape), fields.resize_field(w.to(fixed), shape)], 0).detach()
        images = torch.cat([moving, fixed], 0)
        if shape != fine:  # images resampled over the same box (align_corners=False, as resized_grid)
            images = torch.nn.functional.interpolate(images, size=shape, mode="trilinear", align_corners=False)
        targets = images.flip(0)

        # Never squared on a grid finer than the loss's own (on coarse grids that is most of the work).
        squaring_here = tuple(min(q, s) for q, s in zip(squaring, shape))

        def refined(velocity: torch.Tensor) -> torch.Tensor:
            # v is trilinear between control points, so its flow is about as smooth: square on a
            # grid a little finer than the control grid and resize (the fine-grid work is then two
            # compositions and a warp). The finer squaring grid keeps e o e^-1 close to identity.
            v = fields.resize_field(velocity, squaring_here)
            half = fields.exp_velocity(torch.cat([0.5 * v, -0.5 * v], 0), cfg.squarings)
            half = fields.resize_field(half, shape)
            return fields.compose(half, fields.compose(pair, half))

        def loss_fn() -> torch.Tensor:
            velocity = velocity_field()
            warped = fields.warp(images, refined(velocity))
            return (
                similarity_loss(warped[:1], targets[:1], similarity, window)
                + similarity_loss(warped[1:], targets[1:], similarity, window)
                # dimensionless: about the same on any grid over the box, so evaluated on this one
                + cfg.smoothness_weight * gradient_loss(fields.resize_field(velocity, shape))
            )

        return loss_fn, refined

    losses: list[float] = []
    coarse_steps = min(cfg.coarse_iterations, cfg.iterations)
    if coarse_steps > 0:
        coarse = tuple(max(4, int(round(s * cfg.coarse_scale))) for s in fine)
        losses += adam_steps(opt, loss_on(coarse)[0], coarse_steps, progress, "velocity refinement (coarse grid)")
    loss_fn, refined = loss_on(fine)
    losses += adam_steps(opt, loss_fn, cfg.iterations - coarse_steps, progress, "velocity refinement")
    with torch.no_grad():
        both = refined(velocity_field())
    return both[:1], both[1:], losses
