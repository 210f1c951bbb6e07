"""SITReg and two-step ICON networks: symmetry, inverse consistency, topology, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusionreg import fields
from diffusionreg.deformable.config import PRESETS, DeformableConfig, ICONConfig, SITRegConfig, get_config
from diffusionreg.deformable.icon import TwoStepICON
from diffusionreg.deformable.losses import cycle_consistency_loss, lncc_squared
from diffusionreg.deformable.register import build_network, pair_loss
from diffusionreg.deformable.sitreg import HalfAffine, SITReg, bspline_bound, bspline_upsample
from diffusionreg.errors import InputError

SHAPE = (24, 24, 24)
TINY = SITRegConfig(feature_channels=(4, 8, 8), head_channels=(4, 8, 8))


def smooth_noise(seed: int, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g)
    for _ in range(2):
        x = F.avg_pool3d(x, 5, stride=1, padding=2)
    return (x - x.min()) / (x.max() - x.min())


def randomised(net: SITReg, seed: int, std: float) -> SITReg:
    """Random weights everywhere, heads scaled so tanh reaches its bound (worst case)."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.normal_(module.weight, std=0.3)
    for head in net.heads:
        torch.nn.init.normal_(head.out.weight, std=std)
        torch.nn.init.normal_(head.out.bias, std=std / 3)
    return net


@pytest.mark.parametrize("affine", [False, True])
def test_sitreg_swapping_inputs_swaps_outputs(affine):
    cfg = SITRegConfig(feature_channels=(4, 8, 8), head_channels=(4, 8, 8), predict_affine=affine)
    net = randomised(SITReg(cfg, SHAPE), 0, 1.0)
    if affine:
        torch.nn.init.normal_(net.affine.mlp[-1].weight, std=0.05)
    a, b = smooth_noise(1), smooth_noise(2)
    with torch.no_grad():
        u, w = net(a, b)
        u2, w2 = net(b, a)
    assert u.abs().max() > 0.3  # a real deformation
    torch.testing.assert_close(u, w2, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, u2, atol=1e-5, rtol=0)


def test_half_affine_is_inverse_consistent():
    params = torch.randn(2, 12, dtype=torch.float64) * 0.1
    m = HalfAffine.matrix(params)
    torch.testing.assert_close(HalfAffine.matrix(torch.zeros(1, 12, dtype=torch.float64))[0], torch.eye(4, dtype=torch.float64))
    a = m[0] @ torch.linalg.inv(m[1])
    a_inv = m[1] @ torch.linalg.inv(m[0])
    torch.testing.assert_close(a @ a_inv, torch.eye(4, dtype=torch.float64))


