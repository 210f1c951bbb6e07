"""SynthPairs' Register half without Qt: MRML nodes -> job -> ``diffusionreg deformable`` -> nodes.

``SynthPairsLib.deformable_job`` exports the volume nodes and builds the command,
``DiffusionRegCoreLib.job.runJob`` runs it with the real process runner, and the result import
loads the forward and inverse fields and the Jacobian map through Slicer's storage nodes: the
same functions, in the same order, as the module. Checked for LPS- and RAS-stored inputs and an
oblique volume: the grid transforms map points as the files the backend wrote (SimpleITK
reading them) within 0.1 mm, the Jacobian volume is the backend's on the fixed grid, the fixed
volume never moves, and a pre-aligned moving volume is registered where it is displayed.

The models are the tiny registered ones of ``Testing/conftest.py`` (``tiny_registry``): the test
is about files and geometry, not accuracy.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from diffusionreg.image import Image, read_image, write_image

from .conftest import REPO, points_inside, sitk_map_points
from .test_mrml_panel_kit import _ComboBox, _Widget, core, spatial  # noqa: F401 (fixtures: the kit on Qt stand-ins)

pytestmark = pytest.mark.mrml

TOLERANCE_MM = 0.1
SHAPE = (20, 22, 24)
LAYOUTS = {
    "lps": np.diag([4.0, 4.0, 4.0, 1.0]),  # voxel axes along L, P, S
    "ras": np.diag([-4.0, -4.0, 4.0, 1.0]),  # voxel axes along R, A, S
}


@pytest.fixture(scope="module")
def synth(corelib):
    """``SynthPairsLib.deformable_job`` (and the module folder on sys.path, as Slicer puts it)."""
    folder = str(REPO / "SynthPairs")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("SynthPairsLib.deformable_job")


def _layouts(oblique_affine: np.ndarray) -> dict[str, np.ndarray]:
    affine = oblique_affine.copy()
    affine[:3, :3] *= 3.0  # the oblique grid at about the others' size in mm
    return {**LAYOUTS, "oblique": affine}


def _write_pair(folder: Path, affine: np.ndarray) -> dict[str, Path]:
    """A blob pair 2 voxels apart on one grid, with label maps (1: blob, 2: a box)."""
    folder.mkdir(parents=True, exist_ok=True)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij")
    files = {}
    for name, shift in (("fixed", 0.0), ("moving", 2.0)):
        blob = 100.0 * np.exp(-((i - 9 - shift) ** 2 + (j - 11) ** 2 + (k - 12) ** 2) / 30.0) + 0.5 * i
        files[name] = write_image(Image(blob.astype(np.float32), affine), folder / f"{name}.nii.gz")
        labels = np.zeros(SHAPE, np.int16)
        labels[blob > 40.0] = 1
        labels[2:6, 3:8, int(15 + shift) : int(20 + shift)] = 2
        files[f"{name}_labels"] = write_image(Image(labels, affine), folder / f"{name}_labels.nii.gz")
    return files


def _run(synth, corelib, scene, options, tmp_path: Path, registry: Path):
    """The module's path: prepareRegistration -> runJob (real process); returns (outcome, work folders, events)."""
    folders: list = []

    def createWorkFolder():
        folders.append(corelib.process.WorkFolder(tmp_path / f"work{len(folders)}"))
        return folders[-1]

    env = corelib.command.backendEnvironment(REPO, extra={"DIFFUSIONREG_MODELS": str(registry)})
    job = synth.prepareRegistration(options, scene, createWorkFolder, sys.executable, env)
    events, lines = [], []
    outcome = corelib.job.runJob(job, timeout=300, keepTemporaryFiles=True, onProgress=events.append, onLog=lines.append)
    assert outcome.state == "completed", f"{outcome.error}\n" + "\n".join(lines)
    return outcome.outputs, folders, events


def _options(synth, fixed, moving, **kwargs):
    base = dict(model="tiny-sitreg", modality="any", instanceOptimization=0, refineIterations=2, device="cpu")
    return synth.DeformableOptions(fixed, moving, **{**base, **kwargs})


