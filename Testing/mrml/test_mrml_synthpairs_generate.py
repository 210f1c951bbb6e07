"""SynthPairs' Generate half without Qt: options -> ``diffusionreg synth`` (real processes) -> nodes.

``SynthPairsLib.generate_job`` builds the backend runs (one, or one per pair when the finished
pairs are kept on cancel), ``DiffusionRegCoreLib.job.runJob`` runs them with the real process
runner, and the import loads the pairs through Slicer's storage nodes into a subject-hierarchy
folder with a table of the manifest's figures: the same functions, in the same order, as the
module. Checked: the arguments are what the backend's own parser takes; the voxels are where the
backend put them (world positions from slicer-core against the NIfTI affine and the model's
canonical frame, RAS and LPS); the table holds the manifest's numbers; pairs made one run at a
time are the pairs of one run; a cancel keeps exactly the finished pairs when asked and nothing
otherwise; "Register this pair" fills the Register inputs; the panel says when no generator is
installed and shows the model's sampling defaults.

The generator is a tiny one trained by the real commands on one real lung pair
(``tiny_models.write_tiny_generator``): the tests are about files and geometry, not realism.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from diffusionreg.image import read_image

from .conftest import REPO, world_points_of_voxels
from .test_mrml_panel_kit import _Widget, core, spatial  # noqa: F401 (fixtures: the kit on Qt stand-ins)
from .test_mrml_synthpairs import synth, synthpairs  # noqa: F401 (fixtures)

pytestmark = pytest.mark.mrml

CASE = "case_032"


@pytest.fixture(scope="module")
def generator(tmp_path_factory, shared_data) -> Path:
    """A tiny pair generator's model folder (config.json: sampling steps 8, temperature 0.9)."""
    from tiny_models import write_tiny_generator

    folder = shared_data / "lung" / "vessels_train10"
    return write_tiny_generator(tmp_path_factory.mktemp("generator"), folder / f"{CASE}_1.nii.gz", folder / f"{CASE}_2.nii.gz")


@pytest.fixture(scope="module")
def generator_registry(generator, tmp_path_factory) -> Path:
    """A Models.json registering the tiny generator as ``tiny-pairs`` (task synth, lung vessels)."""
    from diffusionreg.registry import sha256_file

    root = tmp_path_factory.mktemp("generator_registry")
    entry = {
        "name": "tiny-pairs",
        "task": "synth",
        "modality": "lung-vessels",
        "file": str(generator / "model.safetensors"),
        "sha256": sha256_file(generator / "model.safetensors"),
        "config": str(generator / "config.json"),
    }
    (root / "Models.json").write_text(json.dumps({"models": [entry]}), encoding="utf-8")
    return root / "Models.json"


@pytest.fixture(scope="module")
def generate(request):
    """``SynthPairsLib.generate_job`` (the module folder is on sys.path through ``synth``)."""
    request.getfixturevalue("synth")
    return importlib.import_module("SynthPairsLib.generate_job")


def _run(generate, corelib, scene, options, tmp_path: Path, cancelRun: int | None = None, duringRun=None):
    """The module's path: prepareGeneration -> runJob (real processes) -> conclude.

    ``cancelRun``: the backend run (0-based) cancelled as soon as it starts drawing pairs.
    ``duringRun()``: called once, when the first backend run starts drawing.
    Returns ``(result, outcome, backend runs started, progress events)``.
    """
    counter = {"n": 0}
    folders = []

    def createWorkFolder():
        folders.append(corelib.process.WorkFolder(tmp_path / "work"))
        return folders[-1]

    def factory(commandLine, **kwargs):
        number, onProgress = counter["n"], kwargs.pop("onProgress")
        counter["n"] += 1
        holder = {}

        def progress(event):
            if number == cancelRun and event.stage.endswith("generate"):
                holder["process"].cancel()
            if duringRun is not None and number == 0 and event.stage == "generate" and not holder.get("called"):
                holder["called"] = duringRun() or True
            if onProgress:
                onProgress(event)

        holder["process"] = corelib.process.BackendProcess(commandLine, onProgress=progress, **kwargs)
        return holder["process"]

    env = corelib.command.backendEnvironment(REPO)
    run = generate.prepareGeneration(options, scene, createWorkFolder, sys.executable, env)
    events, lines = [], []
    outcome = corelib.job.runJob(run.firstJob(), factory, 300, False, events.append, lines.append)
    if cancelRun is None and duringRun is None:
        assert outcome.state == "completed", f"{outcome.error}\n" + "\n".join(lines)
    result = run.conclude(outcome)
    assert not run.staging.path.exists(), "the staging folder is removed"
    assert all(not f.path.exists() for f in folders), "no temporary folder is left behind"
    return result, outcome, counter["n"], events


