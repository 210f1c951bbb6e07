"""Transform files round-trip and agree with SimpleITK's own reading and resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import random_rotation

from diffusionreg.errors import InputError
from diffusionreg.image import Image, centred_grid, resample
from diffusionreg.transforms import (
    AffineTransform,
    CompositeTransform,
    DisplacementFieldTransform,
    compose,
    read_transform,
    read_transforms,
    to_displacement_field,
    to_sitk_transform,
    write_transform,
)


def _random_affine(seed: int) -> AffineTransform:
    rng = np.random.default_rng(seed)
    matrix = np.eye(4)
    matrix[:3, :3] = random_rotation(rng, 30) @ np.diag(rng.uniform(0.85, 1.15, 3))
    matrix[:3, 3] = rng.uniform(-20, 20, 3)
    return AffineTransform(matrix)


def _smooth_field(seed: int) -> DisplacementFieldTransform:
    rng = np.random.default_rng(seed)
    grid = centred_grid((14, 12, 10), (3.0, 2.5, 4.0), (5.0, -3.0, 2.0), random_rotation(rng, 25))
    centres = grid.voxel_centres_world()
    displacement = np.stack(
        [3.0 * np.sin(centres[..., 1] / 9.0), 2.0 * np.cos(centres[..., 2] / 11.0), 1.5 * np.sin(centres[..., 0] / 7.0)], -1
    )
    return DisplacementFieldTransform(Image(displacement, grid.affine))


def _sitk_map(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


@pytest.mark.parametrize("suffix", [".h5", ".tfm", ".txt"])
def test_affine_file_round_trip_matches_simpleitk(tmp_path: Path, suffix: str) -> None:
    transform = _random_affine(1)
    path = write_transform(transform, tmp_path / f"affine{suffix}")
    points = np.random.default_rng(0).uniform(-100, 100, (20, 3))
    np.testing.assert_allclose(_sitk_map(sitk.ReadTransform(str(path)), points), transform.map_points(points), atol=1e-9)
    np.testing.assert_allclose(read_transform(path).matrix, transform.matrix, atol=1e-12)


def test_reads_centred_rigid_and_composite_files(tmp_path: Path) -> None:
    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.2, -0.1, 0.3, (1.0, 2.0, -4.0))
    scaled = sitk.AffineTransform(3)
    scaled.SetMatrix((1.1, 0.0, 0.05, 0.0, 0.95, 0.0, 0.0, 0.1, 1.0))
    scaled.SetCenter((4.0, 5.0, 6.0))
    composite = sitk.CompositeTransform([euler, scaled])
    path = tmp_path / "composite.h5"
    sitk.WriteTransform(composite, str(path))
    points = np.random.default_rng(1).uniform(-80, 80, (15, 3))
    ours = read_transform(path)
    np.testing.assert_allclose(ours.map_points(points), _sitk_map(sitk.ReadTransform(str(path)), points), atol=1e-9)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".h5"])
def test_displacement_field_files_match_simpleitk(tmp_path: Path, suffix: str) -> None:
    transform = _smooth_field(2)
    path = write_transform(transform, tmp_path / f"field{suffix}")
    if suffix == ".h5":
        itk_transform = sitk.ReadTransform(str(path))
    else:
        itk_transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    grid = transform.grid
    rng = np.random.default_rng(3)
    # Points strictly inside the field (ITK's own inside test differs at the very edge).
    index = rng.uniform(0.5, np.asarray(grid.shape) - 1.5, (30, 3))
    points = np.asarray([grid.affine[:3, :3] @ i + grid.affine[:3, 3] for i in index])
    back = read_transform(path)
    assert isinstance(back, DisplacementFieldTransform)
    np.testing.assert_allclose(back.map_points(points), _sitk_map(itk_transform, points), atol=1e-4)
    np.testing.assert_allclose(back.map_points(points), transform.map_points(points), atol=1e-4)


def test_field_is_zero_outside_its_grid() -> None:
    transform = _smooth_field(4)
    far = np.array([[1000.0, 1000.0, 1000.0]])
    np.testing.assert_array_equal(transform.map_points(far), far)


def test_resampling_through_field_and_affine_matches_simpleitk() -> None:
    rng = np.random.default_rng(5)
    moving = Image(
        np.fromfunction(lambda i, j, k: np.sin(i / 4) * np.cos(j / 5) + k / 20.0, (30, 28, 26)).astype(np.float32),
        centred_grid((30, 28, 26), 1.5, (4.0, -2.0, 1.0), random_rotation(rng, 10)).affine,
    )
    reference = centred_grid((16, 15, 14), 2.0, (3.0, -1.0, 0.0), random_rotation(rng, 10))
    affine, field = _random_affine(6), _smooth_field(7)
    affine.matrix[:3, :3] = random_rotation(rng, 5)
    affine.matrix[:3, 3] = rng.uniform(-2, 2, 3)
    chain = [affine, field]  # field first, then affine: p -> A(p + u(p))
    ours = resample(moving, reference, chain, "linear")
    composite = sitk.CompositeTransform([to_sitk_transform(affine), to_sitk_transform(field)])
    reference_image = Image(np.zeros(reference.shape, np.float32), reference.affine).to_sitk()
    expected = Image.from_sitk(
        sitk.Resample(moving.to_sitk(), reference_image, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    assert np.mean(np.abs(ours.array - expected.array) > 1e-3) < 0.01


def test_compose_order_and_dense_sampling() -> None:
    a, b = _random_affine(8), _random_affine(9)
    points = np.random.default_rng(2).uniform(-50, 50, (10, 3))
    composed = compose([a, b])
    assert isinstance(composed, AffineTransform)
    np.testing.assert_allclose(composed.map_points(points), a.map_points(b.map_points(points)), atol=1e-9)
    field = _smooth_field(10)
    mixed = compose([a, field])
    assert isinstance(mixed, CompositeTransform)
    np.testing.assert_allclose(mixed.map_points(points), a.map_points(field.map_points(points)), atol=1e-9)
    dense = to_displacement_field(a, field.grid)
    centres = field.grid.voxel_centres_world().reshape(-1, 3)
    np.testing.assert_allclose(dense.map_points(centres), a.map_points(centres), atol=1e-9)
    np.testing.assert_allclose(compose([a, a.inverse()]).matrix, np.eye(4), atol=1e-12)


def test_read_transforms_of_files_composes_in_documented_order(tmp_path: Path) -> None:
    a, b = _random_affine(11), _random_affine(12)
    pa, pb = write_transform(a, tmp_path / "a.tfm"), write_transform(b, tmp_path / "b.h5")
    chain = read_transforms([pa, pb])
    np.testing.assert_allclose(chain.matrix, a.matrix @ b.matrix, atol=1e-9)


def test_bad_transform_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_transform(tmp_path / "missing.h5")
    junk = tmp_path / "junk.tfm"
    junk.write_text("this is not a transform\n")
    with pytest.raises(InputError, match="cannot read transform"):
        read_transform(junk)
    # A writer called with a name it cannot write is a caller's bug (the command line checks
    # output names before any work), so a plain ValueError rather than bad input.
    with pytest.raises(ValueError, match="unsupported") as raised:
        write_transform(_random_affine(1), tmp_path / "affine.json")
    assert not isinstance(raised.value, InputError)
    scalar = tmp_path / "scalar.nii.gz"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkFloat32), str(scalar))
    with pytest.raises(InputError, match="3 components"):
        read_transform(scalar)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.tfm", "scalar.nii.gz"]
