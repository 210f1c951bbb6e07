"""Closed-form checks of diffusionreg.fields (warping, composition, exponentiation, inversion, Jacobians).

Every check that touches tensors runs on the CPU and, marked ``gpu``, on CUDA when available.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffusionreg import fields
from diffusionreg.errors import InputError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]
F64 = torch.float64


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def linear_field(matrix: np.ndarray, shape: tuple[int, int, int], centre, device, translation=(0.0, 0.0, 0.0)):
    """Displacement of x -> A (x - c) + c + t, as a (1, 3, ...) float64 field."""
    grid = fields.identity_grid(shape, device=device, dtype=F64)
    a = torch.as_tensor(matrix, dtype=F64, device=device)
    c = torch.as_tensor(centre, dtype=F64, device=device).view(1, 3, 1, 1, 1)
    t = torch.as_tensor(translation, dtype=F64, device=device).view(1, 3, 1, 1, 1)
    mapped = torch.einsum("ij,bj...->bi...", a, grid - c) + c + t
    return mapped - grid


def rotation_about_axis2(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]])


def sinusoid(points: torch.Tensor, amplitude: float, period: float) -> torch.Tensor:
    """Smooth analytic displacement (3, ...) at voxel positions ``points`` (3, ...)."""
    components = []
    for c in range(3):
        a, b = (c + 1) % 3, (c + 2) % 3
        components.append(
            amplitude * torch.sin(2 * math.pi * points[a] / period + c) * torch.cos(2 * math.pi * points[b] / period)
        )
    return torch.stack(components)


def interior(tensor: torch.Tensor, margin: int) -> torch.Tensor:
    return tensor[..., margin:-margin, margin:-margin, margin:-margin]


# ----------------------------------------------------------------------------- grids and warping


def test_identity_grid_holds_voxel_indices(device):
    grid = fields.identity_grid((4, 5, 6), device=device, dtype=F64)
    assert grid.shape == (1, 3, 4, 5, 6)
    assert grid.device.type == device.type
    assert grid[0, :, 3, 1, 5].tolist() == [3.0, 1.0, 5.0]
    assert grid[0, 2, 0, 0, :].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_integer_translation_is_a_roll(device, mode):
    torch.manual_seed(0)
    volume = torch.randn(2, 2, 12, 13, 14, dtype=F64, device=device)
    shift = (2, -3, 1)
    u = torch.tensor(shift, dtype=F64, device=device).view(1, 3, 1, 1, 1).expand(1, 3, 12, 13, 14)
    # volume(x + t) == roll by -t wherever x + t stays on the grid
    expected = torch.roll(volume, shifts=tuple(-s for s in shift), dims=(2, 3, 4))
    valid = (slice(None), slice(None), slice(0, 10), slice(3, 13), slice(0, 13))
    border = fields.warp(volume, u, mode=mode, padding_mode="border")
    zeros = fields.warp(volume, u, mode=mode, padding_mode="zeros")
    assert border.shape == volume.shape
    torch.testing.assert_close(border[valid], expected[valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(zeros[valid], expected[valid], rtol=0, atol=1e-12)
    # a whole voxel or more outside the grid: zeros padding gives 0, border padding the edge value
    assert torch.all(zeros[:, :, 10:] == 0)
    # border padding clamps: x = (11, 5, 2) reads (min(13, 11), 2, 3)
    torch.testing.assert_close(border[0, 0, 11, 5, 2], volume[0, 0, 11, 2, 3], rtol=0, atol=1e-12)


@pytest.mark.parametrize(("padding_mode", "scipy_mode"), [("border", "nearest"), ("zeros", "grid-constant")])
def test_warp_matches_scipy_map_coordinates(device, padding_mode, scipy_mode):
    rng = np.random.default_rng(1)
    volume = rng.standard_normal((9, 10, 11))
    u = rng.uniform(-3.0, 3.0, (3, 9, 10, 11))
    expected = ndimage.map_coordinates(volume, np.indices(volume.shape) + u, order=1, mode=scipy_mode)
    warped = fields.warp(
        torch.from_numpy(volume)[None, None].to(device),
        torch.from_numpy(u)[None].to(device),
        padding_mode=padding_mode,
    )
    np.testing.assert_allclose(warped[0, 0].cpu().numpy(), expected, rtol=0, atol=1e-10)


def test_warp_labels_nearest_keeps_dtype_and_values(device):
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.int64, device=device)
    labels[..., 2:5, 2:5, 2:5] = 7
    u = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float32, device=device)
    u[:, 0] = 1.4  # rounds to a one-voxel shift along axis 0
    warped = fields.warp(labels, u, mode="nearest")
    assert warped.dtype == torch.int64
    assert set(torch.unique(warped).tolist()) == {0, 7}
    assert torch.equal(warped[..., 1:4, :, :], labels[..., 2:5, :, :])
    with pytest.raises(ValueError, match="nearest"):
        fields.warp(labels, u, mode="bilinear")


def test_rotation_about_the_centre_samples_a_linear_volume_exactly(device):
    shape = (17, 17, 9)
    centre = [8.0, 8.0, 4.0]
    rotation = rotation_about_axis2(math.radians(20.0))
    u = linear_field(rotation, shape, centre, device)
    grid = fields.identity_grid(shape, device=device, dtype=F64)
    coefficients = torch.tensor([0.7, -1.3, 2.1], dtype=F64, device=device).view(1, 3, 1, 1, 1)
    volume = (grid * coefficients).sum(dim=1, keepdim=True) + 5.0  # trilinear interpolation is exact on it
    warped = fields.warp(volume, u)
    mapped = grid + u
    expected = (mapped * coefficients).sum(dim=1, keepdim=True) + 5.0
    radius = torch.linalg.vector_norm(grid[:, :2] - grid.new_tensor(centre[:2]).view(1, 2, 1, 1, 1), dim=1)
    inside = (radius <= 7.5).unsqueeze(1)  # phi(x) stays on the grid
    assert inside.sum() > 1000
    torch.testing.assert_close(warped[inside], expected[inside], rtol=0, atol=1e-10)
    # the Jacobian of a rotation has determinant 1 everywhere, borders included
    torch.testing.assert_close(
        fields.jacobian_determinant(u), torch.ones(1, *shape, dtype=F64, device=device), rtol=0, atol=1e-12
    )
    # its inverse is the opposite rotation (exact inside: u is linear there)
    w = fields.invert(u, tolerance=1e-6)
    expected_inverse = linear_field(rotation.T, shape, centre, device)
    error = torch.linalg.vector_norm(w - expected_inverse, dim=1)
    assert error[inside[:, 0]].max() < 1e-5
    # compose(u, u^-1) is the identity there, and so is the other order
    assert torch.linalg.vector_norm(fields.compose(u, expected_inverse), dim=1)[inside[:, 0]].max() < 1e-10
    assert torch.linalg.vector_norm(fields.compose(expected_inverse, u), dim=1)[inside[:, 0]].max() < 1e-10


# ----------------------------------------------------------------------------- composition, exponentiation


def test_compose_translations_and_order(device):
    shape = (6, 7, 8)
    t_a = torch.tensor([1.0, -2.0, 0.5], dtype=F64, device=device).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    t_b = torch.tensor([0.25, 3.0, -1.0], dtype=F64, device=device).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    torch.testing.assert_close(fields.compose(t_a, t_b), t_a + t_b, rtol=0, atol=1e-12)
    # order: phi_a(phi_b(x)) with phi_a a scaling and phi_b a translation
    scale = linear_field(np.diag([2.0, 1.0, 1.0]), (16, 4, 4), (0.0, 0.0, 0.0), device)
    shift = torch.zeros(1, 3, 16, 4, 4, dtype=F64, device=device)
    shift[:, 0] = 3.0
    composed = fields.compose(scale, shift)  # x0 -> 2 (x0 + 3)
    grid0 = fields.identity_grid((16, 4, 4), device=device, dtype=F64)[:, 0]
    region = (slice(None), slice(0, 12))  # x0 + 3 stays on the grid
    torch.testing.assert_close(composed[:, 0][region], (2 * (grid0 + 3) - grid0)[region], rtol=0, atol=1e-12)


def test_exp_of_zero_and_constant_velocity(device):
    shape = (6, 6, 6)
    zero = torch.zeros(1, 3, *shape, dtype=F64, device=device)
    assert torch.equal(fields.exp_velocity(zero), zero)
    constant = torch.tensor([1.5, -0.75, 2.0], dtype=F64, device=device).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    torch.testing.assert_close(fields.exp_velocity(constant), constant.contiguous(), rtol=0, atol=1e-12)


def test_exp_of_rotation_generator_converges_to_matrix_exponential(device):
    shape = (20, 20, 20)
    centre = (9.5, 9.5, 9.5)
    generator = np.array([[0.0, -0.4, 0.0], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    v = linear_field(generator + np.eye(3), shape, centre, device)  # v(x) = L (x - c)
    expected = linear_field(torch.linalg.matrix_exp(torch.from_numpy(generator)).numpy(), shape, centre, device)
    grid = fields.identity_grid(shape, device=device, dtype=F64)
    inside = torch.linalg.vector_norm(grid - grid.new_tensor(centre).view(1, 3, 1, 1, 1), dim=1) < 8
    errors = [
        torch.linalg.vector_norm(fields.exp_velocity(v, steps=steps) - expected, dim=1)[inside].max().item() for steps in (4, 7)
    ]
    # (I + L / 2^n)^(2^n) - exp(L) = O(|L|^2 r / 2^(n+1)): about 0.04 voxel, then 0.005
    assert errors[1] < 0.01
    assert errors[0] > 4 * errors[1]


def test_exp_of_opposite_velocities_are_inverse(device):
    shape = (20, 20, 20)
    grid = fields.identity_grid(shape, device=device, dtype=F64)
    v = sinusoid(grid[0], amplitude=1.5, period=48.0)[None]
    forward, backward = fields.exp_velocity(v), fields.exp_velocity(-v)
    assert interior(torch.linalg.vector_norm(fields.compose(forward, backward), dim=1), 4).max() < 0.01
    assert interior(torch.linalg.vector_norm(fields.compose(backward, forward), dim=1), 4).max() < 0.01


# ----------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("anderson_memory", [0, 4])
def test_inverse_of_a_smooth_sinusoid(device, anderson_memory):
    shape = (24, 24, 24)
    amplitude, period = 2.0, 96.0
    grid = fields.identity_grid(shape, device=device, dtype=F64)[0]
    u = sinusoid(grid, amplitude, period)[None]
    w = fields.invert(u, tolerance=1e-3, anderson_memory=anderson_memory)
    # the solver's own certificate: |phi_u(phi_w(x)) - x| below tolerance everywhere
    assert torch.linalg.vector_norm(fields.compose(u, w), dim=1).max() <= 1e-3
    # against the analytic inverse (pointwise fixed point of the continuous field)
    reference = -u[0]
    for _ in range(60):
        reference = -sinusoid(grid + reference, amplitude, period)
    margin = 4
    assert interior(torch.linalg.vector_norm(w[0] - reference, dim=0), margin).max() < 0.01
    # the other order, phi_w(phi_u(x)) = x, carries the interpolation error of w
    assert interior(torch.linalg.vector_norm(fields.compose(w, u), dim=1), margin).max() < 0.01
    # the criterion has teeth: the first-order guess -u fails it
    assert interior(torch.linalg.vector_norm(fields.compose(u, -u), dim=1), margin).max() > 0.05


def test_invert_of_exp_is_exp_of_negative_velocity(device):
    grid = fields.identity_grid((20, 20, 20), device=device, dtype=F64)
    v = sinusoid(grid[0], amplitude=1.5, period=48.0)[None]
    inverse = fields.invert(fields.exp_velocity(v), tolerance=1e-5)
    assert interior(torch.linalg.vector_norm(inverse - fields.exp_velocity(-v), dim=1), 4).max() < 0.01


def test_invert_tolerance_and_batch(device):
    grid = fields.identity_grid((16, 16, 16), device=device, dtype=torch.float32)
    u = torch.cat([sinusoid(grid[0], 1.0, 40.0)[None], 0.5 * sinusoid(grid[0] + 3.0, 2.0, 32.0)[None]])
    w = fields.invert(u)  # default tolerance 0.01 voxel
    assert w.dtype == torch.float32 and w.shape == u.shape
    residual = torch.linalg.vector_norm(fields.compose(u, w), dim=1).flatten(1).amax(dim=1)
    assert torch.all(residual <= 0.01)
    # batch elements are independent problems
    w1 = fields.invert(u[1:], tolerance=1e-5)
    assert torch.linalg.vector_norm(fields.compose(u[1:], w1), dim=1).max() <= 1e-5


def test_invert_gradient_matches_finite_differences():
    torch.manual_seed(3)
    u = (0.3 * torch.rand(1, 3, 6, 6, 6, dtype=F64) - 0.15).requires_grad_(True)

    def tight_inverse(field: torch.Tensor) -> torch.Tensor:
        return fields.invert(field, tolerance=1e-12, max_iterations=300, backward_tolerance=1e-12, backward_max_iterations=300)

    assert torch.autograd.gradcheck(tight_inverse, (u,), fast_mode=True, atol=1e-6, rtol=1e-4)


def test_invert_gradient_matches_unrolled_iteration(device):
    # Implicit differentiation must agree with backpropagating through many plain iterations.
    torch.manual_seed(4)
    u = (0.4 * torch.rand(2, 3, 7, 6, 5, dtype=F64, device=device) - 0.2).requires_grad_(True)
    weights = torch.randn(2, 3, 7, 6, 5, dtype=F64, device=device)
    w = fields.invert(u, tolerance=1e-12, max_iterations=300, backward_tolerance=1e-12, backward_max_iterations=300)
    (implicit,) = torch.autograd.grad((w * weights).sum(), u)
    unrolled = -u
    for _ in range(80):
        unrolled = -fields.warp(u, unrolled)
    (explicit,) = torch.autograd.grad((unrolled * weights).sum(), u)
    torch.testing.assert_close(implicit, explicit, rtol=1e-8, atol=1e-9)
    # the autograd graph holds one node for the whole solve, not one per iteration
    assert "Invert" in type(w.grad_fn).__name__


# ----------------------------------------------------------------------------- Jacobians and NDV


def test_jacobian_determinant_of_a_linear_map(device):
    matrix = np.array([[1.2, 0.3, -0.1], [0.05, 0.9, 0.2], [-0.2, 0.1, 1.1]])
    u = linear_field(matrix, (7, 8, 9), (3.0, 3.5, 4.0), device, translation=(0.4, -1.0, 2.0))
    det = fields.jacobian_determinant(u)
    assert det.shape == (1, 7, 8, 9)
    # one-sided border differences are exact on linear fields too
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(matrix))), rtol=0, atol=1e-12)


@pytest.mark.parametrize("determinant_sign", [1.0, -1.0])
def test_ndv_of_linear_maps_is_minus_det_when_orientation_reverses(device, determinant_sign):
    matrix = np.array([[0.5 * determinant_sign, 0.2, 0.0], [0.1, 1.1, 0.3], [0.0, -0.2, 0.9]])
    det = float(np.linalg.det(matrix))
    assert np.sign(det) == determinant_sign
    u = linear_field(matrix, (8, 8, 8), (3.5, 3.5, 3.5), device)
    ndv_map = fields.non_diffeomorphic_volume_map(u)
    # inside: 8 corner tetrahedra of volume |det|/6 and 2 central ones of 2|det|/6, counted twice
    expected_inside = max(-det, 0.0)
    torch.testing.assert_close(interior(ndv_map, 1), torch.full_like(interior(ndv_map, 1), expected_inside), rtol=0, atol=1e-12)
    mask = torch.zeros(1, 8, 8, 8, device=device)
    mask[..., 1:-1, 1:-1, 1:-1] = 1
    result = fields.non_diffeomorphic_volume(u, mask=mask)
    torch.testing.assert_close(result.volume_voxels, torch.tensor([expected_inside * 6**3], dtype=F64, device=device))
    torch.testing.assert_close(result.fraction, torch.tensor([expected_inside], dtype=F64, device=device))


def gaussian_bump(shape, amplitude: float, sigma: float, device) -> torch.Tensor:
    grid = fields.identity_grid(shape, device=device, dtype=F64)
    centre = grid.new_tensor([(s - 1) / 2 for s in shape]).view(1, 3, 1, 1, 1)
    bump = torch.exp(-((grid - centre) ** 2).sum(dim=1) / (2 * sigma**2))
    u = torch.zeros(1, 3, *shape, dtype=F64, device=device)
    u[:, 0] = amplitude * bump
    return u


def test_folding_field_is_detected_and_smooth_field_is_not(device):
    shape = (16, 16, 16)
    # d u0 / d x0 reaches -amplitude / sigma * exp(-1/2): -1.82 folds, -0.30 does not
    folding = gaussian_bump(shape, amplitude=6.0, sigma=2.0, device=device)
    smooth = gaussian_bump(shape, amplitude=1.0, sigma=2.0, device=device)
    det_folding = fields.jacobian_determinant(folding)
    assert det_folding.min() < -0.5
    folded = fields.non_diffeomorphic_volume(folding)
    assert folded.volume_voxels.item() > 1.0
    assert 0.0 < folded.fraction.item() < 0.1
    det_smooth = fields.jacobian_determinant(smooth)
    assert det_smooth.min() > 0.6
    assert fields.non_diffeomorphic_volume(smooth).volume_voxels.item() == 0.0


def test_ndv_sees_a_fold_that_central_differences_miss(device):
    # One voxel pushed 3 voxels along axis 0 over its neighbour: the central difference at that
    # voxel never reads its own value (det = 1 there) but the forward tetrahedra turn over.
    u = torch.zeros(1, 3, 9, 9, 9, dtype=F64, device=device)
    u[0, 0, 4, 4, 4] = 3.0
    assert fields.jacobian_determinant(u)[0, 4, 4, 4].item() == pytest.approx(1.0)
    ndv_map = fields.non_diffeomorphic_volume_map(u)
    assert ndv_map[0, 4, 4, 4].item() > 0
    assert fields.non_diffeomorphic_volume(u).volume_voxels.item() > 0


# ----------------------------------------------------------------------------- consistency and resizing


def test_inverse_consistency_error_in_mm(device):
    shape = (5, 6, 7)
    forward = torch.tensor([2.0, -1.0, 0.5], dtype=F64, device=device).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    miss = torch.tensor([0.5, 0.0, -1.0], dtype=F64, device=device).view(1, 3, 1, 1, 1)
    inverse = -forward + miss
    spacing = (2.0, 1.0, 3.0)
    error = fields.inverse_consistency_error(forward, inverse, spacing)
    expected = math.hypot(0.5 * 2.0, -1.0 * 3.0)
    torch.testing.assert_close(error, torch.full((1, *shape), expected, dtype=F64, device=device))
    torch.testing.assert_close(
        fields.inverse_consistency_error(forward, -forward, spacing), torch.zeros(1, *shape, dtype=F64, device=device)
    )


def test_resize_field_keeps_the_physical_displacement(device):
    # A physical shear along axis 0: alpha * (x0 + 0.5) voxels on any grid of the same field of view.
    alpha = 0.3

    def field_on(n: int) -> torch.Tensor:
        grid = fields.identity_grid((n, 4, 4), device=device, dtype=F64)
        u = torch.zeros(1, 3, n, 4, 4, dtype=F64, device=device)
        u[:, 0] = alpha * (grid[:, 0] + 0.5)
        u[:, 1] = 0.25
        return u

    coarse, fine = field_on(8), field_on(16)
    up = fields.resize_field(coarse, (16, 8, 4))
    new_grid = fields.identity_grid((16, 8, 4), device=device, dtype=F64)
    # inside the outer half voxels (interpolation there clamps to the edge value)
    torch.testing.assert_close(up[:, 0, 1:-1], alpha * (new_grid[:, 0, 1:-1] + 0.5), rtol=0, atol=1e-12)
    # a constant 0.25 voxel along axis 1 is 0.5 voxel on a twice finer axis 1
    torch.testing.assert_close(up[:, 1], torch.full_like(up[:, 1], 0.5), rtol=0, atol=1e-12)
    assert torch.all(up[:, 2] == 0)
    # shrinking by 2 samples the fine grid between its voxels: exact everywhere for linear fields
    down = fields.resize_field(fine, (8, 4, 4))
    torch.testing.assert_close(down, coarse, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- input checking


def test_contract_violations_raise_value_error_and_thin_fields_input_error():
    """Wrong shapes and modes are a caller's bug (ValueError); a 1-voxel-thick field, which a
    user's file can hold, is bad input (InputError)."""
    u = torch.zeros(1, 3, 4, 4, 4)
    for call in (
        lambda: fields.warp(torch.zeros(1, 1, 4, 4, 5), u),
        lambda: fields.compose(u, torch.zeros(1, 2, 4, 4, 4)),
        lambda: fields.warp(torch.zeros(1, 1, 4, 4, 4), u, mode="bicubic"),
        lambda: fields.inverse_consistency_error(u, u, (1.0, 1.0)),
        lambda: fields.invert(u, max_iterations=0),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        assert not isinstance(raised.value, InputError)
    with pytest.raises(InputError):
        fields.jacobian_determinant(torch.zeros(1, 3, 1, 4, 4))


def test_vector_length_is_the_euclidean_norm_of_the_components():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7, generator=g, dtype=torch.float64)
    assert torch.allclose(fields.vector_length(x), torch.linalg.vector_norm(x, dim=1), rtol=1e-14)
    assert torch.allclose(fields.vector_length(x.movedim(1, -1), dim=-1), torch.linalg.vector_norm(x, dim=1), rtol=1e-14)
