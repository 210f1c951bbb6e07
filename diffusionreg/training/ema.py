"""Exponential moving average of a network's weights (``torch.optim.swa_utils.AveragedModel``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA:
    """EMA with a warm-up: ``decay = min(beta, 1 - (1 + n)^-power)``, ``n`` = steps after ``start``;
    up to ``start`` steps the average is a copy of the weights.

    The decay follows the optimisation step passed to :meth:`update`, not a count of updates, so a
    resumed run continues exactly. Integer buffers are copied, float buffers averaged.
    """

    def __init__(self, model: nn.Module, beta: float, power: float, start: int) -> None:
        self.beta, self.power, self.start = beta, power, start
        self.averaged = AveragedModel(model, avg_fn=self._average, use_buffers=True)
        self.averaged.eval()
        for p in self.averaged.parameters():
            p.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network (same class as the trained one)."""
        return self.averaged.module

    def _average(self, averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        if not averaged.dtype.is_floating_point:
            return current
        decay = min(self.beta, max(0.0, 1 - (1 + int(n)) ** -self.power))
        return averaged * decay + current * (1 - decay)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in ``model`` after optimisation step ``step`` (1-based)."""
        # AveragedModel copies when its count is 0 and hands the count to the average otherwise:
        # setting the count from the step gives the warm-up copy and the step-based decay.
        self.averaged.n_averaged.fill_(max(step - self.start, 0))
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        """The averaged network's own state dict (its keys, so a checkpoint's ``ema`` entry loads as
        model weights); the update count needs no saving, :meth:`update` sets it from the step."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
