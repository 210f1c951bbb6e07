"""MidlineShift without Qt: ``MidlineShiftLogic().measure(ctNode)`` -> ``diffusionreg midline`` -> nodes.

The module file is imported with the panel kit's Qt stand-ins (``test_mrml_panel_kit``); the rest
is real: slicer-core's MRML (the markups JSON reader, the table and transform storage nodes),
the model manager importing a model the way the panel's "Import..." does, and one real backend
process measuring the oblique HU+1024 phantom CT of ``Testing/test_midline_cli.py`` with its tiny
model (a uniform shift of known size; the test is about files, geometry and the manual
correction, not accuracy). Checked: with no midline model installed the run is refused with the
reason; the landmark lines sit where the backend's report puts them (LPS on disk, RAS in the
scene, converted by Slicer's reader); the table holds one row per slice and saves as CSV; the
field is a grid transform whose to-parent carries each shifted structure onto its normal
position, as SimpleITK maps the file; the magnitude volume is ``|u|`` on the CT grid; the slice
views jump to the maximum; moving control points writes the manual MLS of a hand calculation.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_midline_cli import ct_path, placement, tiny_model  # noqa: F401 (fixtures shared with the CLI test)

from .conftest import REPO, sitk_map_points
from .test_mrml_panel_kit import _fake_modules

pytestmark = pytest.mark.mrml

FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture(scope="module")
def measured(slicer_core, corelib, tiny_model, ct_path, tmp_path_factory):  # noqa: F811
    """The module's scripting path end to end, once: ``(module, scene, ct, result, work folder, refusal)``."""
    tmp = tmp_path_factory.mktemp("midline-module")
    scene = slicer_core.vtkMRMLScene()
    with pytest.MonkeyPatch.context() as patch:
        for name, module in _fake_modules([]).items():
            patch.setitem(sys.modules, name, module)
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = lambda cls: cls  # Slicer-only; identity here
        patch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
        app = types.SimpleNamespace(
            temporaryPath=str(tmp / "temp"),
            slicerHome=str(tmp / "no-slicer"),
            processEvents=lambda: None,
            connect=lambda *a: None,
        )
        patch.setattr(slicer_core, "app", app, raising=False)
        patch.setattr(slicer_core, "mrmlScene", scene, raising=False)
        shown = _Recorder()
        patch.setattr(slicer_core.util, "setSliceViewerLayers", shown)
        patch.setenv("DIFFUSIONREG_MODELS_DIR", str(tmp / "user-models"))
        for folder in (REPO / "DiffusionRegCore", REPO / "MidlineShift"):
            if str(folder) not in sys.path:
                patch.syspath_prepend(str(folder))
        for name in ("DiffusionRegCore", "MidlineShift"):
            sys.modules.pop(name, None)
        core = importlib.import_module("DiffusionRegCore")
        patch.setattr(core.DiffusionRegCoreLogic, "pythonExecutable", staticmethod(lambda: sys.executable))
        module = importlib.import_module("MidlineShift")
        module.shown = shown

        ct = corelib_import_volume(ct_path, scene)
        red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
        red.SetLayoutName("Red")
        red.SetOrientationToAxial()
        logic = module.MidlineShiftLogic()
        with pytest.raises(ValueError) as refusal:
            logic.measure(ct, device="cpu")
        entry = logic.coreLogic.modelManager().importFile(tiny_model, task="midline", modality="ct")
        # Imported models run when chosen (the panel selects one right after "Import..."); the
        # default ("") is a registry model, and none ships yet.
        model = entry.modelArgument()
        assert entry.available and logic.modelReason(module.MidlineOptions(ct, model=model)) == ""

        result = logic.measure(ct, model=model, device="cpu", keepTemporaryFiles=True, timeout=600)

        (work,) = [p for p in (tmp / "temp" / "DiffusionReg").iterdir() if (p / "report.json").is_file()]
        yield types.SimpleNamespace(
            module=module, scene=scene, ct=ct, result=result, work=work, refusal=str(refusal.value), red=red
        )
        for name in ("DiffusionRegCore", "MidlineShift"):
            sys.modules.pop(name, None)
    scene.Clear(1)


def corelib_import_volume(path: Path, scene):
    from DiffusionRegCoreLib import mrml_io

    return mrml_io.importVolume(path, scene, name="head ct")


def _world(node, index: int) -> np.ndarray:
    point = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, point)
    return np.array(point)


def _report(measured) -> dict:
    return json.loads((measured.work / "report.json").read_text(encoding="utf-8"))


def test_no_installed_model_is_refused_with_the_reason(measured) -> None:
    assert measured.refusal == "No midline model for CT is installed"


def test_result_is_the_backends_case_measurement(measured) -> None:
    result, report = measured.result, _report(measured)
    assert result.caseMlsMm == pytest.approx(report["case_mls_mm"]) and result.caseMlsMm > 0
    assert (result.side, result.flag, result.flagMm) == (report["side"], report["flag"], report["flag_threshold_mm"])
    assert result.sliceOfMaximum == report["slice_of_maximum"]
    assert result.summary().startswith(f"MLS {report['case_mls_mm']:.1f} mm (patient {report['side']})")
    assert any("HU + 1024" in note for note in result.notes)
    assert any("by +12 HU to the soft-tissue calibration" in note for note in result.notes), result.notes
    table = result.tableNode
    assert table.GetAttribute("MidlineShift.caseMlsMm") == f"{report['case_mls_mm']:.3f}"
    assert table.GetAttribute("MidlineShift.side") == report["side"]


