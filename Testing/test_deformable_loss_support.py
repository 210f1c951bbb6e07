"""The refinement's sparse similarity (issue 18): evaluated only where two zero-background maps
can differ, it is the dense loss (value, gradient, optimisation path), and the support it uses
holds every voxel whose loss can become non-zero while the map moves by less than the margin."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_deformable_refine import smooth_field

from diffusionreg import fields
from diffusionreg.deformable.field_refine import FieldRefineConfig, refine_pair, refined_positions
from diffusionreg.deformable.loss_support import dilated_supports, loss_support, pointwise_similarity

SHAPE = (20, 22, 18)


def blobs(seed: int, shape=SHAPE) -> torch.Tensor:
    """A zero-background map: a few soft blobs (about 4 % of the voxels non-zero), like vessel maps."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(1, 1, *shape, generator=g, dtype=torch.float64) > 0.998).double()
    x = F.avg_pool3d(x, 3, stride=1, padding=1)
    return x / x.max()


@pytest.fixture(scope="module")
def pair():
    """fixed (blobs), moving = fixed under a smooth deformation, a network pair half-way there."""
    fixed = blobs(1)
    velocity = smooth_field(2, 1.2, SHAPE)
    moving = fields.warp(fixed, fields.exp_velocity(-velocity, 7))
    u = fields.exp_velocity(0.5 * velocity, 7)
    w = fields.exp_velocity(-0.5 * velocity, 7)
    return moving, fixed, u, w


CFG = FieldRefineConfig(
    iterations=12,
    coarse_iterations=6,
    coarse_scale=0.6,
    control_factor=2,
    learning_rate=0.1,
    smoothness_weight=0.01,
    squarings=5,
    support_margin=2,
    support_every=3,
)


def test_points_chain_is_the_composition_of_the_fields_on_their_grid():
    half = torch.cat([smooth_field(3, 0.8, SHAPE), smooth_field(4, 0.8, SHAPE)], 0)
    pair = torch.cat([smooth_field(5, 1.5, SHAPE), smooth_field(6, 1.5, SHAPE)], 0)
    points = fields.identity_grid(SHAPE, dtype=torch.float64).flatten(2).expand(2, 3, -1)
    chained = (refined_positions(points, half, pair, SHAPE) - points).view(2, 3, *SHAPE)
    assert torch.allclose(chained, fields.compose(half, fields.compose(pair, half)), atol=1e-12)


def test_points_chain_reads_fields_of_another_grid_as_resize_field_does():
    """A field on a coarser grid over the same box, read at the fine grid's voxels, equals the
    field resized to the fine grid (same face-aligned convention, values in fine voxels)."""
    coarse = (10, 11, 9)
    half = torch.zeros(2, 3, *coarse, dtype=torch.float64)
    pair = torch.cat([smooth_field(5, 0.7, coarse), smooth_field(6, 0.7, coarse)], 0)
    points = fields.identity_grid(SHAPE, dtype=torch.float64).flatten(2).expand(2, 3, -1)
    read = (refined_positions(points, half, pair, SHAPE) - points).view(2, 3, *SHAPE)
    assert torch.allclose(read, fields.resize_field(pair, SHAPE), atol=1e-12)


def test_support_holds_every_voxel_whose_loss_can_be_non_zero_within_the_margin(pair):
    moving, fixed, u, w = pair
    images = torch.cat([moving, fixed], 0)
    targets = images.flip(0)
    identity = fields.identity_grid(SHAPE, dtype=torch.float64)
    current = identity + torch.cat([u, w], 0)
    for margin in (1, 2):
        support = loss_support(images, dilated_supports(images, margin), current.flatten(2))
        assert 0.05 < float(support.double().mean()) < 0.8  # sparse, and not only the maps
        for seed in range(4):  # the map moves by up to (just under) the margin, any direction
            step = smooth_field(10 + seed, 1.0, SHAPE)
            step = 0.99 * margin * step / step.abs().max()
            moved = current + step
            loss = pointwise_similarity(fields.spaces.sample(images, moved), targets, "l1").flatten(1).sum(0)
            assert not bool((loss.flatten() > 0)[~support].any())
    # without a margin, moving the map by 1.5 voxels does reach voxels outside the support
    support = loss_support(images, dilated_supports(images, 0), current.flatten(2))
    moved = current + 1.5
    loss = pointwise_similarity(fields.spaces.sample(images, moved), targets, "l1").flatten(1).sum(0)
    assert bool((loss.flatten() > 0)[~support].any())