def _options(generate, generator: Path, **kwargs):
    return generate.GenerateOptions(**{"count": 2, "seed": 5, "model": str(generator), "device": "cpu", **kwargs})


def _voxels(node) -> np.ndarray:
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)


def _table_column(table, name: str) -> list:
    column = table.GetTable().GetColumnByName(name)
    assert column is not None, f"the table has no column {name}"
    return [column.GetValue(row) for row in range(table.GetNumberOfRows())]


def _volume_nodes(scene) -> list:
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]


# --- job preparation ---------------------------------------------------------------------------
def test_arguments_are_what_the_backend_parser_takes(generate, tmp_path) -> None:
    """Each backend run's arguments, through ``diffusionreg``'s own parser; sampling defaults pass nothing."""
    pytest.importorskip("torch", reason="the backend parser imports the torch backend")
    from diffusionreg.cli import build_parser
    from diffusionreg.synth.generate_command import MAX_PAIRS

    assert generate.MAX_PAIRS == MAX_PAIRS
    parser = build_parser()
    options = generate.GenerateOptions(count=3, seed=7, model="tiny-pairs", temperature=1.25, steps=12, device="cpu")
    parsed = parser.parse_args(["synth", *options.asArgList({"output": tmp_path})])
    assert (parsed.count, parsed.seed, parsed.first_index, parsed.model) == (3, 7, 0, "tiny-pairs")
    assert (parsed.temperature, parsed.steps, parsed.output, parsed.device) == (1.25, 12, tmp_path, "cpu")
    plain = parser.parse_args(["synth", *generate.GenerateOptions(count=2, device="cpu").asArgList({"output": tmp_path})])
    assert (plain.temperature, plain.steps, plain.model, plain.seed) == (None, None, None, 0)  # the model's config decides

    assert options.chunks() == [(0, 3)]
    kept = generate.GenerateOptions(count=3, seed=7, keepOnCancel=True, firstIndex=4, device="cpu")
    assert kept.chunks() == [(4, 1), (5, 1), (6, 1)]
    assert generate.GenerateOptions(count=5, pairsPerRun=2).chunks() == [(0, 2), (2, 2), (4, 1)]
    second = parser.parse_args(["synth", *kept.asArgList({"output": tmp_path}, 5, 1)])
    assert (second.first_index, second.count, second.seed) == (5, 1, 7)


def test_options_say_why_they_cannot_run(generate, tmp_path) -> None:
    def reason(**kwargs):
        return generate.GenerateOptions(**{"device": "cpu", **kwargs}).isValid()[1]

    assert reason() == ""
    assert reason(count=0) == "The number of pairs must be within 1..1000"
    assert reason(count=10, firstIndex=995).startswith("The first pair index must be within 0..990")
    assert reason(seed=-1) == "The seed must be 0 or more"
    assert reason(temperature=-0.5).startswith("The temperature must be more than 0")
    assert reason(device="gpu7").startswith("unknown device")
    assert reason(outputFolder=str(tmp_path / "nowhere")) == f"The output folder {tmp_path / 'nowhere'} does not exist"
    (tmp_path / "pair_001_moving.nii.gz").write_bytes(b"")
    assert reason(outputFolder=str(tmp_path)).startswith("The output folder already holds pair_001_moving.nii.gz")
    assert reason(outputFolder=str(tmp_path), firstIndex=2) == ""  # other pairs: nothing would be overwritten


def test_generators_and_their_sampling_defaults_come_from_the_installed_models(
    generate, corelib, generator, generator_registry, tiny_registry, tmp_path
) -> None:
    entries = corelib.models.ModelManager(generator_registry, tmp_path).models()
    choice, reason = generate.generatorToRun(entries)
    assert reason == "" and (choice.argument, choice.label) == ("tiny-pairs", "tiny-pairs")
    assert generate.samplingDefaults(choice.config) == {"steps": 8, "temperature": 0.9, "batch_size": 2}
    assert generate.generatorToRun(entries, "other")[1] == "The pair generator 'other' is not installed"
    folder, _ = generate.generatorToRun(entries, str(generator))
    assert folder.argument == str(generator) and generate.samplingDefaults(folder.config)["steps"] == 8
    none = corelib.models.ModelManager(tiny_registry, tmp_path).models()  # affine and deformable only
    assert generate.generatorToRun(none) == (None, "No pair generator is installed")


