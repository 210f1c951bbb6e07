"""Registering every frame of a sequence (a 4D acquisition) to one fixed volume: the scripting
path ``SpatialDiffusionRegLogic.registerSequence`` on a real slicer-core scene with real sequence
nodes and the real backend (a tiny random model: the test is about frames, index values and what
the scene keeps, not accuracy).

Checked: one linear transform per frame at the frame's index value, each the transform that
``register`` gives for that frame alone; nothing per frame is left in the scene; a frame that
fails leaves no partial result (all frames or none); inputs that are not a sequence of volumes
are refused with the reason before anything runs.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from . import test_mrml_panel_kit as kit

core, spatial = kit.core, kit.spatial  # the kit's fixtures: its Qt stand-ins, the module imported with them

pytestmark = pytest.mark.mrml

SHIFTS_MM = (0.0, 6.0)
INDEX_VALUES = ("0.5", "1.75")


def _blob() -> np.ndarray:
    """A textured ellipsoid on a 32^3 grid (i, j, k), the same every call."""
    rng = np.random.default_rng(5)
    index = np.indices((32, 32, 32), dtype=np.float64)
    inside = (((index[0] - 15.5) / 11) ** 2 + ((index[1] - 15.5) / 9) ** 2 + ((index[2] - 15.5) / 12) ** 2) < 1.0
    texture = ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 1.5)
    return np.where(inside, 500.0 + 200.0 * texture / texture.std(), 0.0).astype(np.float32)


def _volume(slicer_core, array: np.ndarray, shift_mm: float):
    """A scalar volume node (not in any scene) of ``array`` (i, j, k) on a 3 mm grid shifted along R."""
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()  # VTK: i fastest
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node = slicer_core.vtkMRMLScalarVolumeNode()
    node.SetAndObserveImageData(image)
    node.SetSpacing(3.0, 3.0, 3.0)
    node.SetOrigin(-45.0 + shift_mm, -45.0, -45.0)
    return node


@pytest.fixture
def tiny_model(spatial, tmp_path, monkeypatch):
    """A tiny random affine model, imported the way the panel's "Import..." does; its model argument."""
    pytest.importorskip("torch", reason="the affine command needs torch (installed with the backend)")
    from tiny_models import tiny_affine_config, write_affine_model

    monkeypatch.setenv("DIFFUSIONREG_MODELS_DIR", str(tmp_path / "user-models"))
    weights = write_affine_model(tiny_affine_config("tiny-sequence"), tmp_path / "tiny")
    entry = spatial.SpatialDiffusionRegLogic().coreLogic.modelManager().importFile(weights, task="affine", modality="mri")
    return entry.modelArgument()


def _frames(slicer_core, scene, arrays_and_shifts, name="cine"):
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for value, (array, shift) in zip(INDEX_VALUES, arrays_and_shifts):
        sequence.SetDataNodeAtValue(_volume(slicer_core, array, shift), value)
    return sequence


def _matrix(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _inventory(scene) -> dict[str, int]:
    return {
        c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLScalarVolumeNode", "vtkMRMLTransformNode", "vtkMRMLSequenceNode")
    }


def test_every_frame_gets_the_transform_register_gives_it(spatial, slicer_core, scene, tiny_model) -> None:
    fixed = scene.AddNode(_volume(slicer_core, _blob(), 0.0))
    fixed.SetName("fixed")
    frames = _frames(slicer_core, scene, [(_blob(), s) for s in SHIFTS_MM])
    before = _inventory(scene)
    calls = []
    logic = spatial.SpatialDiffusionRegLogic()
    options = dict(modality="mri", model=tiny_model, device="cpu", timeout=300)

    transforms = logic.registerSequence(fixed, frames, onFrame=lambda i, n: calls.append((i, n)), **options)

    assert calls == [(0, 2), (1, 2)]
    assert transforms.GetScene() is scene and transforms.GetName() == "cine to fixed"
    assert (transforms.GetIndexName(), transforms.GetIndexUnit()) == ("time", "s")
    assert [transforms.GetNthIndexValue(i) for i in range(2)] == list(INDEX_VALUES)
    assert all(transforms.GetNthDataNode(i).IsLinear() for i in range(2))
    after = _inventory(scene)
    assert after == {**before, "vtkMRMLSequenceNode": before["vtkMRMLSequenceNode"] + 1}, "per-frame nodes were left"
    # Frame 1 registered alone, as a volume in the scene: the same transform as in the sequence.
    alone = scene.AddNode(_volume(slicer_core, _blob(), SHIFTS_MM[1]))
    single = logic.register(fixed, alone, showResult=False, **options).transformNode
    np.testing.assert_allclose(_matrix(transforms.GetNthDataNode(1)), _matrix(single), atol=1e-4)
    # ... and frame 0's transform is its own (the frames are not mixed up)
    assert np.abs(_matrix(transforms.GetNthDataNode(0)) - _matrix(single)).max() > 1e-3


def test_a_failing_frame_leaves_no_partial_result(spatial, slicer_core, scene, tiny_model) -> None:
    fixed = scene.AddNode(_volume(slicer_core, _blob(), 0.0))
    constant = np.full((32, 32, 32), 7.0, np.float32)  # the backend refuses it: nothing to register
    frames = _frames(slicer_core, scene, [(_blob(), 0.0), (constant, 0.0)])
    before = _inventory(scene)

    with pytest.raises(RuntimeError, match="constant"):
        spatial.SpatialDiffusionRegLogic().registerSequence(fixed, frames, modality="mri", model=tiny_model, device="cpu")

    assert _inventory(scene) == before


def test_what_is_not_a_sequence_of_volumes_is_refused_before_anything_runs(spatial, slicer_core, scene) -> None:
    fixed = scene.AddNode(_volume(slicer_core, _blob(), 0.0))
    logic = spatial.SpatialDiffusionRegLogic()
    empty = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "empty")
    transforms = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "motion")
    transforms.SetDataNodeAtValue(slicer_core.vtkMRMLLinearTransformNode(), "0")
    frames = _frames(slicer_core, scene, [(_blob(), 0.0)])
    before = _inventory(scene)
    for sequence, reason in (
        (None, "Select the sequence of moving volumes"),
        (fixed, f"'{fixed.GetName()}' is not a sequence"),
        (empty, "The sequence 'empty' has no frames"),
        (transforms, "The sequence 'motion' holds vtkMRMLLinearTransformNode frames, not scalar volumes"),
    ):
        with pytest.raises(ValueError) as refused:
            logic.registerSequence(fixed, sequence, device="cpu")
        assert str(refused.value).startswith(reason), refused.value
    with pytest.raises(ValueError, match="^Select the fixed volume$"):
        logic.registerSequence(None, frames, device="cpu")
    with pytest.raises(ValueError, match="do not pass outputTransform"):
        logic.registerSequence(fixed, frames, outputTransform=None, device="cpu")
    assert _inventory(scene) == before