def _voxel_values(node) -> np.ndarray:
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)


@pytest.mark.parametrize("layout", ["lps", "ras", "oblique"])
def test_register_loads_forward_inverse_and_jacobian_where_the_backend_says(
    layout: str, tmp_path: Path, scene, mrml_io, corelib, synth, tiny_registry, oblique_affine
) -> None:
    affine = _layouts(oblique_affine)[layout]
    files = _write_pair(tmp_path / "inputs", affine)
    fixed = mrml_io.importVolume(files["fixed"], scene, name="fixed")
    moving = mrml_io.importVolume(files["moving"], scene, name="moving")
    fixedLabels = mrml_io.importVolume(files["fixed_labels"], scene, name="fixed labels", nodeClass="vtkMRMLLabelMapVolumeNode")
    movingLabels = mrml_io.importVolume(
        files["moving_labels"], scene, name="moving labels", nodeClass="vtkMRMLLabelMapVolumeNode"
    )
    fixedBefore = mrml_io.volumeIjkToRas(fixed)
    resampled = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
    options = _options(synth, fixed, moving, outputVolume=resampled, fixedLabels=fixedLabels, movingLabels=movingLabels)
    assert options.isValid() == (True, "")

    result, (work,), events = _run(synth, corelib, scene, options, tmp_path, tiny_registry)

    assert set(e.stage for e in events) <= set(synth.STAGE_WEIGHTS), "a backend stage has no progress weight"
    forward, inverse = result.transformNode, result.inverseTransformNode
    for node in (forward, inverse):
        assert not node.IsLinear() and node.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert not work.file("initial.h5").exists(), "no parent transform: no initial transform passed"
    points = points_inside(affine, SHAPE, 40, seed=3, margin=2.0)
    np.testing.assert_allclose(
        mrml_io.mapPointsLps(forward, points), sitk_map_points(work.file("forward.nrrd"), points), atol=TOLERANCE_MM
    )
    np.testing.assert_allclose(
        mrml_io.mapPointsLps(inverse, points), sitk_map_points(work.file("inverse.nrrd"), points), atol=TOLERANCE_MM
    )
    assert [n.GetID() for n in mrml_io.registrationReferences(forward)] == [moving.GetID(), fixed.GetID()]
    assert [n.GetID() for n in mrml_io.registrationReferences(inverse)] == [fixed.GetID(), moving.GetID()]

    # The Jacobian map: the backend's values on the fixed grid, with the kit's colour table.
    jacobian = result.jacobianNode
    written = read_image(work.file("jacobian.nrrd"))
    np.testing.assert_allclose(mrml_io.volumeLpsAffine(jacobian), affine, atol=1e-4)
    np.testing.assert_allclose(_voxel_values(jacobian), written.array, rtol=1e-6)
    color = scene.GetNodeByID(jacobian.GetDisplayNode().GetColorNodeID())
    assert color.GetName() == corelib.results.JACOBIAN_COLOR_NAME
    assert color.GetColorTransferFunction().GetColor(0.0) == pytest.approx(corelib.results.FOLDING_RGB)
    assert color.GetColorTransferFunction().GetColor(1.0) == pytest.approx((1.0, 1.0, 1.0))

    # Fixed never moves; only the moving volume goes under the forward transform.
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(fixed), fixedBefore, atol=1e-9)
    assert fixed.GetParentTransformNode() is None
    assert moving.GetParentTransformNode().GetID() == forward.GetID()
    assert result.volumeNode is resampled and resampled.GetImageData().GetDimensions() == SHAPE
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(resampled), fixedBefore, atol=1e-4)

    # The report: what the panel's summary says.
    report = result.report
    assert report["folding_percent"] >= 0.0 and report["ice_mean_mm"] >= 0.0
    assert set(report["dice"]) == {"1", "2"} and 0.0 <= report["dice_after"] <= 1.0
    summary = result.summary()
    assert "folding" in summary and "inverse-consistency error" in summary and "Dice" in summary
    work.cleanup()


