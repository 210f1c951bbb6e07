"""The reverse process: T fractional steps toward the predicted correction.

All in torch-normalised coordinates of the network grids (see sampling.py). For
t = T..1: M_t = net([ref, current], t); A_t = [(1 - a) I + a M_lin | a M_tr] with
a = alpha_t (linear part and translation separately); C <- C A_t; current = warp(original
moving, C). Deterministic. With fewer steps than T, each jump covers several timesteps and
uses a = 1 - prod(1 - alpha_s) over them (equal to the reference when steps == T).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .sampling import to_homogeneous, warp
from .schedule import Schedule


def step_plan(sched: Schedule, steps: int | None) -> list[tuple[int, float, float]]:
    """[(t, alpha_lin, alpha_tr)] from t = T down to 1, ``steps`` entries."""
    big_t = sched.timesteps
    steps = big_t if steps is None else max(1, min(int(steps), big_t))
    bounds = np.linspace(big_t, 0, steps + 1).round().astype(int)
    plan = []
    for hi, lo in zip(bounds[:-1], bounds[1:]):
        ts = range(hi, lo, -1)
        keep_lin = np.prod([1 - sched.alpha_lin(s) for s in ts])
        keep_tr = np.prod([1 - sched.alpha_tr(s) for s in ts])
        plan.append((int(hi), float(1 - keep_lin), float(1 - keep_tr)))
    return plan


@torch.no_grad()
def reverse_process(
    net: torch.nn.Module,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    sched: Schedule,
    steps: int | None = None,
    cls: torch.Tensor | None = None,
    preprocess="none",
    init: torch.Tensor | None = None,
    callback: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fixed, moving: (B,1,S,S,S) in [-1,1]. Returns (C (B,4,4) float64, warped moving).

    ``init`` (B,4,4) is an optional starting C (identity by default)."""
    b = fixed.shape[0]
    comp = torch.eye(4, dtype=torch.float64).repeat(b, 1, 1) if init is None else init.to(torch.float64).clone()
    current = moving if init is None else warp(moving, comp.to(moving.device))
    eye = torch.eye(3, dtype=torch.float64)
    for n, (t, a_lin, a_tr) in enumerate(step_plan(sched, steps)):
        tt = torch.full((b,), t, dtype=torch.long, device=fixed.device)
        pred = net(torch.cat([fixed, current], dim=1), tt, cls, preprocess).to(torch.float64).cpu()
        step = torch.zeros((b, 4, 4), dtype=torch.float64)
        step[:, :3, :3] = (1 - a_lin) * eye + a_lin * pred[:, :, :3]
        step[:, :3, 3] = a_tr * pred[:, :, 3]
        step[:, 3, 3] = 1
        comp = comp @ step
        current = warp(moving, comp.to(moving.device))
        if callback is not None:
            callback(n)
    return comp, current


def safe_inverse(mat: torch.Tensor) -> torch.Tensor:
    """Inverse of (B,4,4); identity where the determinant vanishes (reference fallback)."""
    mat = to_homogeneous(mat)
    det = torch.linalg.det(mat)
    out = torch.eye(4, dtype=mat.dtype).repeat(mat.shape[0], 1, 1)
    ok = det.abs() > 1e-8
    if ok.any():
        out[ok] = torch.linalg.inv(mat[ok])
    return out


@torch.no_grad()
def bidirectional(
    net, fixed, moving, sched, steps=None, cls=None, preprocess="none", init=None, callback=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual refinement from the other direction.

    1. moving -> fixed gives C1 and moving' = moving(C1 p);
    2. the reversed pair (fixed as moving, moving' as reference) gives C2;
    3. C = C1 C2^-1; re-warp the original moving with C.
    Returns (C, warped, C1)."""
    prep = preprocess if isinstance(preprocess, str) else tuple(preprocess)
    rev_prep = prep if isinstance(prep, str) else (prep[1], prep[0])
    c1, moved = reverse_process(net, fixed, moving, sched, steps, cls, prep, init, callback)
    c2, _ = reverse_process(net, moved, fixed, sched, steps, cls, rev_prep, None, callback)
    comp = c1 @ safe_inverse(c2)
    return comp, warp(moving, comp), c1