def test_atomic_update_inverts_within_fixed_point_tolerance():
    """One bounded B-spline update and its fixed-point inverse: |a o a^-1 - id| <= 0.01 voxel."""
    g = torch.Generator().manual_seed(3)
    for factor in (1, 2, 4):
        n = [s // factor for s in SHAPE]
        control = bspline_bound(factor) * torch.tanh(5 * torch.randn(1, 3, *n, generator=g))
        u = bspline_upsample(control, factor) * factor
        w = fields.invert(u, tolerance=0.01)
        residual = fields.compose(u, w).norm(dim=1)
        assert residual.max() <= 0.01 + 1e-6
        assert fields.jacobian_determinant(u).min() > 0


def test_bspline_bound_keeps_the_jacobian_contractive():
    """The worst-case sign pattern of control points still gives |du/dx|_inf < 1 (3D)."""
    for factor in (1, 2, 4, 8):
        n = 6
        signs = torch.ones(1, 3, n, n, n)
        signs[..., ::2, :, :] *= -1
        signs[..., :, ::2, :] *= -1
        signs[..., :, :, ::2] *= -1
        u = bspline_upsample(bspline_bound(factor) * signs, factor) * factor
        grads = torch.gradient(u[0], dim=(1, 2, 3))
        row_sums = sum(g.abs() for g in grads)  # sum over d of |du_c/dx_d|
        assert row_sums.max() < 1.0


def test_sitreg_forward_inverse_is_identity_up_to_tolerance_and_interpolation():
    """Realistic (smooth, sub-voxel to voxel) deformations: residual within 0.01 voxel on average
    and a small multiple of it at worst, where composition resamples rough fields."""
    net = randomised(SITReg(TINY, SHAPE), 4, 0.05)
    a, b = smooth_noise(5), smooth_noise(6)
    with torch.no_grad():
        u, w = net(a, b)
    for first, second in ((u, w), (w, u)):
        r = fields.compose(first, second).norm(dim=1)
        assert r.mean() < 0.01
        assert r.max() < 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_sitreg_jacobian_positive_for_random_inputs_and_weights(seed):
    net = randomised(SITReg(TINY, SHAPE), seed, 3.0)  # saturated heads: every level at its bound
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(1, 1, *SHAPE, generator=g), torch.rand(1, 1, *SHAPE, generator=g)
    with torch.no_grad():
        u, w = net(a, b)
    assert u.abs().max() > 1.0
    assert fields.jacobian_determinant(u).min() > 0
    assert fields.jacobian_determinant(w).min() > 0
    assert float(fields.non_diffeomorphic_volume(u).volume_voxels) == 0.0


def test_icon_is_antisymmetric_and_inverse_consistent():
    torch.manual_seed(0)
    cfg = ICONConfig(channels=(4, 8, 8, 8, 8, 8), output_bound=0.35, smoothing_kernel=3)
    net = TwoStepICON(cfg, SHAPE)
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            torch.nn.init.normal_(module.weight, std=0.3)
    a, b = smooth_noise(7), smooth_noise(8)
    with torch.no_grad():
        v = net.velocity(0, a, b)
        torch.testing.assert_close(net.velocity(0, b, a), -v, atol=1e-6, rtol=0)
        u, w = net(a, b)
        u2, w2 = net(b, a)
    torch.testing.assert_close(u, w2, atol=1e-5, rtol=0)
    assert u.abs().max() > 0.05
    assert fields.compose(u, w).norm(dim=1).mean() < 0.01
    assert fields.compose(u, w).norm(dim=1).max() < 0.1
    assert fields.jacobian_determinant(u).min() > 0


def _shifted_pair():
    """A smooth blob and the same blob shifted by 1.5 voxels along axis 0."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (16, 16, 16)], indexing="ij"))

    def blob(c0):
        c = torch.tensor([c0, 8.0, 8.0]).view(3, 1, 1, 1)
        return torch.exp(-((idx - c) ** 2).sum(0) / (2 * 3.0**2))[None, None]

    return blob(7.0), blob(8.5)


@pytest.mark.parametrize("method", ["sitreg", "icon"])
def test_tiny_training_lowers_the_loss(method):
    torch.manual_seed(0)
    if method == "sitreg":
        cfg = DeformableConfig(
            method="sitreg", grid_shape=(16, 16, 16), sitreg=TINY, similarity="mse", regularisation_weight=0.01
        )
        lr = 1e-2
    else:
        cfg = DeformableConfig(
            method="icon",
            grid_shape=(16, 16, 16),
            similarity="mse",
            regularisation_weight=0.01,
            icon=ICONConfig(channels=(4, 8, 8, 8, 8, 8), squarings=6, smoothing_kernel=3),
        )
        lr = 1e-2
    net = build_network(cfg)
    a, b = _shifted_pair()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(8):
        loss, _ = pair_loss(net, cfg, a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-3:]) < 0.8 * losses[0]


def test_lncc_and_cycle_losses():
    a = smooth_noise(9)
    assert float(lncc_squared(a, a)[0]) > 0.95
    assert float(lncc_squared(a, 2 * a + 1)[0]) > 0.95
    zero = torch.zeros(1, 3, *SHAPE)
    assert float(cycle_consistency_loss(zero, zero, zero, zero, zero, zero)) == 0.0
    t = torch.zeros(1, 3, *SHAPE)
    t[:, 0] = 0.5
    assert float(cycle_consistency_loss(t, t, -2 * t, -t, -t, 2 * t)) < 1e-10


def test_configs():
    for name in PRESETS:
        cfg = get_config(name)
        assert DeformableConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    lumir = get_config("full-lumir")
    assert lumir.sitreg.feature_channels == (12, 32, 64, 128, 128, 128)
    assert lumir.sitreg.head_channels == (12, 64, 128, 256, 256, 256)
    assert get_config("full-oasis").sitreg.head_norm_groups == 0
    assert get_config("full", "icon").icon.squarings == 12
    with pytest.raises(InputError):
        get_config("nope")
    with pytest.raises(InputError):
        DeformableConfig(method="icon", grid_shape=(30, 32, 32)).validate()


def test_group_consistency_training_term():
    from diffusionreg.deformable.register import triplet_loss

    cfg = DeformableConfig(method="sitreg", grid_shape=(16, 16, 16), sitreg=TINY, cycle_weight=40.0)
    net = randomised(SITReg(TINY, (16, 16, 16)), 0, 0.3)
    a, b, c = (smooth_noise(s, (16, 16, 16)) for s in (1, 2, 3))
    loss, stats = triplet_loss(net, cfg, a, b, c)
    loss.backward()
    assert stats["cycle"] > 0 and all(p.grad is not None for p in net.heads.parameters())


def test_lncc_box_sums_are_the_sums_over_the_zero_padded_window():
    """The separable box sums of the NCC loss equal a direct 7^3 convolution with ones."""
    from diffusionreg.deformable.losses import _box_sum

    x = torch.rand(2, 5, 9, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(5, 1, 7, 7, 7, dtype=torch.float64)
    direct = F.conv3d(x, ones, padding=3, groups=5)
    assert torch.allclose(_box_sum(x, 7), direct, atol=1e-10)