def test_landmark_lines_sit_where_the_backend_put_them(measured, slicer_core) -> None:
    """Slicer's markups reader turns the file's LPS into RAS; the lines keep those world positions."""
    result, report = measured.result, _report(measured)
    assert [s.index for s in result.slices] == [s["index"] for s in report["slices"]]
    assert len(result.markupsNodes) == 2 * len(report["slices"])
    for lines, truth in zip(result.slices, report["slices"]):
        lps = truth["landmarks_lps_mm"]
        for node, names in ((lines.falxNode, ("anterior_falx", "posterior_falx")), (lines.shiftNode, ("shifted", "normal"))):
            assert node.GetClassName() == "vtkMRMLMarkupsLineNode"
            for n, name in enumerate(names):
                np.testing.assert_allclose(_world(node, n), FLIP * np.asarray(lps[name]), atol=1e-3)
                assert node.GetNthControlPointLabel(n) == f"{name} s{truth['index']}"
        assert lines.shiftNode.GetLineLengthWorld() == pytest.approx(truth["mls_mm"], abs=1e-3)
    carriers = measured.scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    assert carriers.GetNumberOfItems() == 0, "the loaded point list is only the carrier of the lines"


def test_table_has_one_row_per_slice_and_saves_as_csv(measured, tmp_path: Path) -> None:
    job = sys.modules["MidlineShiftLib.midline_job"]
    result, report = measured.result, _report(measured)
    table = result.tableNode
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["slice", "z_template_mm", "automatic_mls_mm", "side", "manual_mls_mm", "flag"]
    assert table.GetNumberOfRows() == len(report["slices"])
    column = {name: n for n, name in enumerate(names)}
    for row, truth in enumerate(report["slices"]):
        assert int(table.GetCellText(row, column["slice"])) == truth["index"]
        assert float(table.GetCellText(row, column["automatic_mls_mm"])) == pytest.approx(truth["mls_mm"], abs=1e-3)
        assert table.GetCellText(row, column["manual_mls_mm"]) == ""
        flagged = truth["mls_mm"] >= report["flag_threshold_mm"]
        assert table.GetCellText(row, column["flag"]) == ("FLAG" if flagged else "")
    saved = job.exportTable(table, tmp_path / "midline.csv")
    rows = list(csv.DictReader(saved.open(encoding="utf-8")))
    assert [r["slice"] for r in rows] == [str(s["index"]) for s in report["slices"]]
    assert float(rows[0]["automatic_mls_mm"]) == pytest.approx(report["slices"][0]["mls_mm"], abs=1e-3)


def test_field_is_a_transform_carrying_shifted_onto_normal(measured, mrml_io) -> None:
    """To-parent = the file's map (as SimpleITK reads it); the CT under the node shows the normal anatomy."""
    import vtk

    result, report = measured.result, _report(measured)
    node = result.transformNode
    assert not node.IsLinear()
    shifted = np.array([s["landmarks_lps_mm"]["shifted"] for s in report["slices"]])
    normal = np.array([s["landmarks_lps_mm"]["normal"] for s in report["slices"]])
    toParent = node.GetTransformToParent()
    mapped = np.array([FLIP * np.array(toParent.TransformPoint((FLIP * p).tolist())) for p in shifted])
    np.testing.assert_allclose(mapped, sitk_map_points(measured.work / "field.nrrd", shifted), atol=1e-3)
    np.testing.assert_allclose(mapped, normal, atol=0.05)
    back = vtk.vtkGeneralTransform()
    back.Concatenate(node.GetTransformFromParent())
    np.testing.assert_allclose([FLIP * np.array(back.TransformPoint((FLIP * p).tolist())) for p in normal], shifted, atol=0.1)

    module = measured.module
    module.MidlineShiftLogic.showNormalAnatomy(measured.ct, result, True)
    assert measured.ct.GetParentTransformNode().GetID() == node.GetID()
    module.MidlineShiftLogic.showNormalAnatomy(measured.ct, result, False)
    assert measured.ct.GetParentTransformNode() is None


def test_magnitude_is_the_field_length_on_the_ct_grid(measured, mrml_io) -> None:
    import SimpleITK as sitk
    from vtk.util import numpy_support

    job = sys.modules["MidlineShiftLib.midline_job"]
    magnitude = measured.result.magnitudeNode
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(magnitude), mrml_io.volumeIjkToRas(measured.ct), atol=1e-4)
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(measured.work / "field.nrrd"), sitk.sitkVectorFloat64))
    image = magnitude.GetImageData()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(field.shape[:3])
    np.testing.assert_allclose(values, np.linalg.norm(field, axis=-1), atol=1e-4)
    assert values.max() > 0
    display = magnitude.GetDisplayNode()
    color = measured.scene.GetNodeByID(display.GetColorNodeID())
    assert color.GetName() == job.MAGNITUDE_COLOR_NAME
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((10.0, 5.0))