# --- a real run ---------------------------------------------------------------------------------
def test_pairs_load_where_the_backend_wrote_them_with_the_manifest_figures(
    generate, corelib, scene, slicer_core, generator, tmp_path
) -> None:
    out = tmp_path / "pairs"
    out.mkdir()
    options = _options(generate, generator, count=2, outputFolder=str(out))
    result, _, runs, events = _run(generate, corelib, scene, options, tmp_path)

    assert runs == 1 and {e.stage for e in events} <= set(generate.STAGE_WEIGHTS)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "pair_000_fixed.nii.gz",
        "pair_000_moving.nii.gz",
        "pair_001_fixed.nii.gz",
        "pair_001_moving.nii.gz",
    ]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert result.manifest == manifest and result.complete and result.outputFolder == out
    assert (manifest["seed"], manifest["steps"], manifest["temperature"]) == (5, 8, 0.9)  # the model config's sampling

    # Geometry: a voxel centre is where the file says (NIfTI affine, RAS) and where the model's frame puts it (LPS).
    canonical = np.asarray(json.loads((generator / "config.json").read_text())["canonical_affine"])
    ijk = np.array([[0.0, 0.0, 0.0], [3.0, 5.0, 7.0], [15.0, 2.0, 9.0]])
    for pair in result.pairs:
        for node, key in ((pair.fixedNode, "fixed"), (pair.movingNode, "moving")):
            path = out / manifest["pairs"][pair.index][key]
            lps = world_points_of_voxels(slicer_core, node, ijk)
            np.testing.assert_allclose(lps, ijk @ canonical[:3, :3].T + canonical[:3, 3], atol=1e-4)
            import nibabel as nib

            ras = nib.load(str(path)).affine
            np.testing.assert_allclose(lps * [-1, -1, 1], ijk @ ras[:3, :3].T + ras[:3, 3], atol=1e-4)
            np.testing.assert_allclose(_voxels(node), read_image(path).array, atol=1e-6)

    # The subject hierarchy: one folder, a sub-folder per pair with its two volumes, and the table.
    sh = corelib.results.subjectHierarchy(scene)
    assert sh.GetItemName(result.folderItem).startswith("Synthetic pairs (best, seed 5)")
    for pair in result.pairs:
        assert sh.GetItemParent(pair.folderItem) == result.folderItem
        assert sh.GetItemName(pair.folderItem) == f"pair {pair.index:03d}"
        for node in (pair.fixedNode, pair.movingNode):
            assert sh.GetItemParent(sh.GetItemByDataNode(node)) == pair.folderItem
    assert sh.GetItemParent(sh.GetItemByDataNode(result.tableNode)) == result.folderItem

    # The table: the manifest's figures, row by row.
    table = result.tableNode
    assert table.GetNumberOfRows() == 2 and _table_column(table, "pair") == [0, 1]
    for section, key in (("novelty", "nearest_dice_fixed"), ("novelty", "nearest_token_agreement"), ("realism", "overlap_dice")):
        assert _table_column(table, key) == pytest.approx([p[section][key] for p in manifest["pairs"]], abs=1e-12)
    assert _table_column(table, "memorised") == ["yes" if p["novelty"]["memorised"] else "no" for p in manifest["pairs"]]
    assert _table_column(table, "fixed") == [p.fixedNode.GetName() for p in result.pairs]
    assert table.GetTable().GetColumnByName("displacement_mean_mm") is None  # no realism model: no such figure
    reference = manifest["training_reference"]
    assert float(table.GetAttribute("SynthPairs.training_overlap_dice")) == pytest.approx(reference["overlap_dice"])
    assert table.GetAttribute("SynthPairs.seed") == "5"

    # Two colours: fixed magenta, moving green, window [0, 1]; the slice views blend them.
    for node, rgb in ((result.pairs[1].fixedNode, generate.FIXED_RGB), (result.pairs[1].movingNode, generate.MOVING_RGB)):
        display = node.GetDisplayNode()
        color = scene.GetNodeByID(display.GetColorNodeID())
        assert color.GetColorTransferFunction().GetColor(1.0) == pytest.approx(rgb)
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    shown = generate.showPair(scene, result, 1)
    assert shown is result.pairs[1]
    assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (
        shown.fixedNode.GetID(),
        shown.movingNode.GetID(),
    )
    assert composite.GetForegroundOpacity() == generate.OVERLAY_OPACITY
    assert composite.GetCompositing() == slicer_core.vtkMRMLSliceCompositeNode.Alpha  # the view setting is left alone
    assert "2 pairs (seed 5, best)" in result.summary()


