"""``AffineOptions``: the reason Register is disabled, and arguments ``diffusionreg affine`` accepts."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.mrml


def _volume(scene, name, dims=(6, 5, 4), components=1):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_FLOAT, components)
    node.SetAndObserveImageData(image)
    return node


def test_is_valid_gives_one_reason(scene, mrml_io, affine_job) -> None:
    Options = affine_job.AffineOptions
    fixed, moving = _volume(scene, "fixed"), _volume(scene, "moving")
    assert Options().isValid() == (False, "Select the fixed and moving volumes")
    assert Options(fixed).isValid() == (False, "Select the moving volume")
    assert Options(None, moving).isValid() == (False, "Select the fixed volume")
    assert Options(fixed, fixed).isValid() == (False, "Fixed and moving volumes must be different volumes")
    assert Options(fixed, _volume(scene, "flat", (6, 5, 1))).isValid() == (False, "The moving volume is not 3D (size 6x5x1)")
    assert (
        Options(fixed, _volume(scene, "rgb", components=3)).isValid()[1] == "The moving volume must have one component per voxel"
    )
    assert Options(fixed, moving, None, moving).isValid()[1] == "The output volume must not be the fixed or moving volume"
    output = scene.AddNewNodeByClass("vtkMRMLTransformNode", "output")
    fixed.SetAndObserveTransformNodeID(output.GetID())
    assert Options(fixed, moving, output).isValid()[1] == "The fixed volume must not be under the output transform"
    fixed.SetAndObserveTransformNodeID(None)
    assert Options(fixed, moving, modality="xray").isValid()[1] == "Unknown modality 'xray'"
    assert Options(fixed, moving, device="gpu").isValid()[1].startswith("unknown device 'gpu'")
    assert Options(fixed, moving, steps=-1).isValid()[1].startswith("Diffusion steps")
    assert Options(fixed, moving).isValid() == (True, "")
    shear = np.eye(4)
    shear[0, 1] = 0.4
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "shear")
    parent.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(shear))
    fixed.SetAndObserveTransformNodeID(parent.GetID())
    assert Options(fixed, moving).isValid()[1].startswith("The fixed volume cannot be used as it is")


def test_arguments_parse_in_the_backend(scene, affine_job) -> None:
    """Every option the module passes exists in ``diffusionreg affine`` with the same choices."""
    pytest.importorskip("torch", reason="the backend parser imports the torch backend")
    from diffusionreg.cli import build_parser
    from diffusionreg.vocabulary import INITIALIZATIONS

    parser = build_parser()
    fixed, moving = _volume(scene, "fixed"), _volume(scene, "moving")
    files = {"fixed": "f.nrrd", "moving": "m.nrrd", "transform": "t.h5", "volume": "w.nrrd"}
    full = affine_job.AffineOptions(
        fixed, moving, model="x", modality="octa", steps=3, bidirectional=True, initialize="none", device="cuda:1"
    ).asArgList(files)
    args = parser.parse_args(["affine", *full])
    assert (args.modality, args.steps, args.bidirectional, args.initialize, args.device, args.model) == (
        "octa",
        3,
        True,
        "none",
        "cuda:1",
        "x",
    )
    assert [str(a) for a in (args.fixed, args.moving, args.output_transform, args.output_volume)] == [
        "f.nrrd",
        "m.nrrd",
        "t.h5",
        "w.nrrd",
    ]
    minimal = affine_job.AffineOptions(fixed, moving).asArgList({**files, "volume": None})
    assert not {"--steps", "--model", "--output-volume", "--initialize", "--seed"} & set(minimal), (
        "defaults come from the model config"
    )
    args = parser.parse_args(["affine", *minimal])
    assert args.modality == "mri" and args.device == "auto"
    assert affine_job.INITIALIZE_CHOICES == ("default", *INITIALIZATIONS)
    with pytest.raises(ValueError, match="Select the moving volume"):
        affine_job.AffineOptions(fixed).asArgList(files)
