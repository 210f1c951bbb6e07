"""Issue 10 item 2: after Register the fixed volume never moves, and the moving volume overlays it
as the backend says, whatever transforms the two volumes (or a shared ancestor) carry.

The job is prepared and its results imported by ``SpatialDiffusionRegLib.affine_job`` (the
module's code) on a real slicer-core scene. The backend process is replaced by a small script
(through ``runJob``'s ``processFactory``) that writes a known transform ``T`` (fixed LPS ->
moving LPS, an oblique rotation with translation and scale) as an ITK file, the way
``diffusionreg affine`` does. "As the backend says": a moving voxel that sat at ``q`` in the
moving file the backend read must be displayed at ``T^-1(q)`` afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, world_points_of_voxels

pytestmark = pytest.mark.mrml

TOLERANCE_MM = 1e-4

FAKE_BACKEND = """
import sys
import numpy as np
from diffusionreg.transforms import AffineTransform, write_transform
args = sys.argv[1:]
matrix = np.array([float(v) for v in args[0].split(",")]).reshape(4, 4)
write_transform(AffineTransform(matrix), args[args.index("--output-transform") + 1])
with open(args[args.index("--output-json") + 1], "w") as report:  # as the backend's report says a sound result
    report.write('{"doubtful": false, "similarity_nmi": 0.7}')