def test_pairs_made_one_run_at_a_time_are_the_pairs_of_one_run(generate, corelib, scene, generator, tmp_path) -> None:
    """keepOnCancel: one backend run per pair, one merged manifest; the same voxels and figures."""
    single, chunked = tmp_path / "single", tmp_path / "chunked"
    single.mkdir(), chunked.mkdir()
    one, _, runs, _ = _run(generate, corelib, scene, _options(generate, generator, count=2, outputFolder=str(single)), tmp_path)
    options = _options(generate, generator, count=2, outputFolder=str(chunked), keepOnCancel=True)
    many, _, chunkedRuns, events = _run(generate, corelib, scene, options, tmp_path)
    assert (runs, chunkedRuns) == (1, 2)
    assert {e.stage for e in events} <= {f"pair {i}: {s}" for i in (0, 1) for s in generate.STAGE_WEIGHTS}
    assert sorted(p.name for p in chunked.iterdir()) == sorted(p.name for p in single.iterdir())
    for a, b in zip(one.pairs, many.pairs):
        np.testing.assert_array_equal(_voxels(a.movingNode), _voxels(b.movingNode))
    strip = lambda m: [{k: v for k, v in p.items() if k != "seconds"} for p in m["pairs"]]  # noqa: E731
    merged = json.loads((chunked / "manifest.json").read_text(encoding="utf-8"))
    assert strip(merged) == strip(one.manifest)
    for key in ("pairs", "memorised", "nearest_dice_max", "nearest_dice_mean"):
        assert merged["summary"][key] == pytest.approx(one.manifest["summary"][key]), key  # the backend's definitions


@pytest.mark.parametrize("keep", [True, False])
def test_cancel_keeps_exactly_the_finished_pairs_only_when_asked(generate, corelib, scene, generator, tmp_path, keep) -> None:
    out = tmp_path / "pairs"
    out.mkdir()
    options = _options(generate, generator, count=3, outputFolder=str(out), keepOnCancel=keep)
    before = len(_volume_nodes(scene))
    cancelRun = 1 if keep else 0  # kept: pair 0's run finished, pair 1's is cancelled while drawing
    result, outcome, runs, _ = _run(generate, corelib, scene, options, tmp_path, cancelRun=cancelRun)
    assert outcome.state == "cancelled" and runs == cancelRun + 1
    if keep:
        assert [p.index for p in result.pairs] == [0] and not result.complete
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "pair_000_fixed.nii.gz", "pair_000_moving.nii.gz"]
        assert [p["index"] for p in json.loads((out / "manifest.json").read_text())["pairs"]] == [0]
        assert len(_volume_nodes(scene)) == before + 2 and result.tableNode.GetNumberOfRows() == 1
        assert "1 pairs of 3 (cancelled" in result.summary() and result.notes
    else:
        assert result is None
        assert not any(out.iterdir()), "without 'keep', a cancel leaves the output folder as it was"
        assert len(_volume_nodes(scene)) == before