@pytest.mark.parametrize("similarity", ["l1", "mse"])
def test_sparse_refinement_equals_the_dense_one(pair, similarity):
    """Same losses at every step and the same refined pair: value and gradient agree."""
    moving, fixed, u, w = pair
    sparse_stats: dict = {}
    dense_stats: dict = {}
    u1, w1, sparse = refine_pair(u, w, moving, fixed, CFG, similarity, stats=sparse_stats)
    u2, w2, dense = refine_pair(u, w, moving, fixed, dataclasses.replace(CFG, support_margin=-1), similarity, stats=dense_stats)
    assert sparse_stats["support_fraction"] < 0.8 and dense_stats["support_fraction"] == 1.0
    assert sparse_stats["support_leak"] == 0.0
    assert dense[-1] < dense[0]
    assert torch.allclose(torch.tensor(sparse), torch.tensor(dense), rtol=1e-9, atol=1e-12)
    assert torch.allclose(u1, u2, atol=1e-8) and torch.allclose(w1, w2, atol=1e-8)


def test_sparse_loss_gradient_equals_the_dense_gradient(pair):
    """One step from a non-zero velocity: the first loss and the step Adam takes from its gradient
    (sign-like on step 1, so compared after a second step too) are the dense ones."""
    moving, fixed, u, w = pair
    cfg = dataclasses.replace(CFG, iterations=2, coarse_iterations=0, learning_rate=0.3)
    u_s, _, loss_s = refine_pair(u, w, moving, fixed, cfg, "l1")
    u_d, _, loss_d = refine_pair(u, w, moving, fixed, dataclasses.replace(cfg, support_margin=-1), "l1")
    assert loss_s == pytest.approx(loss_d, rel=1e-10)
    assert torch.allclose(u_s, u_d, atol=1e-9)


def test_a_support_kept_too_long_is_measured_as_a_leak(pair):
    """No margin and no re-selection: the map moves off the support and the leak is reported."""
    moving, fixed, u, w = pair
    stats: dict = {}
    cfg = dataclasses.replace(CFG, support_margin=0, support_every=4, iterations=12, coarse_iterations=0, learning_rate=0.4)
    refine_pair(u, w, moving, fixed, cfg, "l1", stats=stats)
    assert stats["support_leak"] > 0.0


def test_blurred_coarse_stages_keep_the_sparse_loss_exact(pair):
    """The coarse stages' Gaussian is truncated, so a blurred zero-background map is still zero
    beyond it: the sparse loss stays the dense one there too."""
    moving, fixed, u, w = pair
    cfg = dataclasses.replace(CFG, coarse_stages=2, coarse_sigma=1.0)
    _, _, sparse = refine_pair(u, w, moving, fixed, cfg, "l1")
    _, _, dense = refine_pair(u, w, moving, fixed, dataclasses.replace(cfg, support_margin=-1), "l1")
    assert torch.allclose(torch.tensor(sparse), torch.tensor(dense), rtol=1e-9, atol=1e-12)


def test_sampled_loss_repeats_and_estimates_the_full_one(pair):
    """A drawn share of the supported voxels per iteration: the same seed repeats the registration
    exactly, and over seeds the first (sampled) loss averages to the full one (an unbiased estimate)."""
    moving, fixed, u, w = pair
    cfg = dataclasses.replace(CFG, iterations=1, coarse_iterations=0, sample_fraction=0.3)
    full = refine_pair(u, w, moving, fixed, dataclasses.replace(cfg, sample_fraction=1.0), "l1")[2][0]
    draws = [refine_pair(u, w, moving, fixed, dataclasses.replace(cfg, sample_seed=seed), "l1")[2][0] for seed in range(40)]
    assert len(set(draws)) > 30  # the seeds draw different voxels
    assert sum(draws) / len(draws) == pytest.approx(full, rel=0.03)
    repeat = dataclasses.replace(CFG, sample_fraction=0.3)
    first, second = (refine_pair(u, w, moving, fixed, repeat, "l1") for _ in range(2))
    assert first[2] == second[2] and torch.equal(first[0], second[0])


def test_pointwise_similarity_refuses_a_windowed_one():
    with pytest.raises(ValueError, match="not pointwise"):
        pointwise_similarity(torch.zeros(1), torch.zeros(1), "ncc")


def test_support_settings_are_validated():
    from diffusionreg.deformable.config import DeformableConfig
    from diffusionreg.errors import InputError

    with pytest.raises(InputError, match="support_every"):
        DeformableConfig.from_dict({"inference": {"refine": {"support_every": 0}}})
    with pytest.raises(InputError, match="support_margin"):
        DeformableConfig.from_dict({"inference": {"refine": {"support_margin": -2}}})
