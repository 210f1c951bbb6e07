"""Backend transform files loaded by Slicer's transform storage node map points as SimpleITK does.

An ITK transform file maps fixed LPS points to moving LPS points. Loaded with
``DiffusionRegCoreLib.mrml_io.importTransform`` (vtkMRMLTransformStorageNode underneath),
the node's "transform from parent" must map the same points, in RAS, to the same place as
SimpleITK and as the backend's own ``map_points`` (within 1e-4 mm), oblique geometry included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from diffusionreg.image import Image
from diffusionreg.transforms import (
    AffineTransform,
    DisplacementFieldTransform,
    read_transform,
    write_transform,
)

from .conftest import points_inside, sitk_map_points

pytestmark = pytest.mark.mrml

TOLERANCE_MM = 1e-4


@pytest.fixture(scope="module")
def oblique_matrix() -> np.ndarray:
    """Fixed -> moving LPS affine: rotation, anisotropic scale, shear and translation."""
    from scipy.spatial.transform import Rotation

    linear = Rotation.from_euler("zyx", [12.0, -8.0, 21.0], degrees=True).as_matrix() @ np.array(
        [[1.08, 0.05, 0.0], [0.0, 0.93, -0.04], [0.02, 0.0, 1.11]]
    )
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = [7.5, -12.0, 4.25]
    return matrix


@pytest.fixture(scope="module")
def smooth_field(oblique_affine) -> DisplacementFieldTransform:
    """A realistic displacement field: smooth, up to ~6 mm, on an oblique anisotropic grid."""
    rng = np.random.default_rng(7)
    shape = (22, 26, 12)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 3.0, mode="nearest") for _ in range(3)], -1)
    field *= 6.0 / np.abs(field).max()
    return DisplacementFieldTransform(Image(field.astype(np.float64), oblique_affine))


@pytest.mark.parametrize("suffix", [".h5", ".tfm", ".txt"])
def test_affine_file_maps_points_like_simpleitk(tmp_path: Path, scene, mrml_io, oblique_matrix, suffix) -> None:
    path = write_transform(AffineTransform(oblique_matrix), tmp_path / f"affine{suffix}")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")

    node = mrml_io.importTransform(path, scene, movingNode=moving, fixedNode=fixed)

    assert node.GetClassName() == "vtkMRMLTransformNode"  # current class; Linear/Grid are deprecated aliases
    assert node.IsLinear()
    points = np.random.default_rng(1).uniform(-120.0, 120.0, (40, 3))
    expected = sitk_map_points(path, points)
    np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), expected, atol=TOLERANCE_MM, rtol=0)
    np.testing.assert_allclose(AffineTransform(oblique_matrix).map_points(points), expected, atol=TOLERANCE_MM, rtol=0)
    np.testing.assert_allclose(mrml_io.lpsMatrixFromTransformNode(node), oblique_matrix, atol=1e-9)
    movingRef, fixedRef = mrml_io.registrationReferences(node)
    assert movingRef.GetID() == moving.GetID() and fixedRef.GetID() == fixed.GetID()
    assert node.GetNodeReferenceID("spatialRegistrationMoving") == moving.GetID()


def test_affine_import_into_existing_node_replaces_its_content(tmp_path: Path, scene, mrml_io, oblique_matrix) -> None:
    """Re-running into the same output node (a user-selected node, even a grid one) replaces it."""
    first = write_transform(AffineTransform(np.eye(4)), tmp_path / "first.h5")
    second = write_transform(AffineTransform(oblique_matrix), tmp_path / "second.tfm")
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "output")
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "unrelated parent")
    node.SetAndObserveTransformNodeID(parent.GetID())
    assert mrml_io.importTransform(first, scene, node) is node
    assert mrml_io.importTransform(second, scene, node) is node
    assert node.GetParentTransformNode() is None  # the file maps world to world
    points = np.random.default_rng(2).uniform(-50.0, 50.0, (10, 3))
    np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), sitk_map_points(second, points), atol=TOLERANCE_MM, rtol=0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".h5"])
def test_displacement_field_maps_points_like_simpleitk(tmp_path: Path, scene, mrml_io, smooth_field, suffix) -> None:
    path = write_transform(smooth_field, tmp_path / f"field{suffix}")

    node = mrml_io.importTransform(path, scene)

    assert node.GetClassName() == "vtkMRMLTransformNode"
    assert not node.IsLinear()
    fromParent = node.GetTransformFromParent()
    assert fromParent.GetClassName() == "vtkOrientedGridTransform"
    assert not fromParent.GetInverseFlag(), "the field must be stored 'from parent' (resampling convention)"
    assert fromParent.GetInterpolationMode() == 1  # VTK_LINEAR_INTERPOLATION, as ITK
    points = points_inside(smooth_field.field.affine, smooth_field.field.shape, 60, seed=3)
    expected = sitk_map_points(path, points)
    np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), expected, atol=TOLERANCE_MM, rtol=0)
    # The backend's own interpolation agrees too (the file is float32 for vector images).
    backend = read_transform(path).map_points(points)
    np.testing.assert_allclose(backend, expected, atol=TOLERANCE_MM, rtol=0)


def test_displacement_field_from_array_matches_file(tmp_path: Path, scene, mrml_io, smooth_field) -> None:
    """The numpy route (gridTransformFromDisplacement) equals the storage-node route."""
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "from array")
    mrml_io.setDisplacementField(node, smooth_field.field.array, smooth_field.field.affine)
    path = write_transform(smooth_field, tmp_path / "field.h5")
    fileNode = mrml_io.importTransform(path, scene)
    points = points_inside(smooth_field.field.affine, smooth_field.field.shape, 40, seed=4)
    expected = smooth_field.map_points(points)
    np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), expected, atol=TOLERANCE_MM, rtol=0)
    np.testing.assert_allclose(mrml_io.mapPointsLps(fileNode, points), expected, atol=TOLERANCE_MM, rtol=0)


def test_transform_written_by_slicer_reads_back_in_backend(tmp_path: Path, scene, mrml_io, oblique_matrix, smooth_field) -> None:
    """The other direction: Slicer's storage node writes, the backend and SimpleITK read."""
    linear = mrml_io.importTransform(write_transform(AffineTransform(oblique_matrix), tmp_path / "a.h5"), scene)
    grid = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    mrml_io.setDisplacementField(grid, smooth_field.field.array, smooth_field.field.affine)
    for node, name, points in (
        (linear, "slicer_affine.h5", np.random.default_rng(5).uniform(-80, 80, (20, 3))),
        (grid, "slicer_field.nii.gz", points_inside(smooth_field.field.affine, smooth_field.field.shape, 30, seed=6)),
    ):
        path = mrml_io.exportTransform(node, tmp_path / name)
        expected = mrml_io.mapPointsLps(node, points)
        np.testing.assert_allclose(read_transform(path).map_points(points), expected, atol=TOLERANCE_MM, rtol=0)
        np.testing.assert_allclose(sitk_map_points(path, points), expected, atol=TOLERANCE_MM, rtol=0)


def test_moving_volume_under_result_is_resampled_like_the_backend(
    tmp_path: Path, scene, mrml_io, slicer_core, oblique_matrix
) -> None:
    """Placing the moving volume under the result transform is what resampling does.

    World (fixed) RAS point x shows the moving voxel at local RAS ``T(x)``: the world-to-local
    transform of the moving volume equals the backend map, converted to RAS.
    """
    import vtk

    path = write_transform(AffineTransform(oblique_matrix), tmp_path / "t.h5")
    transformNode = mrml_io.importTransform(path, scene)
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    assert mrml_io.placeMovingUnderResult(moving, transformNode) == []
    worldToLocal = vtk.vtkGeneralTransform()
    slicer_core.vtkMRMLTransformNode.GetTransformBetweenNodes(None, moving.GetParentTransformNode(), worldToLocal)
    flip = np.diag([-1.0, -1.0, 1.0])
    points = np.random.default_rng(8).uniform(-60, 60, (15, 3))
    local = np.array([flip @ np.array(worldToLocal.TransformPoint((flip @ p).tolist())) for p in points])
    np.testing.assert_allclose(local, AffineTransform(oblique_matrix).map_points(points), atol=TOLERANCE_MM, rtol=0)