# --- the module: scripting, the panel's reason and defaults, "register this pair" -----------------
def test_logic_generate_pairs_returns_the_nodes_and_register_this_pair_fills_the_inputs(
    request, generator_registry, scene, monkeypatch, tmp_path
) -> None:
    module = request.getfixturevalue("synthpairs")
    monkeypatch.setenv("DIFFUSIONREG_MODELS", str(generator_registry))
    monkeypatch.setenv("DIFFUSIONREG_MODELS_DIR", str(tmp_path / "user_models"))
    logic = module.SynthPairsLogic()
    result = logic.generatePairs(2, seed=3, device="cpu", timeout=300)
    assert [p.index for p in result.pairs] == [0, 1] and result.outputFolder is None
    assert result.manifest["model"] == "tiny-pairs" and result.tableNode.GetNumberOfRows() == 2

    widget = module.SynthPairsWidget.__new__(module.SynthPairsWidget)
    node = module.SynthPairsParameterNode()
    for name in module.SynthPairsParameterNode.__annotations__:
        if not hasattr(node, name):
            setattr(node, name, None)
    selected = []
    widget._parameterNode, widget.logic, widget.generated = node, logic, result
    widget.panel = types.SimpleNamespace(selectModality=selected.append)
    widget.ui = types.SimpleNamespace(pairSlider=_Widget(), pairLabel=_Widget())
    widget.ui.pairSlider.value = 1
    widget.onRegisterThisPair()
    assert node.fixedVolume is result.pairs[1].fixedNode and node.movingVolume is result.pairs[1].movingNode
    assert selected == [module.SAMPLE_MODALITY] and node.modality == module.SAMPLE_MODALITY


def test_the_panel_says_no_generator_is_installed_and_shows_the_sampling_defaults(
    request, generator_registry, tiny_registry, monkeypatch, tmp_path
) -> None:
    module = request.getfixturevalue("synthpairs")
    monkeypatch.setenv("DIFFUSIONREG_MODELS_DIR", str(tmp_path / "user_models"))
    logic = module.SynthPairsLogic()
    monkeypatch.setenv("DIFFUSIONREG_MODELS", str(tiny_registry))
    options = module.GenerateOptions(count=2, device="cpu")
    assert logic.generationReason(options) == "No pair generator is installed"
    with pytest.raises(ValueError, match="No pair generator is installed"):
        logic.generatePairs(2, device="cpu")
    monkeypatch.setenv("DIFFUSIONREG_MODELS", str(generator_registry))
    assert logic.generationReason(options) == ""
    assert logic.samplingDefaults("") == {"steps": 8, "temperature": 0.9, "batch_size": 2}
    assert logic.samplingDefaults("tiny-pairs")["temperature"] == 0.9

    # The panel: its boxes' lowest value names the generator's own numbers; the reason it cannot run.
    widget = module.SynthPairsWidget.__new__(module.SynthPairsWidget)
    widget.logic, widget.ui = logic, types.SimpleNamespace(stepsSpinBox=_Widget(), temperatureSpinBox=_Widget())
    widget.generatePanel = types.SimpleNamespace(model="", device="cpu")
    widget._parameterNode = module.SynthPairsParameterNode()
    widget.onGeneratorChanged()
    assert (widget.ui.stepsSpinBox.specialValueText, widget.ui.temperatureSpinBox.specialValueText) == (
        "model default (8)",
        "model default (0.9)",
    )
    options = widget.generateOptions()
    assert (options.count, options.seed, options.temperature, options.steps, options.outputFolder) == (4, 0, 0.0, 0, "")
    assert widget.generateReason() == ""
    widget._parameterNode.generateOutputFolder = str(tmp_path / "nowhere")
    assert widget.generateReason() == f"The output folder {tmp_path / 'nowhere'} does not exist"
    monkeypatch.setenv("DIFFUSIONREG_MODELS", str(tiny_registry))
    widget._parameterNode.generateOutputFolder = ""
    assert widget.generateReason() == "No pair generator is installed"
    widget.onGeneratorChanged()
    assert widget.ui.stepsSpinBox.specialValueText == "model default"


def test_a_file_that_appears_in_the_output_folder_meanwhile_is_not_overwritten(
    generate, corelib, scene, generator, tmp_path
) -> None:
    out = tmp_path / "pairs"
    out.mkdir()
    options = _options(generate, generator, count=2, outputFolder=str(out))
    intruder = out / "pair_001_fixed.nii.gz"
    before = len(_volume_nodes(scene))
    result, outcome, _, _ = _run(generate, corelib, scene, options, tmp_path, duringRun=lambda: intruder.write_bytes(b"mine"))
    assert result is None and outcome.state == "failed" and "already holds pair_001_fixed.nii.gz" in outcome.error
    assert sorted(p.name for p in out.iterdir()) == ["pair_001_fixed.nii.gz"] and intruder.read_bytes() == b"mine"
    assert len(_volume_nodes(scene)) == before
