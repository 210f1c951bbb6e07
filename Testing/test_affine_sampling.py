"""One-jump forward sampling: statistics, invertibility, axis order, warping."""

import math

import numpy as np
import pytest
import torch

from diffusionreg.affine.sampling import euler_rotation, frobenius_loss, sample_forward, translation_to_normalized, warp
from diffusionreg.affine.schedule import Schedule

SCHED = Schedule.make(65, (0.01, 0.07), (0.5, 4.0))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_target_is_inverse_and_bounded():
    t = torch.randint(1, 66, (2000,), generator=_gen())
    mat, target = sample_forward(t, SCHED, (64, 64, 64), generator=_gen(1))
    prod = mat @ torch.cat([target, torch.tensor([[[0, 0, 0, 1.0]]], dtype=torch.float64).expand(len(t), 1, 4)], 1)
    assert torch.allclose(prod, torch.eye(4, dtype=torch.float64).expand_as(prod), atol=1e-9)
    assert torch.all(torch.linalg.det(mat[:, :3, :3]) > 0)


def test_affine_magnitude_statistics():
    t = torch.full((4000,), 65)
    mat, _ = sample_forward(t, SCHED, (64, 64, 64), affine_prob=1.0, generator=_gen(2))
    mag = torch.linalg.matrix_norm(mat[:, :3, :3] - torch.eye(3, dtype=torch.float64), ord=2)
    sigma = SCHED.lin_cum[-1]
    assert float(mag.max()) <= 2.5 * sigma + 1e-9
    # |m| of a clamped normal: E|m| ~ sigma * sqrt(2/pi) (clamping at 2.5 sigma is tiny)
    assert float(mag.mean()) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.05)


def test_rigid_type_is_rotation_times_scale():
    t = torch.full((500,), 30)
    mat, _ = sample_forward(t, SCHED, (64, 64, 64), affine_prob=0.0, generator=_gen(3))
    lin = mat[:, :3, :3]
    scales = torch.linalg.norm(lin, dim=1)  # column norms = scales
    rot = lin / scales[:, None, :]
    eye = torch.eye(3, dtype=torch.float64).expand_as(rot)
    assert torch.allclose(rot.transpose(1, 2) @ rot, eye, atol=1e-9)
    assert torch.all(torch.linalg.det(rot) > 0)


def test_mixture_fraction():
    t = torch.full((3000,), 65)
    mat, _ = sample_forward(t, SCHED, (32, 32, 32), affine_prob=0.8, generator=_gen(4))
    lin = mat[:, :3, :3]
    rot = lin / torch.linalg.norm(lin, dim=1)[:, None, :]
    ortho = torch.linalg.matrix_norm(rot.transpose(1, 2) @ rot - torch.eye(3, dtype=torch.float64)) < 1e-8
    assert float(ortho.double().mean()) == pytest.approx(0.2, abs=0.03)


def test_translation_statistics_and_axis_order():
    t = torch.full((6000,), 65)
    shape = (40, 64, 128)  # D0 (i, z), D1 (j, y), D2 (k, x)
    mat, _ = sample_forward(t, SCHED, shape, generator=_gen(5))
    tau = mat[:, :3, 3]
    # x (k axis) is divided by 128/2, y by 64/2, z (i axis) by 40/2
    std_vox = SCHED.tr_cum[-1]
    measured = tau.std(0) * torch.tensor([64.0, 32.0, 20.0], dtype=torch.float64)
    assert np.allclose(measured.numpy(), std_vox * 0.986, rtol=0.06)
    n = translation_to_normalized(torch.tensor([[64.0, 32.0, 20.0]], dtype=torch.float64), shape)
    assert torch.allclose(n, torch.ones(1, 3, dtype=torch.float64))


def test_translation_moves_content_along_the_right_axis():
    vol = -torch.ones(1, 1, 8, 12, 16)
    vol[0, 0, 4, 6, 8] = 1.0
    theta = torch.eye(4, dtype=torch.float64)[None]
    # sample at p + (2 voxels along k): content moves by -2 voxels along k
    theta[0, :3, 3] = translation_to_normalized(torch.tensor([[2.0, 0, 0]], dtype=torch.float64), (8, 12, 16))
    out = warp(vol, theta)
    idx = np.unravel_index(int(out.argmax()), out.shape[2:])
    assert tuple(int(i) for i in idx) == (4, 6, 6)


def test_warp_inverse_round_trip_and_background():
    r = torch.linspace(-1, 1, 24)
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    vol = (torch.cos(3 * x) * torch.sin(2 * y + z) * (x**2 + y**2 + z**2 < 0.5))[None, None]
    rot = torch.eye(4, dtype=torch.float64)[None]
    rot[0, :3, :3] = euler_rotation(torch.tensor([[0.2, -0.1, 0.15]], dtype=torch.float64))
    there = warp(vol, rot)
    back = warp(there, torch.linalg.inv(rot))
    assert float((back - vol)[:, :, 8:16, 8:16, 8:16].abs().mean()) < 0.05
    assert float(there[0, 0, 0, 0, 0]) == pytest.approx(-1.0)  # outside stays background


def test_frobenius_loss_not_squared():
    a = torch.zeros(2, 3, 4)
    b = torch.zeros(2, 3, 4)
    b[0, 0, 0] = 3.0
    b[0, 1, 1] = 4.0
    assert float(frobenius_loss(a, b)) == pytest.approx(2.5, abs=1e-5)