def test_result_is_shown_and_the_views_jump_to_the_maximum(measured) -> None:
    result = measured.result
    assert measured.module.shown.calls[-1]["background"] is measured.ct
    assert measured.module.shown.calls[-1]["foreground"] is result.magnitudeNode
    maximum = next(lines for lines in result.slices if lines.index == result.sliceOfMaximum)
    centre = [measured.red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    np.testing.assert_allclose(centre, _world(maximum.shiftNode, 0), atol=1e-6)


def test_moving_points_records_the_manual_measurement_of_a_hand_calculation(measured) -> None:
    """Falx line and shifted structure moved to chosen RAS points; the table gets their distance."""
    job = sys.modules["MidlineShiftLib.midline_job"]
    result = measured.result
    lines = result.slices[0]
    table = result.tableNode
    row = job.rowOfSlice(table, lines.index)
    manual = table.GetColumnIndex("manual_mls_mm")
    flag = table.GetColumnIndex("flag")
    automatic = table.GetCellText(row, table.GetColumnIndex("automatic_mls_mm"))

    lines.falxNode.SetNthControlPointPositionWorld(0, 10.0, -50.0, 20.0)
    lines.falxNode.SetNthControlPointPositionWorld(1, 10.0, 70.0, 20.0)
    lines.shiftNode.SetNthControlPointPositionWorld(0, 16.5, 3.0, 20.0)
    assert table.GetCellText(row, manual) == "6.500"  # a falx line along y at x = 10: |16.5 - 10|
    assert table.GetCellText(row, flag) == "FLAG"

    # Tilted falx (10, -50, 20) -> (13, 70, 20): |(6.5, 53, 0) x (3, 120, 0)| / |(3, 120, 0)| = 621 / sqrt(14409).
    lines.falxNode.SetNthControlPointPositionWorld(1, 13.0, 70.0, 20.0)
    assert float(table.GetCellText(row, manual)) == pytest.approx(621.0 / math.sqrt(14409.0), abs=5e-4)

    # The structure back near the line: (2, 53, 0) x (3, 120, 0) = 81 -> 0.675 mm, below the flag.
    lines.shiftNode.SetNthControlPointPositionWorld(0, 12.0, 3.0, 20.0)
    assert float(table.GetCellText(row, manual)) == pytest.approx(81.0 / math.sqrt(14409.0), abs=5e-4)
    assert table.GetCellText(row, flag) == ""
    assert table.GetCellText(row, table.GetColumnIndex("automatic_mls_mm")) == automatic
    others = [table.GetCellText(r, manual) for r in range(table.GetNumberOfRows()) if r != row]
    assert others == [""] * len(others), "only the edited slice gets a manual value"


def test_corrections_reconnect_from_the_scene(measured) -> None:
    """After a saved scene is loaded the observers are gone: the lines are found again by their
    table reference and attributes, and one set of observers per table updates it."""
    job = sys.modules["MidlineShiftLib.midline_job"]
    result = measured.result
    result.corrections.stop()
    lines = result.slices[-1]
    table = result.tableNode
    row = job.rowOfSlice(table, lines.index)
    manual = table.GetColumnIndex("manual_mls_mm")
    lines.shiftNode.SetNthControlPointPositionWorld(0, 0.0, 0.0, 0.0)
    assert table.GetCellText(row, manual) == "", "stopped: nothing observes the lines"

    (corrections,) = job.reconnectCorrections(measured.scene)
    assert corrections.tableNode is table and sorted(corrections.slices) == [s.index for s in result.slices]
    (again,) = job.reconnectCorrections(measured.scene)
    assert again is not corrections and corrections._observations == [], "replaced, not doubled"
    assert list(job._ACTIVE.values()) == [again]
    lines.falxNode.SetNthControlPointPositionWorld(0, 3.0, -40.0, 0.0)
    lines.falxNode.SetNthControlPointPositionWorld(1, 3.0, 40.0, 0.0)
    assert table.GetCellText(row, manual) == "3.000"


def test_perpendicular_distance_refuses_a_falx_line_without_length(measured) -> None:
    job = sys.modules["MidlineShiftLib.midline_job"]
    assert job.perpendicularDistanceMm((3.0, 4.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 9.0)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no length"):
        job.perpendicularDistanceMm((1.0, 0.0, 0.0), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0))


def test_bad_inputs_are_refused_with_one_sentence(measured) -> None:
    job = sys.modules["MidlineShiftLib.midline_job"]
    assert job.MidlineOptions().isValid() == (False, "Select the CT volume")
    empty = measured.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert job.MidlineOptions(empty).isValid() == (False, "The CT volume has no image data")
    assert "not 'mri'" in job.MidlineOptions(measured.ct, modality="mri").isValid()[1]
    assert job.MidlineOptions(measured.ct, modality="any").isValid() == (True, "")  # imported without a modality
    assert job.MidlineOptions(measured.ct, device="gpu0").isValid()[0] is False
