"""Spec 2.6's deformation losses against hand computations, including the fixed hinge batch bug."""

from __future__ import annotations

import torch

from diffusionreg.midline.losses import hinge_loss, landmark_loss, robust_penalty, smoothness_loss


def test_hinge_is_per_sample_in_pixels() -> None:
    u = torch.zeros(2, 2, 4, 4)
    u[0, 0] = 3.0  # sample 0 moves 3 px everywhere, its case MLS is 2 px
    mls_px = torch.tensor([2.0, 0.0])
    # sample 0: mean relu(3 - 2) = 1; sample 1 (still): 0. The reference compared sample 0's
    # magnitude with both labels: (1 + 3) / 2 = 2.
    assert float(hinge_loss(u, mls_px)) == 0.5


def test_hinge_gradient_is_finite_where_the_field_is_zero() -> None:
    """A still pixel (u = 0, e.g. a zero-initialised flow head) must give the zero subgradient, not NaN."""
    u = torch.zeros(1, 2, 4, 4, requires_grad=True)
    hinge_loss(u, torch.tensor([1.0])).backward()
    assert torch.isfinite(u.grad).all()


def test_robust_penalty_is_continuous_huber() -> None:
    e = torch.tensor([0.0, 0.4, 0.8, 2.0, -2.0])
    got = robust_penalty(e, 0.8)
    want = torch.tensor([0.4, (0.16 + 0.64) / 1.6, 0.8, 2.0, 2.0])
    assert torch.allclose(got, want)


def test_landmark_loss_reads_the_field_at_the_points() -> None:
    u = torch.zeros(1, 2, 8, 8)
    u[0, 0, 3, 5] = 2.0  # a 2 px displacement along i at pixel (3, 5)
    points = torch.tensor([[[3.0, 5.0], [1.0, 1.0]]])
    exact = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    assert abs(float(landmark_loss(u, points, exact, 0.8)) - 0.4) < 1e-6  # every error 0: the floor delta / 2
    miss = torch.zeros_like(exact)
    assert abs(float(landmark_loss(u, points, miss, 0.8)) - (2.0 + 3 * 0.4) / 4) < 1e-6


def test_smoothness_of_a_ramp() -> None:
    i = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 5)
    # d/di = 1 everywhere, d/dj = 0: half the mean squared difference = 0.5
    assert float(smoothness_loss(i.clone())) == 0.5