def test_a_pre_aligned_moving_volume_is_registered_where_it_is_displayed(
    tmp_path: Path, scene, mrml_io, corelib, synth, tiny_registry
) -> None:
    """Moving under a rigid transform P vs the same volume hardened: the fields agree up to P.

    The first run exports the moving volume in its own coordinates and passes P^-1 as the
    initial transform, so its field maps fixed points to the moving file's coordinates; the
    hardened volume's field maps them to world. So forward_a = P^-1 o forward_b.
    """
    from scipy.spatial.transform import Rotation

    files = _write_pair(tmp_path / "inputs", LAYOUTS["lps"])
    fixed = mrml_io.importVolume(files["fixed"], scene, name="fixed")
    moving = mrml_io.importVolume(files["moving"], scene, name="moving")
    prealign = np.eye(4)
    prealign[:3, :3] = Rotation.from_euler("xyz", [3.0, -2.0, 4.0], degrees=True).as_matrix()
    prealign[:3, 3] = [2.0, -3.0, 1.5]  # RAS, moving -> world
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "pre-alignment")
    parent.SetMatrixTransformToParent(mrml_io.vtkMatrixFromArray(prealign))
    moving.SetAndObserveTransformNodeID(parent.GetID())
    hardened = mrml_io.importVolume(files["moving"], scene, name="moving hardened")
    hardened.SetIJKToRASMatrix(mrml_io.vtkMatrixFromArray(prealign @ mrml_io.volumeIjkToRas(moving, world=False)))

    displayed, (workA,), _ = _run(synth, corelib, scene, _options(synth, fixed, moving), tmp_path / "a", tiny_registry)
    reference, _, _ = _run(synth, corelib, scene, _options(synth, fixed, hardened), tmp_path / "b", tiny_registry)

    # The initial transform written for the backend is P^-1 (fixed world -> the moving file), in LPS.
    points = points_inside(LAYOUTS["lps"], SHAPE, 30, seed=5, margin=3.0)
    flip = mrml_io.LPS_FROM_RAS
    pInverseLps = flip @ np.linalg.inv(prealign) @ flip
    np.testing.assert_allclose(
        sitk_map_points(workA.file("initial.h5"), points), points @ pInverseLps[:3, :3].T + pInverseLps[:3, 3], atol=1e-6
    )
    expected = mrml_io.mapPointsLps(reference.transformNode, points) @ pInverseLps[:3, :3].T + pInverseLps[:3, 3]
    np.testing.assert_allclose(mrml_io.mapPointsLps(displayed.transformNode, points), expected, atol=TOLERANCE_MM)
    # Only the moving volume moved: directly under the result; its former parent is unchanged.
    assert moving.GetParentTransformNode().GetID() == displayed.transformNode.GetID()
    assert any("pre-alignment" in note for note in displayed.notes)
    toParent = mrml_io.vtkMatrixFromArray(np.eye(4))
    parent.GetMatrixTransformToParent(toParent)
    np.testing.assert_allclose(mrml_io.arrayFromVtkMatrix(toParent), prealign, atol=1e-12)
    assert parent.GetParentTransformNode() is None
    workA.cleanup()


