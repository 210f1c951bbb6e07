"""The test-time Adam loop shared by instance optimisation (network weights) and the velocity
refinement (:mod:`.field_refine`): both minimise a loss on the one pair being registered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def adam_steps(
    optimiser: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], steps: int, progress=None, label: str = "optimisation"
) -> list[float]:
    """Take ``steps`` optimiser steps on ``loss_fn()``; returns the loss before each step.

    With a :class:`diffusionreg.progress.Progress`, each step is reported in stage ``label``.
    """
    losses: list[float] = []
    stage_context = progress.stage(label, total=steps) if progress is not None else contextlib.nullcontext()
    with stage_context as stage:
        for _ in range(steps):
            loss = loss_fn()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            if stage is not None:
                stage.update(message=f"loss {losses[-1]:.4f}")
    return losses
