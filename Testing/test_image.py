"""Image geometry against SimpleITK and nibabel on real volumes, resampling, bad inputs."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import random_rotation
from scipy import ndimage

from diffusionreg.errors import InputError
from diffusionreg.image import (
    Grid,
    Image,
    centred_grid,
    crop_or_pad,
    nearest_axis_direction,
    read_image,
    require_same_grid,
    resample,
    resize,
    write_image,
)
from diffusionreg.spaces import (
    LPS_FROM_RAS,
    apply_affine,
    normalized_from_world_transform,
    voxel_to_normalized,
    world_transform_from_normalized,
)

# Files with different orientations (nibabel codes): LIA, LAS, RAS-like, LPS.
NIFTI_CASES = [
    "brain/vxm_test_scan_T1.nii.gz",
    "brain/mni152_T1_1mm.nii.gz",
    "headct/scct_unsmooth_SS_0.01_1mm_HU.nii.gz",
    "lung/vessels_val_cc_by/case_114_1.nii.gz",
    "lung/vessels_val_cc_by/case_054_1.nii.gz",
    "headct/cthead_unc_cadaver_256x256x113.nii.gz",
]


@pytest.mark.parametrize("relative", NIFTI_CASES)
def test_nifti_geometry_matches_nibabel(shared_data: Path, relative: str) -> None:
    path = shared_data / relative
    image = read_image(path)
    reference = nib.load(str(path))
    # nibabel gives voxel -> RAS; ours is voxel -> LPS.
    np.testing.assert_allclose(image.affine, LPS_FROM_RAS @ reference.affine, atol=1e-4)
    np.testing.assert_array_equal(image.array, np.asanyarray(reference.dataobj))
    assert image.array.shape == reference.shape


def test_mha_geometry_matches_simpleitk(shared_data: Path) -> None:
    path = shared_data / "lung/elastix_lung/3DCT_lung_baseline_small.mha"
    image = read_image(path)
    reference = sitk.ReadImage(str(path))
    index = (5, 17, 33)
    expected = np.asarray(reference.TransformIndexToPhysicalPoint(index))
    np.testing.assert_allclose(apply_affine(image.affine, np.asarray(index, float)), expected, atol=1e-9)
    assert image.array[index] == reference[index]


def test_tilted_uneven_dicom_series_is_placed_exactly(shared_data: Path) -> None:
    """Gantry tilt 18.5 deg and two slice thicknesses: every acquired pixel lands where DICOM says."""
    folder = shared_data / "headct/ge_hispeed_head_tilt_dicom"
    image = read_image(folder)
    direction = image.grid.direction
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # regularised: orthonormal
    rng = np.random.default_rng(0)
    files = sorted(folder.glob("*.dcm"))
    differences, naive_differences = [], []
    naive = Image.from_sitk(sitk.ReadImage([str(f) for f in files]))  # what a uniform-grid reader gives
    for name in (files[2], files[9], files[20], files[26]):
        acquired = sitk.ReadImage(str(name))
        pixels = sitk.GetArrayFromImage(acquired)[0].T.astype(np.float64)  # [i, j]
        index = np.stack([rng.integers(150, 360, 400), rng.integers(150, 360, 400), np.zeros(400)], -1).astype(float)
        world = np.array([acquired.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])
        expected = pixels[index[:, 0].astype(int), index[:, 1].astype(int)]
        for target, store in ((image, differences), (naive, naive_differences)):
            continuous = apply_affine(np.linalg.inv(target.affine), world)
            values = ndimage.map_coordinates(target.array.astype(np.float64), continuous.T, order=1, cval=np.nan)
            store.append(np.abs(values - expected))
    ours, naive_error = np.concatenate(differences), np.concatenate(naive_differences)
    assert np.nanmedian(ours) < 5.0, np.nanmedian(ours)  # HU; only sub-pixel interpolation remains
    assert np.nanmedian(naive_error) > 3 * np.nanmedian(ours)  # the naive stack is visibly wrong
    assert image.shape[2] > 28  # the 7 mm block is resampled at the 4 mm step


def _oblique_image(rng: np.random.Generator) -> Image:
    rotation = random_rotation(rng, 35.0)
    linear = rotation @ np.diag([0.9, 1.3, 2.1])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = [-40.0, 12.5, 7.25]
    array = rng.normal(size=(17, 13, 11)).astype(np.float32)
    return Image(array, affine)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_oblique_round_trip(tmp_path: Path, suffix: str) -> None:
    image = _oblique_image(np.random.default_rng(3))
    path = write_image(image, tmp_path / f"oblique{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-5)
    if suffix.startswith(".nii"):
        np.testing.assert_allclose(LPS_FROM_RAS @ nib.load(str(path)).affine, image.affine, atol=1e-4)
    sitk_image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(
        sitk_image.TransformIndexToPhysicalPoint((3, 4, 5)), apply_affine(image.affine, np.array([3.0, 4.0, 5.0])), atol=1e-4
    )


def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    image = _oblique_image(np.random.default_rng(0))
    write_image(image, tmp_path / "out.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]


def _downsampled(path: Path, spacing: float) -> Image:
    image = read_image(path)
    grid = centred_grid(
        np.ceil(np.asarray(image.shape) * image.spacing / spacing).astype(int),
        spacing,
        image.grid.centre_world(),
        image.grid.direction,
    )
    return resample(image, grid)


@pytest.mark.parametrize(
    "interpolation, sitk_interpolator, tolerance",
    [("linear", sitk.sitkLinear, 1e-3), ("nearest", sitk.sitkNearestNeighbor, 0.0), ("bspline", sitk.sitkBSpline, 2e-2)],
)
def test_resample_matches_simpleitk(shared_data: Path, interpolation, sitk_interpolator, tolerance) -> None:
    moving = _downsampled(shared_data / "brain/mni152_T1_1mm.nii.gz", 3.0)
    moving.array = moving.array / moving.array.max()
    rng = np.random.default_rng(7)
    reference = centred_grid((40, 44, 38), (3.5, 3.2, 4.0), moving.grid.centre_world() + 5.0, random_rotation(rng, 20))
    transform = np.eye(4)
    transform[:3, :3] = random_rotation(rng, 15) * 1.05
    transform[:3, 3] = [4.0, -3.0, 6.0]
    ours = resample(moving, reference, transform, interpolation)

    itk_transform = sitk.AffineTransform(3)
    itk_transform.SetMatrix(transform[:3, :3].ravel().tolist())
    itk_transform.SetTranslation(transform[:3, 3].tolist())
    reference_image = Image(np.zeros(reference.shape, np.float32), reference.affine).to_sitk()
    expected = Image.from_sitk(
        sitk.Resample(moving.to_sitk(), reference_image, itk_transform, sitk_interpolator, 0.0, sitk.sitkFloat32)
    ).array
    difference = np.abs(ours.array - expected)
    if interpolation == "bspline":
        # ITK and scipy handle the spline's boundary differently; compare away from it.
        assert np.median(difference) < tolerance
    else:
        assert np.mean(difference > tolerance + 1e-6) < 1e-3, difference.max()


def test_network_matrix_becomes_exact_world_transform() -> None:
    """A matrix applied by torch's affine_grid on network grids equals our world resampling."""
    rng = np.random.default_rng(11)
    moving = Image(
        np.fromfunction(lambda i, j, k: np.sin(i / 3.0) + np.cos(j / 4.0) * np.sin(k / 5.0), (20, 24, 18)).astype(np.float32),
        centred_grid((20, 24, 18), (2.0, 1.5, 2.5), (3.0, -2.0, 1.0), random_rotation(rng, 30)).affine,
    )
    fixed_grid = centred_grid((16, 22, 19), (2.2, 1.7, 2.0), (0.0, 1.0, -1.0), random_rotation(rng, 30))
    theta = np.eye(4)[:3] + rng.normal(scale=0.05, size=(3, 4))

    grid = F.affine_grid(torch.from_numpy(theta)[None], (1, 1) + fixed_grid.shape, align_corners=False)
    torch_result = F.grid_sample(torch.from_numpy(moving.array)[None, None].double(), grid, align_corners=False)[0, 0]
    world = world_transform_from_normalized(theta, fixed_grid.affine, fixed_grid.shape, moving.affine, moving.shape)
    ours = resample(moving, fixed_grid, world, "linear")
    interior = (slice(3, -3),) * 3
    np.testing.assert_allclose(ours.array[interior], torch_result.numpy()[interior], atol=1e-4)
    np.testing.assert_allclose(
        normalized_from_world_transform(world, fixed_grid.affine, fixed_grid.shape, moving.affine, moving.shape),
        theta,
        atol=1e-12,
    )