def test_run_the_affine_first_chains_spatial_diffusion_reg_and_starts_from_its_result(
    tmp_path: Path, scene, mrml_io, corelib, synth, tiny_registry
) -> None:
    files = _write_pair(tmp_path / "inputs", LAYOUTS["ras"])
    fixed = mrml_io.importVolume(files["fixed"], scene, name="fixed")
    moving = mrml_io.importVolume(files["moving"], scene, name="moving")
    options = _options(synth, fixed, moving, runAffineFirst=True, affineModality="mri", affineModel="tiny-affine")
    assert options.isValid() == (True, "")

    result, (affineWork, deformableWork), events = _run(synth, corelib, scene, options, tmp_path, tiny_registry)

    affine = result.affineTransformNode
    assert affine is not None and affine.IsLinear() and not result.transformNode.IsLinear()
    # The deformable run started from the affine result (its matrix, written as the initial transform).
    points = points_inside(LAYOUTS["ras"], SHAPE, 20, seed=7, margin=3.0)
    np.testing.assert_allclose(
        sitk_map_points(deformableWork.file("initial.h5"), points), mrml_io.mapPointsLps(affine, points), atol=1e-4
    )
    np.testing.assert_allclose(
        mrml_io.mapPointsLps(result.transformNode, points),
        sitk_map_points(deformableWork.file("forward.nrrd"), points),
        atol=TOLERANCE_MM,
    )
    # One progress over both steps: affine stages prefixed, then the deformable ones.
    stages = [e.stage for e in events]
    assert stages[0].startswith(synth.AFFINE_STAGE_PREFIX) and not stages[-1].startswith(synth.AFFINE_STAGE_PREFIX)
    affineStages = importlib.import_module("SpatialDiffusionRegLib.affine_job").STAGE_WEIGHTS
    assert set(stages) <= {f"{synth.AFFINE_STAGE_PREFIX}{s}" for s in affineStages} | set(synth.STAGE_WEIGHTS)
    overall = corelib.progress.OverallProgress(job_weights(synth, options, scene))
    assert [overall.update(e).fraction for e in events][-1] == pytest.approx(1.0)
    # The affine step placed nothing; the moving volume is under the deformable result only.
    assert moving.GetParentTransformNode().GetID() == result.transformNode.GetID()
    assert fixed.GetParentTransformNode() is None
    affineWork.cleanup()
    deformableWork.cleanup()


def job_weights(synth, options, scene) -> dict:
    """The weights the panel's progress bar gets for a chained run (the first job's)."""
    from DiffusionRegCoreLib.process import WorkFolder

    folders = []

    def createWorkFolder():
        folders.append(WorkFolder())
        return folders[-1]

    job = synth.prepareRegistration(options, scene, createWorkFolder, sys.executable)
    for folder in folders:
        folder.cleanup()
    return dict(job.stageWeights)


def _small_volume(scene, name):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(4, 5, 6)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    return node


def test_options_say_why_they_cannot_run(scene, mrml_io, synth) -> None:
    def volume(name):
        return _small_volume(scene, name)

    fixed, moving, labels = volume("fixed"), volume("moving"), volume("labels")
    linear = scene.AddNewNodeByClass("vtkMRMLTransformNode", "initial")
    output = scene.AddNewNodeByClass("vtkMRMLTransformNode", "output")
    Options = synth.DeformableOptions
    assert Options().isValid()[1] == "Select the fixed and moving volumes"
    assert Options(fixed, moving).isValid() == (True, "")
    assert "different" in Options(fixed, fixed).isValid()[1]
    assert "inverse must be different" in Options(fixed, moving, output, output).isValid()[1]
    assert "must not be one of the inputs" in Options(fixed, moving, outputJacobian=moving).isValid()[1]
    assert "both label maps" in Options(fixed, moving, fixedLabels=labels).isValid()[1]
    assert "not both" in Options(fixed, moving, initialTransform=linear, runAffineFirst=True).isValid()[1]
    assert "0 or more" in Options(fixed, moving, refineIterations=-2).isValid()[1]
    assert "unknown device" in Options(fixed, moving, device="gpu").isValid()[1]
    fixed.SetAndObserveTransformNodeID(output.GetID())
    assert "fixed volume must not be under" in Options(fixed, moving, output).isValid()[1]
    files = {"fixed": Path("f.nrrd"), "moving": Path("m.nrrd"), "transform": Path("t.nrrd"), "report": Path("r.json")}
    arguments = Options(volume("f2"), moving, instanceOptimization=0, device="cpu").asArgList(files)
    assert arguments[arguments.index("--instance-optimization") + 1] == "0"
    assert "--refine-iterations" not in arguments and "--initial-transform" not in arguments


# --- quality presets (``--quality``) ---------------------------------------------------------------
QUALITY_PRESETS = [
    {"name": "fast", "io_steps": 0, "refine_iterations": 1, "refine_coarse_iterations": 0, "refine_upsample": 1.0},
    {"name": "best", "io_steps": 1, "refine_iterations": 3, "refine_coarse_iterations": 1, "refine_upsample": 1.0},
]


