"""The coordinate-space type: every pair of named spaces against the closed forms, and its samplers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusionreg import fields
from diffusionreg.image import Image, centred_grid, resample
from diffusionreg.spaces import (
    apply_affine,
    centred_space,
    coordinates,
    rescale_displacement,
    rotation_about_axis,
    sample,
    sample_affine,
    space_of_grid,
    torch_space,
    voxel_space,
    world_space,
)

# Two grids with oblique axes and anisotropic spacing, so that every conversion term matters.
GRID_A = centred_grid((7, 10, 13), (2.0, 1.5, 1.2), (3.0, -2.0, 5.0), rotation_about_axis((1.0, 2.0, 0.5), 25.0))
GRID_B = centred_grid((12, 9, 6), (1.1, 2.3, 3.0), (-1.0, 4.0, 0.0), rotation_about_axis((0.0, 1.0, 1.0), -40.0))

# Closed forms of each kind: voxel index (N, 3) -> coordinates (N, 3), written out independently
# of diffusionreg.spaces (the formulas of docs/conventions.md, torch's documentation and SITReg).
CLOSED_FORMS = {
    "voxel": lambda index, shape, affine: index,
    "world": lambda index, shape, affine: apply_affine(affine, index),
    "torch": lambda index, shape, affine: ((2.0 * index + 1.0) / np.asarray(shape) - 1.0)[:, ::-1],
    "torch_corners": lambda index, shape, affine: (2.0 * index / (np.asarray(shape) - 1.0) - 1.0)[:, ::-1],
    "torch_ijk": lambda index, shape, affine: (2.0 * index + 1.0) / np.asarray(shape) - 1.0,
    "centred": lambda index, shape, affine: (index - (np.asarray(shape) - 1.0) / 2.0) * 2.0 / max(shape),
}
FACTORIES = {
    "voxel": lambda grid: voxel_space(grid.shape, grid.affine),
    "world": lambda grid: world_space(grid.shape, grid.affine),
    "torch": lambda grid: torch_space(grid.shape, affine=grid.affine),
    "torch_corners": lambda grid: torch_space(grid.shape, align_corners=True, affine=grid.affine),
    "torch_ijk": lambda grid: torch_space(grid.shape, affine=grid.affine, components="ijk"),
    "centred": lambda grid: centred_space(grid.shape, grid.affine),
}
SPACES = [(kind, name) for kind in CLOSED_FORMS for name in ("A", "B")]
GRIDS = {"A": GRID_A, "B": GRID_B}


def closed_form(kind: str, grid, world_points: np.ndarray) -> np.ndarray:
    index = apply_affine(np.linalg.inv(grid.affine), world_points)
    return CLOSED_FORMS[kind](index, grid.shape, grid.affine)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(SPACES, SPACES)))
def test_every_pair_of_spaces_matches_the_closed_forms(source, target) -> None:
    """``matrix_to`` carries a point's coordinates in one space to its coordinates in the other,
    on the same grid or across grids (through LPS), for points inside and outside the grids."""
    world_points = np.random.default_rng(3).uniform(-25.0, 25.0, size=(40, 3))
    (source_kind, source_grid), (target_kind, target_grid) = source, target
    source_space = FACTORIES[source_kind](GRIDS[source_grid])
    target_space = FACTORIES[target_kind](GRIDS[target_grid])
    mapped = apply_affine(source_space.matrix_to(target_space), closed_form(source_kind, GRIDS[source_grid], world_points))
    np.testing.assert_allclose(mapped, closed_form(target_kind, GRIDS[target_grid], world_points), atol=1e-9)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(SPACES, SPACES)))
def test_rescaled_displacements_join_the_mapped_points(source, target) -> None:
    """A displacement ``d`` at ``p`` in one space becomes ``M(p + d) - M(p)`` in the other."""
    rng = np.random.default_rng(5)
    source_space = FACTORIES[source[0]](GRIDS[source[1]])
    target_space = FACTORIES[target[0]](GRIDS[target[1]])
    matrix = source_space.matrix_to(target_space)
    points = rng.normal(size=(20, 3))
    displacements = rng.normal(size=(20, 3))
    expected = apply_affine(matrix, points + displacements) - apply_affine(matrix, points)
    tensor = torch.from_numpy(displacements.T.copy())[None]  # (1, 3, N)
    ours = rescale_displacement(tensor, source_space, target_space)[0].T.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-9)


@pytest.mark.parametrize("align_corners", [False, True])
def test_torch_spaces_are_what_affine_grid_produces(align_corners) -> None:
    """The identity ``affine_grid`` holds the torch-space coordinates of every voxel centre."""
    shape = (5, 7, 4)
    expected = F.affine_grid(torch.eye(3, 4, dtype=torch.float64)[None], [1, 1, *shape], align_corners=align_corners)
    ours = coordinates(torch_space(shape, align_corners), dtype=torch.float64)
    torch.testing.assert_close(ours.movedim(1, -1), expected)
    torch.testing.assert_close(
        coordinates(voxel_space(shape), dtype=torch.float64), fields.identity_grid(shape, dtype=torch.float64)
    )


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_coordinates_of_every_voxel_in_any_space(kind) -> None:
    """``coordinates`` gives each voxel centre of a grid in any space (here of the same grid)."""
    index = fields.identity_grid(GRID_A.shape, dtype=torch.float64)[0].reshape(3, -1).T.numpy()
    ours = coordinates(voxel_space(GRID_A.shape, GRID_A.affine), FACTORIES[kind](GRID_A), dtype=torch.float64)
    expected = CLOSED_FORMS[kind](index, GRID_A.shape, GRID_A.affine)
    np.testing.assert_allclose(ours[0].reshape(3, -1).T.numpy(), expected, atol=1e-9)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_sample_reads_positions_in_any_space_of_the_volume_grid(kind) -> None:
    """A linear volume sampled at positions given in any space returns the linear function there."""
    grid = GRID_A
    weights = np.array([0.3, -1.2, 0.7])
    index = fields.identity_grid(grid.shape, dtype=torch.float64)[0].permute(1, 2, 3, 0).numpy()
    volume = torch.from_numpy(index @ weights + 2.0)[None, None]
    rng = np.random.default_rng(7)
    query_index = rng.uniform(0.0, np.asarray(grid.shape) - 1.0, size=(30, 3))
    positions = CLOSED_FORMS[kind](query_index, grid.shape, grid.affine)
    values = sample(volume, torch.from_numpy(np.ascontiguousarray(positions.T))[None], FACTORIES[kind](grid))
    np.testing.assert_allclose(values[0, 0].numpy(), query_index @ weights + 2.0, atol=1e-9)


def test_sample_padding_modes() -> None:
    """``border`` repeats the edge value; ``zeros`` reads 0 a full voxel beyond the grid."""
    volume = torch.arange(4.0, dtype=torch.float64).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2).contiguous()
    positions = torch.tensor([[[-1.0, 5.0], [0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(sample(volume, positions)[0, 0], torch.tensor([0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(
        sample(volume, positions, padding_mode="zeros")[0, 0], torch.tensor([0.0, 0.0], dtype=torch.float64)
    )


def test_sample_affine_between_world_spaces_equals_world_resampling() -> None:
    """A world point map applied by ``sample_affine`` equals :func:`diffusionreg.image.resample`."""
    moving = Image(
        np.fromfunction(lambda i, j, k: np.sin(i / 3.0) + np.cos(j / 4.0) * np.sin(k / 5.0), GRID_B.shape).astype(np.float32),
        GRID_B.affine,
    )
    transform = np.eye(4)
    transform[:3, :3] = rotation_about_axis((0.2, 1.0, 0.3), 8.0)
    transform[:3, 3] = (1.0, -0.5, 2.0)
    ours = sample_affine(
        torch.from_numpy(moving.array)[None, None].double(),
        torch.from_numpy(transform)[None],
        space_of_grid(GRID_A),
        space_of_grid(GRID_B),
    )[0, 0].numpy()
    expected = resample(moving, GRID_A, transform, "linear", default=0.0).array
    # Compare where the mapped point lies inside the moving grid (the two differ in how they fade out).
    index = fields.identity_grid(GRID_A.shape, dtype=torch.float64)[0].permute(1, 2, 3, 0).numpy()
    mapped = apply_affine(np.linalg.inv(GRID_B.affine) @ transform @ GRID_A.affine, index)
    inside = np.all((mapped >= 0.0) & (mapped <= np.asarray(GRID_B.shape) - 1.0), axis=-1)
    assert inside.sum() > 50
    np.testing.assert_allclose(ours[inside], expected[inside], atol=1e-5)


def test_sample_affine_in_torch_space_is_affine_grid() -> None:
    """With the default torch spaces ``sample_affine`` is exactly ``affine_grid`` + ``grid_sample``."""
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(2, 1, 6, 7, 8, generator=generator)
    theta = torch.eye(3, 4)[None].repeat(2, 1, 1) + 0.1 * torch.randn(2, 3, 4, generator=generator)
    grid = F.affine_grid(theta, [2, 1, 6, 7, 8], align_corners=False)
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.equal(sample_affine(volume, theta, torch_space((6, 7, 8))), expected)


def test_bad_spaces_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        space_of_grid(GRID_A, "torch_corner")
    with pytest.raises(ValueError, match="grid"):
        sample(torch.zeros(1, 1, 3, 3, 3), torch.zeros(1, 3, 2), voxel_space((4, 3, 3)))