def test_voxel_to_normalized_conventions() -> None:
    shape = (4, 6, 8)
    matrix = voxel_to_normalized(shape, align_corners=False)
    # The first voxel centre of axis k (x) sits half a voxel inside -1.
    np.testing.assert_allclose(apply_affine(matrix, np.zeros(3)), [-1 + 1 / 8, -1 + 1 / 6, -1 + 1 / 4])
    corners = voxel_to_normalized(shape, align_corners=True)
    np.testing.assert_allclose(apply_affine(corners, np.array([3.0, 5.0, 7.0])), [1.0, 1.0, 1.0])


def test_crop_or_pad_keeps_world_positions() -> None:
    image = _oblique_image(np.random.default_rng(5))
    cropped = crop_or_pad(image, (-2, 3, 1), (10, 8, 14), fill=-1.0)
    # Voxel (5, 2, 4) of the crop is voxel (3, 5, 5) of the source, at the same world point.
    np.testing.assert_allclose(
        apply_affine(cropped.affine, np.array([5.0, 2.0, 4.0])), apply_affine(image.affine, np.array([3.0, 5.0, 5.0]))
    )
    assert cropped.array[5, 2, 4] == image.array[3, 5, 5]
    assert cropped.array[0, 0, 0] == -1.0
    back = resample(image, cropped.grid, None, "nearest")
    inside = cropped.array != -1.0
    np.testing.assert_array_equal(back.array[inside], cropped.array[inside])


