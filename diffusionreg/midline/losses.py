"""Losses of the deformation network (spec 2.6), on slice fields ``u`` ``(B, 2, N, N)`` in pixels.

``u`` is the displacement of ``phi`` with ``x(p) ~ x_tilde(phi(p))``: the pseudo-normal image
warped by ``phi`` explains the observed slice, and at a shifted landmark ``u = p_normal - p_shifted``.
"""

from __future__ import annotations

import torch

from diffusionreg.spaces import sample

from .network import as_volume, warp_slices


def image_loss(x: torch.Tensor, x_tilde: torch.Tensor, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean(m (x - x_tilde o phi)^2)`` (masked by the head mask ``m`` ``(B, 1, N, N)``)."""
    return torch.mean(mask * (x - warp_slices(x_tilde, u)) ** 2)


def smoothness_loss(u: torch.Tensor) -> torch.Tensor:
    """Half the mean squared forward differences along both slice axes."""
    di = u[:, :, 1:, :] - u[:, :, :-1, :]
    dj = u[:, :, :, 1:] - u[:, :, :, :-1]
    return 0.5 * (torch.mean(di**2) + torch.mean(dj**2))


def field_at(u: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``u`` (bilinear) at slice pixels ``points`` ``(B, K, 2)`` (i, j): ``(B, K, 2)``."""
    positions = torch.cat([points, torch.zeros_like(points[..., :1])], dim=-1).transpose(1, 2)  # (B, 3, K)
    return sample(as_volume(u), positions)[:, :2].transpose(1, 2)


def robust_penalty(error: torch.Tensor, delta: float) -> torch.Tensor:
    """Spec 2.6's landmark penalty: ``(e^2 + delta^2) / (2 delta)`` within ``delta``, ``|e|`` beyond
    (a Huber loss scaled by ``1/delta`` and offset; continuous at ``delta``)."""
    magnitude = error.abs()
    return torch.where(magnitude <= delta, (error**2 + delta**2) / (2.0 * delta), magnitude)


def landmark_loss(u: torch.Tensor, points: torch.Tensor, targets: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean robust penalty of ``u(points) - targets`` (both ``(B, K, 2)`` pixels)."""
    return robust_penalty(field_at(u, points) - targets, delta).mean()


def hinge_loss(u: torch.Tensor, case_mls_px: torch.Tensor) -> torch.Tensor:
    """``mean max(0, |u| - MLS_case)`` in slice pixels (the spec's units), each sample against its
    own case MLS (the reference broadcast the first sample's magnitude against every label)."""
    # vector_norm, not fields.vector_length: a loss needs its zero subgradient where u = 0
    magnitude = torch.linalg.vector_norm(u, dim=1)  # (B, N, N)
    return torch.relu(magnitude - case_mls_px.view(-1, 1, 1)).mean()


def field_loss(u: torch.Tensor, truth: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean robust penalty of ``u - truth`` over every pixel (``(B, 2, N, N)``, pixels): the
    landmark loss at all pixels, for synthetic slices whose whole field is known."""
    return robust_penalty(u - truth, delta).mean()