@pytest.fixture(scope="module")
def quality_registry(tiny_registry, tmp_path_factory) -> Path:
    """A Models.json with ``tiny-sitreg`` (no presets) and ``tiny-sitreg-quality``: the same weights
    whose config has 2 refinement iterations as its default and fast/best presets, as the shipped
    deformable models have."""
    from diffusionreg.registry import sha256_file

    root = tmp_path_factory.mktemp("quality_models")
    entries = []
    for name, presets in (("tiny-sitreg", None), ("tiny-sitreg-quality", QUALITY_PRESETS)):
        shutil.copytree(tiny_registry.parent / "sitreg", root / name)
        if presets is not None:
            config = json.loads((root / name / "config.json").read_text(encoding="utf-8"))
            config["inference"]["refine"].update(iterations=2, coarse_iterations=0)
            config["inference"]["qualities"] = presets
            (root / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
        entries.append(
            {
                "name": name,
                "task": "deformable",
                "modality": "any",
                "file": f"{name}/model.safetensors",
                "sha256": sha256_file(root / name / "model.safetensors"),
                "config": f"{name}/config.json",
            }
        )
    (root / "Models.json").write_text(json.dumps({"models": entries}), encoding="utf-8")
    return root / "Models.json"


def test_quality_choices_are_the_model_config_presets_fastest_first(corelib, synth, tmp_path) -> None:
    """The shipped deformable models: 'default' is the config's own settings, the others its presets."""
    manager = corelib.models.ModelManager(REPO / "Resources" / "Models.json", tmp_path)
    for name in ("lung-vessels", "brain-mri"):
        entry = next(e for e in manager.models("deformable") if e.name == name)
        inference = json.loads(Path(entry.config).read_text(encoding="utf-8"))["inference"]
        choices = synth.qualityChoices(manager.inferenceDefaults(entry))
        assert [c.name for c in choices] == ["fast", "default", "best"], name
        presets = {p["name"]: (p["io_steps"], p["refine_iterations"]) for p in inference["qualities"]}
        presets["default"] = (inference["io_steps"], inference["refine"]["iterations"])
        assert {c.name: (c.instanceOptimization, c.refineIterations) for c in choices} == presets
        assert synth.qualityReason(choices, "best") == ""
    plain = synth.qualityChoices({"io_steps": 0, "refine": {"iterations": 2}, "qualities": []})
    assert [(c.name, c.instanceOptimization, c.refineIterations) for c in plain] == [("default", 0, 2)]
    assert synth.qualityReason(plain, "fast") == "The model has no 'fast' quality (it has default)"
    assert [(c.name, c.refineIterations) for c in synth.qualityChoices({})] == [("default", None)]


def test_quality_is_passed_as_the_backend_option(scene, synth) -> None:
    """``--quality NAME`` for a preset, nothing for the model's own settings; the backend parser takes it."""
    pytest.importorskip("torch", reason="the backend parser imports the torch backend")
    from diffusionreg.cli import build_parser

    fixed, moving = _small_volume(scene, "fixed"), _small_volume(scene, "moving")
    files = {"fixed": Path("f.nrrd"), "moving": Path("m.nrrd"), "transform": Path("t.nrrd")}
    parser = build_parser()
    for quality, passed in (("fast", "fast"), ("best", "best"), (synth.QUALITY_DEFAULT, None)):
        arguments = synth.DeformableOptions(fixed, moving, quality=quality, device="cpu").asArgList(files)
        assert ("--quality" in arguments) is (passed is not None)
        assert parser.parse_args(["deformable", *arguments]).quality == passed
    assert synth.DeformableOptions(fixed, moving, quality="").isValid()[1].startswith("Choose a quality")


@pytest.fixture
def synthpairs(request, synth):
    """SynthPairs.py imported as the panel kit's tests import SpatialDiffusionReg.py (Qt stand-ins,
    parameterNodeWrapper as identity, the test scene as slicer.mrmlScene)."""
    request.getfixturevalue("spatial")
    sys.modules.pop("SynthPairs", None)
    yield importlib.import_module("SynthPairs")
    sys.modules.pop("SynthPairs", None)


class _SignalComboBox(_ComboBox):
    """The kit's combo box stand-in with ``blockSignals`` (the module refills its combo boxes with
    signals blocked, as Qt's QObject.blockSignals does: no ``currentIndexChanged`` meanwhile)."""

    blocked = False

    def blockSignals(self, block: bool) -> bool:
        previous, self.blocked = self.blocked, bool(block)
        return previous

    def emit(self, signal, *args):
        if not self.blocked:
            super().emit(signal, *args)


def _widget(module, modality: str, model: str):
    """The module's widget on stand-ins of its .ui (the names the code uses) and of the kit's selectors."""
    widget = module.SynthPairsWidget.__new__(module.SynthPairsWidget)
    widget.ui = types.SimpleNamespace(
        qualityComboBox=_SignalComboBox(),
        affineModalityComboBox=_SignalComboBox(),
        instanceOptimizationSpinBox=_Widget(),
        refineIterationsSpinBox=_Widget(),
    )
    widget.logic = module.SynthPairsLogic()
    widget.panel = types.SimpleNamespace(modality=modality, model=model, device="cpu")
    node = module.SynthPairsParameterNode()
    for name in module.SynthPairsParameterNode.__annotations__:  # node fields without a default: None
        if not hasattr(node, name):
            setattr(node, name, None)
    widget._parameterNode = node
    widget.setupModule()
    return widget


def test_the_panel_offers_the_model_qualities_and_the_backend_runs_the_chosen_one(
    synthpairs, quality_registry, scene, mrml_io, tmp_path, monkeypatch
) -> None:
    """Quality box: the chosen model's presets; choosing one shows its iterations in the iteration
    boxes; Register runs the real backend with it, which reports those iterations."""
    monkeypatch.setenv("DIFFUSIONREG_MODELS", str(quality_registry))
    widget = _widget(synthpairs, "any", "tiny-sitreg-quality")
    node, combo, ui = widget._parameterNode, widget.ui.qualityComboBox, widget.ui
    widget.onModelSelection()
    assert combo.itemTexts() == ["fast", "default", "best"] and combo.currentData == "default"
    assert (ui.instanceOptimizationSpinBox.specialValueText, ui.refineIterationsSpinBox.specialValueText) == (
        "model default (0)",
        "model default (2)",
    )
    node.refineIterations = 7  # a number typed before choosing a quality
    combo.currentIndex = combo.findData("best")
    assert (node.quality, node.instanceOptimization, node.refineIterations) == ("best", -1, -1)
    assert (ui.instanceOptimizationSpinBox.specialValueText, ui.refineIterationsSpinBox.specialValueText) == (
        "best preset (1)",
        "best preset (3)",
    )
    # a model without presets offers only its own settings; the quality it lacks is not kept
    widget.panel.model = "tiny-sitreg"
    widget.onModelSelection()
    assert combo.itemTexts() == ["default"] and node.quality == "default"
    assert ui.refineIterationsSpinBox.specialValueText == "model default (0)"
    widget.panel.model = "tiny-sitreg-quality"
    widget.onModelSelection()
    combo.currentIndex = combo.findData("best")

    files = _write_pair(tmp_path / "pair", LAYOUTS["lps"])
    node.fixedVolume = mrml_io.importVolume(files["fixed"], scene, name="fixed")
    node.movingVolume = mrml_io.importVolume(files["moving"], scene, name="moving")
    assert widget.reasonNotToRun() == ""
    options = widget.options()
    assert (options.model, options.quality) == ("tiny-sitreg-quality", "best")
    result = widget.logic.run(options, timeout=300)
    report = result.report
    assert (report["quality"], report["instance_optimization_steps"], report["refine_iterations"]) == ("best", 1, 3)
    assert report["refine_coarse_iterations"] == QUALITY_PRESETS[1]["refine_coarse_iterations"]
    assert not result.transformNode.IsLinear()
    with pytest.raises(ValueError, match="The model has no 'fast' quality"):
        widget.logic.register(node.fixedVolume, node.movingVolume, modality="any", model="tiny-sitreg", quality="fast")