def test_resize_keeps_field_of_view_like_torch_interpolate() -> None:
    image = _oblique_image(np.random.default_rng(6))
    resized = resize(image, (8, 9, 7))
    corner_old = apply_affine(image.affine, np.array([-0.5, -0.5, -0.5]))
    corner_new = apply_affine(resized.affine, np.array([-0.5, -0.5, -0.5]))
    far_old = apply_affine(image.affine, np.asarray(image.shape) - 0.5)
    far_new = apply_affine(resized.affine, np.asarray(resized.shape) - 0.5)
    np.testing.assert_allclose(corner_new, corner_old, atol=1e-9)
    np.testing.assert_allclose(far_new, far_old, atol=1e-9)
    expected = F.interpolate(
        torch.from_numpy(image.array)[None, None].double(), size=(8, 9, 7), mode="trilinear", align_corners=False
    )
    np.testing.assert_allclose(resized.array, expected[0, 0].numpy(), atol=1e-5)


def test_nearest_axis_direction_is_signed_permutation() -> None:
    direction = random_rotation(np.random.default_rng(2), 20) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    result = nearest_axis_direction(direction)
    assert sorted(np.abs(result).sum(0).tolist()) == [1, 1, 1]
    assert np.all(np.sign(result[result != 0]) == np.sign(direction[result != 0]))


# --- bad inputs ---------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.nii.gz", what="fixed image")


def test_corrupted_gzip(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    write_image(_oblique_image(np.random.default_rng(1)), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read"):
        read_image(bad)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not an image at all" * 10))
    with pytest.raises(InputError, match="cannot read"):
        read_image(garbage)


def test_2d_image_rejected(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.float32)), str(path))
    with pytest.raises(InputError, match="3D"):
        read_image(path)


def test_nan_rejected(tmp_path: Path) -> None:
    image = _oblique_image(np.random.default_rng(4))
    image.array[2, 3, 4] = np.nan
    path = write_image(image, tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="NaN"):
        read_image(path)
    assert np.isnan(read_image(path, allow_nan=True).array[2, 3, 4])


def test_mismatched_grids_rejected() -> None:
    a = _oblique_image(np.random.default_rng(4))
    b = Image(a.array.copy(), a.affine @ np.diag([1.0, 1.0, 1.01, 1.0]))
    with pytest.raises(InputError, match="different grids"):
        require_same_grid(a, b, "image", "labels")
    require_same_grid(a, Image(a.array.copy(), a.affine.copy()), "image", "labels")


def test_grid_validates_shape() -> None:
    with pytest.raises(ValueError):
        Image(np.zeros((4, 4)), np.eye(4))
    assert Grid((2, 3, 4), np.eye(4)).shape == (2, 3, 4)


def _write_dicom_series(folder: Path, volume: np.ndarray, affine: np.ndarray, keep: list[int]) -> None:
    """Write slices ``keep`` of ``volume`` ([i, j, k], int16) as a DICOM series with IPP/IOP tags."""
    folder.mkdir()
    row, column = affine[:3, 0] / np.linalg.norm(affine[:3, 0]), affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for number, k in enumerate(keep):
        image = sitk.GetImageFromArray(volume[:, :, k].T[None].astype(np.int16))
        position = affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]
        image.SetSpacing((float(spacing[0]), float(spacing[1]), float(spacing[2])))
        image.SetOrigin(tuple(position))
        image.SetDirection(tuple(np.stack([row, column, np.cross(row, column)], 1).ravel()))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0013": str(number + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([row, column])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{number + 1}",
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{number:03d}.dcm"))
        writer.Execute(image)


def test_synthetic_dicom_series_uniform_and_with_missing_slice(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    rotation = random_rotation(rng, 25)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-30.0, 20.0, 15.0]
    volume = rng.integers(-1000, 1000, size=(12, 10, 8)).astype(np.int16)

    _write_dicom_series(tmp_path / "uniform", volume, affine, list(range(8)))
    uniform = read_image(tmp_path / "uniform")
    np.testing.assert_allclose(uniform.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(uniform.array, volume)

    _write_dicom_series(tmp_path / "gap", volume, affine, [0, 1, 2, 4, 5, 6, 7])  # slice 3 missing
    gapped = read_image(tmp_path / "gap")
    np.testing.assert_allclose(gapped.affine, affine, atol=1e-4)
    for k in (0, 1, 2, 4, 7):  # acquired slices come back exactly, at their own positions
        np.testing.assert_allclose(gapped.array[:, :, k], volume[:, :, k], atol=1e-3)
    np.testing.assert_allclose(gapped.array[:, :, 3], (volume[:, :, 2] + volume[:, :, 4].astype(float)) / 2, atol=1e-3)
