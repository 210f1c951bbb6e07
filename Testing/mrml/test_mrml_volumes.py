"""Volumes cross between MRML nodes and the backend's ``Image`` with exact geometry.

Slicer's IJKToRAS and the backend's ``Image.affine`` (voxel -> LPS) index the same voxels
(i fastest); they differ only by the RAS/LPS flip: ``IJKToRAS = diag(-1, -1, 1, 1) @ affine``.
Reading and writing goes through vtkMRMLVolumeArchetypeStorageNode, as in the modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffusionreg.image import Image, read_image, write_image

pytestmark = pytest.mark.mrml

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def _voxels(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1000, shape).astype(np.float32)


def _volumeNode(scene, mrml_io, array_ijk: np.ndarray, ijkToRas: np.ndarray, name: str):
    """A scalar volume node holding ``array_ijk`` ([i, j, k]) with the given IJKToRAS."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    flat = np.ascontiguousarray(array_ijk.transpose(2, 1, 0)).reshape(-1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(mrml_io.vtkMatrixFromArray(ijkToRas))
    return node


def _arrayIjk(node) -> np.ndarray:
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[::-1]).transpose(2, 1, 0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_backend_image_loads_with_its_geometry(tmp_path: Path, scene, mrml_io, oblique_affine, suffix) -> None:
    array = _voxels((9, 7, 5))
    path = write_image(Image(array, oblique_affine), tmp_path / f"image{suffix}")

    node = mrml_io.importVolume(path, scene, name="loaded")

    assert node.GetName() == "loaded"
    assert node.GetStorageNode() is None  # no link to the (temporary) file
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(node), FLIP @ oblique_affine, atol=1e-5)
    np.testing.assert_allclose(mrml_io.volumeLpsAffine(node), oblique_affine, atol=1e-5)
    np.testing.assert_array_equal(_arrayIjk(node), array)


def test_exported_volume_reads_in_backend_with_its_geometry(tmp_path: Path, scene, mrml_io, oblique_affine) -> None:
    array = _voxels((6, 8, 4), seed=1)
    node = _volumeNode(scene, mrml_io, array, FLIP @ oblique_affine, "exported")

    path = mrml_io.exportVolume(node, tmp_path / "exported.nrrd")

    image = read_image(path)
    np.testing.assert_allclose(image.affine, oblique_affine, atol=1e-5)
    np.testing.assert_array_equal(image.array, array)
    assert node.GetStorageNode() is None  # exporting does not touch the node


def test_export_bakes_linear_parent_transforms_and_stops_at_the_output(tmp_path: Path, scene, mrml_io, oblique_affine) -> None:
    array = _voxels((5, 5, 5), seed=2)
    node = _volumeNode(scene, mrml_io, array, FLIP @ oblique_affine, "moving")
    previous = scene.AddNewNodeByClass("vtkMRMLTransformNode", "previous")
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -2.0, 1.0]
    previous.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(previous.GetID())
    output = scene.AddNewNodeByClass("vtkMRMLTransformNode", "output of an earlier run")
    rotate = np.eye(4)
    rotate[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    output.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(rotate))
    previous.SetAndObserveTransformNodeID(output.GetID())

    world = read_image(mrml_io.exportVolume(node, tmp_path / "world.nrrd"))
    np.testing.assert_allclose(world.affine, FLIP @ rotate @ shift @ FLIP @ oblique_affine, atol=1e-5)
    belowOutput = read_image(mrml_io.exportVolume(node, tmp_path / "below.nrrd", stopAt=output))
    np.testing.assert_allclose(belowOutput.affine, FLIP @ shift @ FLIP @ oblique_affine, atol=1e-5)

    grid = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    mrml_io.setDisplacementField(grid, np.zeros((3, 3, 3, 3)), np.eye(4))
    output.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(mrml_io.GeometryError, match="harden"):
        mrml_io.exportVolume(node, tmp_path / "nonlinear.nrrd")
    mrml_io.exportVolume(node, tmp_path / "fine.nrrd", stopAt=output)  # the warp is above the output


def test_round_trip_node_file_node(tmp_path: Path, scene, mrml_io, oblique_affine) -> None:
    array = _voxels((7, 6, 5), seed=3)
    node = _volumeNode(scene, mrml_io, array, FLIP @ oblique_affine, "source")
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "target")
    loaded = mrml_io.importVolume(mrml_io.exportVolume(node, tmp_path / "v.nrrd"), scene, target)
    assert loaded is target
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(target), mrml_io.volumeIjkToRas(node), atol=1e-6)
    np.testing.assert_array_equal(_arrayIjk(target), array)


def test_shearing_parent_transform_is_refused(tmp_path: Path, scene, mrml_io) -> None:
    """Files hold spacing and orthonormal directions only: a shear must be hardened first."""
    node = _volumeNode(scene, mrml_io, _voxels((4, 4, 4), seed=4), np.eye(4), "sheared")
    shear = np.eye(4)
    shear[0, 1] = 0.3
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "shear")
    parent.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(shear))
    node.SetAndObserveTransformNodeID(parent.GetID())
    with pytest.raises(mrml_io.GeometryError, match="shears"):
        mrml_io.exportVolume(node, tmp_path / "sheared.nrrd")
    assert not (tmp_path / "sheared.nrrd").exists()
    scale = np.diag([2.0, 0.5, 1.5, 1.0])  # scaling keeps the axes orthogonal: exportable
    parent.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(scale))
    image = read_image(mrml_io.exportVolume(node, tmp_path / "scaled.nrrd"))
    np.testing.assert_allclose(image.affine, FLIP @ scale, atol=1e-6)


def test_moving_volume_under_a_shearing_result_is_registered_in_its_own_frame(tmp_path: Path, scene, mrml_io) -> None:
    """A second run with a new output: the first (affine, shearing) result cannot be baked into
    a file, so the moving volume is exported in its own coordinates and then moved directly under
    the new result (the first result stays in the scene)."""
    node = _volumeNode(scene, mrml_io, _voxels((4, 4, 4), seed=5), np.eye(4), "moving")
    first = scene.AddNewNodeByClass("vtkMRMLTransformNode", "first result")
    affine = np.eye(4)
    affine[0, 1] = 0.2
    first.SetMatrixTransformFromParent(mrml_io.vtkMatrixFromArray(affine))
    node.SetAndObserveTransformNodeID(first.GetID())
    world, note = mrml_io.movingVolumeFrame(node)
    assert not world and "own coordinates" in note
    local = read_image(mrml_io.exportVolume(node, tmp_path / "local.nrrd", world=False))
    np.testing.assert_allclose(local.affine, FLIP, atol=1e-6)
    second = scene.AddNewNodeByClass("vtkMRMLTransformNode", "second result")
    notes = mrml_io.placeMovingUnderResult(node, second)
    assert node.GetParentTransformNode().GetID() == second.GetID() and notes
    assert scene.GetNodeByID(first.GetID()) is not None
    # With the first result as the output transform (a re-run into it), nothing is in the way.
    node.SetAndObserveTransformNodeID(first.GetID())
    assert mrml_io.movingVolumeFrame(node, stopAt=first) == (True, "")