"""


@pytest.fixture(scope="module")
def backend_matrix() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("zyx", [9.0, -6.0, 14.0], degrees=True).as_matrix() * 1.04
    matrix[:3, 3] = [6.0, -11.0, 4.5]
    return matrix


def _fake_factory(corelib, matrix):
    def factory(command, **kwargs):
        arguments = command[command.index("affine") + 1 :]
        fake = [sys.executable, "-c", FAKE_BACKEND, ",".join(repr(float(v)) for v in matrix.ravel()), *arguments]
        return corelib.process.BackendProcess(fake, **kwargs)

    return factory


def _volume(scene, mrml_io, name, origin):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(8, 9, 7)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    image.GetPointData().GetScalars().Fill(1.0)
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 1.5, 2.5)
    node.SetOrigin(*origin)
    return node


def _linear(scene, mrml_io, name, angle_deg, shift):
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    matrix = np.array([[c, -s, 0, shift[0]], [s, c, 0, shift[1]], [0, 0, 1, shift[2]], [0, 0, 0, 1.0]])
    node.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(matrix))
    return node


def _warp(scene, mrml_io, name):
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    field = np.zeros((5, 5, 5, 3))
    field[..., 0] = np.linspace(0, 3.0, 5)[:, None, None]  # a non-linear stretch along L
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = -16.0
    mrml_io.setDisplacementField(node, field, affine)
    return node


CASES = ("none", "fixed_own", "moving_own", "both_own", "shared", "shared_and_own", "moving_warped", "rerun_into_output")


def _scene_case(case, scene, mrml_io):
    fixed = _volume(scene, mrml_io, "fixed", (-8.0, -6.0, -9.0))
    moving = _volume(scene, mrml_io, "moving", (-5.0, -7.0, -8.0))
    output = None
    if case in ("fixed_own", "both_own"):
        fixed.SetAndObserveTransformNodeID(_linear(scene, mrml_io, "fixed own", 10.0, (3.0, 1.0, -2.0)).GetID())
    if case in ("moving_own", "both_own"):
        moving.SetAndObserveTransformNodeID(_linear(scene, mrml_io, "moving own", -15.0, (-4.0, 2.0, 1.0)).GetID())
    if case in ("shared", "shared_and_own"):
        shared = _linear(scene, mrml_io, "shared", 25.0, (40.0, -30.0, 12.0))  # ~52 mm: the reported shift
        if case == "shared":
            fixed.SetAndObserveTransformNodeID(shared.GetID())
            moving.SetAndObserveTransformNodeID(shared.GetID())
        else:
            ownFixed = _linear(scene, mrml_io, "fixed own", 5.0, (1.0, 0.0, 0.0))
            ownMoving = _linear(scene, mrml_io, "moving own", -7.0, (0.0, 2.0, 0.0))
            ownFixed.SetAndObserveTransformNodeID(shared.GetID())
            ownMoving.SetAndObserveTransformNodeID(shared.GetID())
            fixed.SetAndObserveTransformNodeID(ownFixed.GetID())
            moving.SetAndObserveTransformNodeID(ownMoving.GetID())
    if case == "moving_warped":
        moving.SetAndObserveTransformNodeID(_warp(scene, mrml_io, "warp").GetID())
    if case == "rerun_into_output":
        output = _linear(scene, mrml_io, "earlier result", 12.0, (2.0, 2.0, 2.0))
        pre = _linear(scene, mrml_io, "pre-alignment", -4.0, (1.0, -1.0, 0.5))
        pre.SetAndObserveTransformNodeID(output.GetID())
        moving.SetAndObserveTransformNodeID(pre.GetID())
    return fixed, moving, output


def _parentID(node):
    parent = node.GetParentTransformNode()
    return parent.GetID() if parent is not None else None


def _transform_matrices(scene, mrml_io):
    import vtk

    found = {}
    for node in mrml_io.nodesOfClass(scene, "vtkMRMLTransformNode"):
        if node.IsLinear():
            matrix = vtk.vtkMatrix4x4()
            node.GetMatrixTransformToParent(matrix)
            found[node.GetID()] = (mrml_io.arrayFromVtkMatrix(matrix), _parentID(node))
    return found


@pytest.mark.parametrize("case", CASES)
def test_register_as_displayed(case, tmp_path: Path, scene, mrml_io, corelib, affine_job, slicer_core, backend_matrix) -> None:
    from diffusionreg.image import read_image
    from diffusionreg.transforms import AffineTransform

    fixed, moving, output = _scene_case(case, scene, mrml_io)
    voxels = np.random.default_rng(3).uniform(0, 6, (25, 3))
    fixedBefore = world_points_of_voxels(slicer_core, fixed, voxels)
    transformsBefore = _transform_matrices(scene, mrml_io)

    options = affine_job.AffineOptions(fixed, moving, output, device="cpu")
    assert options.isValid() == (True, "")
    workFolder = corelib.process.WorkFolder(tmp_path / "work")
    job = affine_job.prepareAffineJob(options, scene, workFolder, sys.executable, corelib.command.backendEnvironment(REPO))
    outcome = corelib.job.runJob(job, processFactory=_fake_factory(corelib, backend_matrix), timeout=120, keepTemporaryFiles=True)
    assert outcome.state == "completed", outcome.error
    result = outcome.outputs.transformNode

    # The fixed volume is exactly where it was; no transform that existed before was changed or
    # re-parented, except the output transform the user chose to overwrite.
    np.testing.assert_allclose(world_points_of_voxels(slicer_core, fixed, voxels), fixedBefore, atol=1e-9)
    after = _transform_matrices(scene, mrml_io)
    for nodeID, (matrix, parentID) in transformsBefore.items():
        if output is not None and nodeID == output.GetID():
            continue
        np.testing.assert_allclose(after[nodeID][0], matrix, atol=1e-12, err_msg=f"{nodeID} changed")
        assert after[nodeID][1] == parentID, f"{scene.GetNodeByID(nodeID).GetName()} was re-parented"

    # Only the moving volume went under the result, directly.
    assert _parentID(moving) == result.GetID()
    assert result.GetParentTransformNode() is None
    # The moving voxels the backend saw at q are displayed at T^-1(q).
    exported = read_image(workFolder.file("moving.nrrd"))
    q = voxels @ exported.affine[:3, :3].T + exported.affine[:3, 3]
    expected = AffineTransform(np.linalg.inv(backend_matrix)).map_points(q)
    np.testing.assert_allclose(world_points_of_voxels(slicer_core, moving, voxels), expected, atol=TOLERANCE_MM)
    # The fixed volume the backend saw is the fixed volume as displayed.
    fixedFile = read_image(workFolder.file("fixed.nrrd"))
    np.testing.assert_allclose(voxels @ fixedFile.affine[:3, :3].T + fixedFile.affine[:3, 3], fixedBefore, atol=1e-4)
    if case == "moving_warped":
        assert outcome.outputs.notes and "own coordinates" in outcome.outputs.notes[0]
    workFolder.cleanup()
