"""The kit's result import (``DiffusionRegCoreLib.results``) on real slicer-core scenes.

Each kind of output the next modules write is produced with the backend's own writers and
loaded through Slicer's storage nodes: displacement fields (forward and inverse) as grid
transforms, a Jacobian map with its colour table, several volumes in one subject-hierarchy
folder, markups from ``.mrk.json`` and a table from CSV.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffusionreg.image import Grid, Image, write_image
from diffusionreg.transforms import (
    AffineTransform,
    to_displacement_field,
    write_transform,
)

from .conftest import points_inside, sitk_map_points

pytestmark = pytest.mark.mrml

TOLERANCE_MM = 1e-4


@pytest.fixture
def results(corelib):
    return corelib.results


def test_forward_and_inverse_fields_become_grid_transforms(tmp_path: Path, scene, mrml_io, results, oblique_affine) -> None:
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("xyz", [4.0, -3.0, 6.0], degrees=True).as_matrix()
    matrix[:3, 3] = [2.0, -1.5, 3.0]
    grid = Grid((20, 18, 16), oblique_affine)
    forwardPath = write_transform(to_displacement_field(AffineTransform(matrix), grid), tmp_path / "forward.nii.gz")
    inversePath = write_transform(to_displacement_field(AffineTransform(np.linalg.inv(matrix)), grid), tmp_path / "inverse.nrrd")
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")

    forward, inverse = results.importDisplacementFields(
        scene, forwardPath, inversePath, movingNode=moving, fixedNode=fixed, name="moving to fixed"
    )

    for node, path in ((forward, forwardPath), (inverse, inversePath)):
        assert node.GetClassName() == "vtkMRMLTransformNode" and not node.IsLinear()
        assert node.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
        points = points_inside(oblique_affine, grid.shape, 30, seed=11, margin=4.0)
        np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), sitk_map_points(path, points), atol=TOLERANCE_MM)
    assert inverse.GetName() == "moving to fixed (inverse)"
    # forward then inverse is the identity (deep inside the grid, where both fields are defined)
    points = points_inside(oblique_affine, grid.shape, 20, seed=12, margin=6.0)
    np.testing.assert_allclose(mrml_io.mapPointsLps(inverse, mrml_io.mapPointsLps(forward, points)), points, atol=1e-3)
    assert [n.GetID() for n in mrml_io.registrationReferences(forward)] == [moving.GetID(), fixed.GetID()]
    assert [n.GetID() for n in mrml_io.registrationReferences(inverse)] == [fixed.GetID(), moving.GetID()]
    assert results.importDisplacementFields(scene, forwardPath)[1] is None


def test_jacobian_map_gets_the_diverging_colour_table_centred_at_one(tmp_path: Path, scene, results, oblique_affine) -> None:
    values = np.random.default_rng(1).uniform(0.3, 1.8, (6, 5, 4)).astype(np.float32)
    path = write_image(Image(values, oblique_affine), tmp_path / "jacobian.nrrd")

    node = results.importScalarMap(scene, path, name="Jacobian")
    again = results.importScalarMap(scene, path, name="Jacobian 2")

    display = node.GetDisplayNode()
    color = scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetName() == results.JACOBIAN_COLOR_NAME and again.GetDisplayNode().GetColorNodeID() == color.GetID()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx(results.JACOBIAN_RANGE)
    function = color.GetColorTransferFunction()
    assert function.GetColor(1.0) == pytest.approx((1.0, 1.0, 1.0))  # no volume change: white
    low, high = function.GetColor(0.5), function.GetColor(1.5)
    assert low[2] > low[0] and high[0] > high[2]  # shrinking blue, growing red
    array = np.array(
        [[[node.GetImageData().GetScalarComponentAsDouble(i, j, k, 0) for k in range(4)] for j in range(5)] for i in range(6)]
    )
    np.testing.assert_allclose(array, values, rtol=1e-6)


def test_several_volumes_go_into_one_subject_hierarchy_folder(tmp_path: Path, scene, mrml_io, results, oblique_affine) -> None:
    paths = []
    for n in range(3):
        paths.append(write_image(Image(np.full((4, 4, 4), float(n), np.float32), oblique_affine), tmp_path / f"pair_{n}.nrrd"))
    reference = mrml_io.importVolume(paths[0], scene, name="reference")
    sh = results.subjectHierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "subject"), "study")
    sh.SetItemParent(results.itemOf(scene, reference), study)

    folder, nodes = results.importVolumesIntoFolder(scene, paths, "Synthetic pairs", ["a", "b", "c"], besideNode=reference)

    assert [n.GetName() for n in nodes] == ["a", "b", "c"]
    assert sh.GetItemName(folder) == "Synthetic pairs" and sh.GetItemParent(folder) == study
    assert [sh.GetItemParent(sh.GetItemByDataNode(n)) for n in nodes] == [folder] * 3
    np.testing.assert_allclose(mrml_io.volumeLpsAffine(nodes[2]), oblique_affine, atol=1e-5)
    with pytest.raises(ValueError, match="names"):
        results.importVolumesIntoFolder(scene, paths, "x", ["only one"])


def test_markups_load_from_mrk_json(tmp_path: Path, scene, results, slicer_core) -> None:
    # A file as Slicer writes it: written here by Slicer's own markups JSON storage node.
    source = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    import vtk

    for label, point in (("left ventricle", (10.0, -4.0, 2.5)), ("septum", (0.5, 1.0, -3.0))):
        source.AddControlPoint(vtk.vtkVector3d(*point), label)
    storage = slicer_core.vtkMRMLMarkupsJsonStorageNode()
    storage.SetFileName(str(tmp_path / "landmarks.mrk.json"))
    assert storage.WriteData(source)
    assert json.loads((tmp_path / "landmarks.mrk.json").read_text())["markups"][0]["type"] == "Fiducial"

    node = results.importMarkups(scene, tmp_path / "landmarks.mrk.json", name="loaded")

    assert node.GetClassName() == "vtkMRMLMarkupsFiducialNode" and node.GetName() == "loaded"
    assert node.GetNumberOfControlPoints() == 2 and node.GetNthControlPointLabel(1) == "septum"
    point = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, point)
    assert point == pytest.approx([10.0, -4.0, 2.5])
    assert node.GetStorageNode() is None
    with pytest.raises(FileNotFoundError):
        results.importMarkups(scene, tmp_path / "missing.mrk.json")


def test_table_loads_from_csv(tmp_path: Path, scene, results) -> None:
    path = tmp_path / "shift.csv"
    path.write_text("structure,shift_mm\nseptum pellucidum,4.25\nthird ventricle,2.5\n", encoding="utf-8")

    table = results.importTable(scene, path, name="Midline shift")

    assert table.GetName() == "Midline shift" and table.GetNumberOfRows() == 2
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == ["structure", "shift_mm"]
    assert table.GetCellText(0, 0) == "septum pellucidum" and float(table.GetCellText(1, 1)) == 2.5
    assert table.GetStorageNode() is None or table.GetStorageNode().GetFileName() != str(path)
