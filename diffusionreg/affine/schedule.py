"""Noise schedules of the spatial diffusion forward process.

Per-step std sigma_step(t), t = 1..T, rises from s_min to s_max (cosine or linear in
u_t = (t-1)/(T-1)); the marginal at t is a single Gaussian with cumulative std
Sigma(t) = sqrt(sum_{s<=t} sigma_step(s)^2); the reverse process blends by
alpha_t = sigma_step(t) / Sigma(t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def step_std(timesteps: int, s_min: float, s_max: float, kind: str = "cosine") -> np.ndarray:
    """sigma_step(t) for t = 1..T as an array of length T (index t-1)."""
    if timesteps < 1:
        raise ValueError("timesteps must be >= 1")
    u = np.zeros(timesteps) if timesteps == 1 else np.arange(timesteps) / (timesteps - 1)
    if kind == "cosine":
        ramp = 1.0 - np.cos(math.pi * u / 2.0) ** 2
    elif kind == "linear":
        ramp = u
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return s_min + (s_max - s_min) * ramp


@dataclass(frozen=True)
class Schedule:
    """Linear-part and translation schedules; arrays indexed by t-1."""

    lin_step: np.ndarray
    lin_cum: np.ndarray
    tr_step: np.ndarray  # voxels of the network grid
    tr_cum: np.ndarray

    @classmethod
    def make(cls, timesteps: int, lin_std=(0.01, 0.07), trans_std=(0.5, 4.0), kind: str = "cosine") -> Schedule:
        lin = step_std(timesteps, lin_std[0], lin_std[1], kind)
        tr = step_std(timesteps, trans_std[0], trans_std[1], kind)
        sched = cls(lin, np.sqrt(np.cumsum(lin**2)), tr, np.sqrt(np.cumsum(tr**2)))
        if sched.lin_cum[-1] * 2.5 >= 1.0:
            import warnings

            warnings.warn("Sigma(T) * 2.5 >= 1: sampled affines may be singular", stacklevel=2)
        return sched

    @classmethod
    def from_config(cls, cfg) -> Schedule:
        return cls.make(cfg.timesteps, cfg.lin_std, cfg.trans_std_vox, cfg.schedule)

    @property
    def timesteps(self) -> int:
        return len(self.lin_step)

    def alpha_lin(self, t: int) -> float:
        return float(self.lin_step[t - 1] / self.lin_cum[t - 1])

    def alpha_tr(self, t: int) -> float:
        return float(self.tr_step[t - 1] / self.tr_cum[t - 1])
