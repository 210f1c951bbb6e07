"""Synthetic contrast changes for the modality-agnostic class (class 0) of a conditional model.

A sample whose class is dropped to 0 in training gets, independently on its fixed and moving
copies, a random monotone intensity remapping (MONAI's ``RandHistogramShift``: a piecewise-linear
curve through randomly moved control points) and, sometimes, an inverted foreground contrast
(T1-like <-> T2-like: the background stays dark). Class 0 then cannot rely on one modality's
intensities, which is what "modality-agnostic" promises at inference (``--modality any``).

Volumes are ``(C, D0, D1, D2)`` tensors in [-1, 1] (background -1).
"""

from __future__ import annotations

import torch

from .config import AffineConfig


def invert_foreground(volume: torch.Tensor, foreground: float) -> torch.Tensor:
    """Invert intensities above ``foreground`` (a fraction of the [0, 1] window): u -> 1 + f - u.

    The brightest tissue becomes the darkest foreground and the background is unchanged, as
    between a T1 and a T2 image."""
    u = (volume + 1) / 2
    inverted = torch.where(u > foreground, 1 + foreground - u, u)
    return inverted * 2 - 1


def remap_contrast(volume: torch.Tensor, cfg: AffineConfig, gen: torch.Generator) -> torch.Tensor:
    """One random contrast change of ``volume`` (draws from ``gen``; see the module docstring)."""
    from monai.transforms import RandHistogramShift

    out = volume
    if float(torch.rand((), generator=gen)) < cfg.agnostic_remap_prob:
        shift = RandHistogramShift(num_control_points=cfg.agnostic_remap_points, prob=1.0)
        shift.set_random_state(seed=int(torch.randint(2**31 - 1, (), generator=gen)))  # resumable: from gen
        out = torch.as_tensor(shift(out)).as_subclass(torch.Tensor)
    if float(torch.rand((), generator=gen)) < cfg.agnostic_invert_prob:
        out = invert_foreground(out, cfg.agnostic_foreground)
    return out.clamp(-1, 1)
