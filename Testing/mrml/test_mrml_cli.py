"""The module's whole path without Qt: MRML nodes -> job -> ``diffusionreg affine`` -> nodes.

``SpatialDiffusionRegLib.affine_job.prepareAffineJob`` exports the volume nodes and builds the
command, ``DiffusionRegCoreLib.job.runJob`` runs it with the real process runner (JSON progress
parsed) and imports the transform through Slicer's transform storage node: the same functions,
in the same order, as the module. The loaded node must map points as SimpleITK maps them with
the file the backend wrote (within 1e-4 mm).

The network is a tiny randomly initialised model written to a temporary folder (the test is
about files and geometry, not accuracy), so no trained weights are needed and nothing skips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, sitk_map_points

pytestmark = pytest.mark.mrml

SAMPLE = REPO / "Resources" / "Sample"
TOLERANCE_MM = 1e-4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """``model.safetensors`` + ``config.json`` of a tiny random affine network (--model PATH)."""
    pytest.importorskip("torch", reason="the affine command needs torch (installed with the backend)")
    from tiny_models import tiny_affine_config, write_affine_model

    return write_affine_model(tiny_affine_config("tiny-test"), tmp_path_factory.mktemp("tiny_model"))


def test_affine_job_runs_the_backend_and_loads_what_simpleitk_reads(
    tmp_path: Path, scene, mrml_io, corelib, affine_job, tiny_model
) -> None:
    # Inputs as the module has them: volume nodes (loaded by Slicer's reader), moving under an earlier output.
    fixed = mrml_io.importVolume(SAMPLE / "sample_fixed.nii.gz", scene, name="fixed")
    moving = mrml_io.importVolume(SAMPLE / "sample_moving.nii.gz", scene, name="moving")
    earlier = scene.AddNewNodeByClass("vtkMRMLTransformNode", "earlier result")
    moving.SetAndObserveTransformNodeID(earlier.GetID())
    resampled = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    options = affine_job.AffineOptions(
        fixed, moving, earlier, resampled, modality="mri", model=str(tiny_model), steps=2, initialize="moments", device="cpu"
    )
    assert options.isValid() == (True, "")
    workFolder = corelib.process.WorkFolder(tmp_path / "work")
    job = affine_job.prepareAffineJob(options, scene, workFolder, sys.executable, corelib.command.backendEnvironment(REPO))
    events, lines = [], []

    outcome = corelib.job.runJob(job, timeout=300, keepTemporaryFiles=True, onProgress=events.append, onLog=lines.append)

    assert outcome.state == "completed", f"{outcome.error}\n" + "\n".join(lines)
    assert events and all(0.0 <= e.fraction <= 1.0 for e in events)
    assert {"read", "affine"} <= {e.stage for e in events}
    assert set(e.stage for e in events) <= set(affine_job.STAGE_WEIGHTS), "a backend stage has no progress weight"
    assert not any(line.lstrip().startswith('{"stage"') for line in lines), "progress lines leaked into the log"
    result = outcome.outputs
    node = result.transformNode
    assert node is earlier and node.IsLinear()
    fixedGrid = mrml_io.volumeLpsAffine(fixed)
    dims = np.array(fixed.GetImageData().GetDimensions(), dtype=float)
    points = np.random.default_rng(0).uniform(0, dims - 1, (50, 3)) @ fixedGrid[:3, :3].T + fixedGrid[:3, 3]
    transformFile = workFolder.file("transform.h5")
    np.testing.assert_allclose(
        mrml_io.mapPointsLps(node, points), sitk_map_points(transformFile, points), atol=TOLERANCE_MM, rtol=0
    )

    # The resampled output lands on the fixed grid; the moving volume stays directly under the result.
    assert result.volumeNode is resampled
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(resampled), mrml_io.volumeIjkToRas(fixed), atol=1e-4)
    assert resampled.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    assert moving.GetParentTransformNode().GetID() == node.GetID() and result.notes == []
    workFolder.cleanup()


def test_affine_job_bad_input_gives_one_error_line(tmp_path: Path, scene, mrml_io, corelib, affine_job) -> None:
    """A backend failure ends the job as failed with the backend's one line, and nothing is imported."""
    fixed = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
    moving = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
    for node in (fixed, moving):
        import vtk

        image = vtk.vtkImageData()
        image.SetDimensions(4, 4, 4)
        image.AllocateScalars(vtk.VTK_FLOAT, 1)  # constant zeros: the backend refuses them
        image.GetPointData().GetScalars().Fill(0.0)
        node.SetAndObserveImageData(image)
    options = affine_job.AffineOptions(fixed, moving, device="cpu")
    workFolder = corelib.process.WorkFolder(tmp_path / "work")
    job = affine_job.prepareAffineJob(options, scene, workFolder, sys.executable, corelib.command.backendEnvironment(REPO))
    before = scene.GetNumberOfNodes()
    outcome = corelib.job.runJob(job, timeout=300)
    assert outcome.state == "failed"
    assert outcome.processResult.returncode == corelib.progress.EXIT_BAD_INPUT
    assert outcome.error.startswith("bad input: ") and "\n" not in outcome.error
    assert scene.GetNumberOfNodes() == before and not workFolder.path.exists()
