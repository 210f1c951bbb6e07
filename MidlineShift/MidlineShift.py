"""MidlineShift: the midline shift of a head CT, in millimetres, with landmarks the user can correct.

The module is thin. Its own parts are the input/result panel (``Resources/UI``), the parameter
node, and :class:`MidlineShiftLogic`, which turns them into a ``MidlineOptions`` job
(``MidlineShiftLib/midline_job.py``: export, command line, result import, manual corrections)
and shows the result. Everything else (model and device selectors, dependency install,
Measure <-> Cancel with the reason it is disabled, progress, log) is DiffusionRegCore's panel
kit. Scripting::

    from MidlineShift import MidlineShiftLogic
    result = MidlineShiftLogic().measure(ctNode)
    result.caseMlsMm, result.side, result.flag, result.tableNode, result.markupsNodes

Not a diagnostic device: the models are trained on synthetic shifts (see docs/slicer.md).
"""

import os
import sys
from pathlib import Path

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
)

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4

    def _(text):
        return text

    def translate(context, text):
        return text


def _makeCoreImportable() -> None:
    """Installed, all modules share one folder; from a source checkout DiffusionRegCore is a
    sibling folder, which Slicer may not have put on sys.path yet when this file loads."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.join(os.path.dirname(here), "DiffusionRegCore")):
        if os.path.isfile(os.path.join(folder, "DiffusionRegCore.py")) and folder not in sys.path:
            sys.path.append(folder)


_makeCoreImportable()

from MidlineShiftLib.midline_job import (
    MODALITY,
    TASK,
    MidlineOptions,
    MidlineShiftResult,
    exportTable,
    jumpSlicesToMaximum,
    prepareMidlineJob,
    reconnectCorrections,
)

from DiffusionRegCore import BackendTask, JobModuleLogic, JobModuleWidget, JobPanel, SamplePair
from DiffusionRegCoreLib import model_choice, mrml_io

#: Sample Data entry: a SYNTHETIC shifted head (the SCCT CT template, BSD-2, shifted 8 mm to the
#: patient's left by ``diffusionreg midline synth``; see Resources/Sample/README.md).
SAMPLE_NAME = "DiffusionRegSyntheticMidlineShift"
SAMPLE_CATEGORY = "DiffusionReg"
SAMPLE_NODE_NAMES = ("SyntheticMidlineShiftCT",)
#: The sample file and its sha256, fixed here: Sample Data checks the file against it.
SAMPLE_SHA256 = {"midline_synthetic_ct.nii.gz": "d1362e29e56ca331aef9c4e8f7fef5dc2e72a2c79bb916edfffb9a6d71c78405"}
SAMPLE = SamplePair(
    SAMPLE_NAME,
    SAMPLE_SHA256,
    SAMPLE_NODE_NAMES,
    Path(__file__).resolve().parent / "Resources" / "Icons" / f"{SAMPLE_NAME}.png",
    SAMPLE_CATEGORY,
)
#: The sample's known shift (mm) and side, what the in-Slicer test expects of a trained model.
SAMPLE_TRUTH = (8.0, "left")
#: Python packages the midline networks need besides the deformable path's (MONAI's diffusion UNet).
REQUIREMENTS = Path(__file__).resolve().parent / "Resources" / "requirements-midline.txt"
#: Foreground opacity of the displacement magnitude over the CT.
OVERLAY_OPACITY = 0.4
#: Colours of the flag label: flagged (>= threshold) and below it.
FLAG_STYLE = "color: white; background-color: #c0392b; font-weight: bold; padding: 2px;"
NO_FLAG_STYLE = "color: #1e7d32; font-weight: bold; padding: 2px;"


#
# MidlineShift
#


class MidlineShift(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Midline Shift")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["DiffusionRegCore"]
        self.parent.contributors = ["DiffusionReg developers (DiffusionReg project)"]
        self.parent.helpText = _(
            "Measures the midline shift of a head CT in millimetres with a diffusion model and a deformation "
            "network: the case shift with its side (patient left/right) and the 5 mm flag, per-slice landmarks "
            "(falx line and the shifted structure with its normal position) that you can move to record a manual "
            "measurement beside the automatic one, a table exportable as CSV, and the displacement field as a "
            "transform and a colour map. Needs an installed midline model (none ships yet). Research use only, "
            "not a diagnostic device: the models are trained on synthetic shifts. See docs/slicer.md of the "
            "DiffusionReg repository."
        )
        self.parent.acknowledgementText = _(
            "Midline shift after Gong et al., IPMI 2023 (diffusion models with a deformation network), in the "
            "DiffusionReg extension. Uses 3D Slicer, PyTorch (SlicerPyTorch), MONAI and SimpleITK. The sample is "
            "synthetic, made from the SCCT CT template (Rorden et al. 2012)."
        )
        slicer.app.connect("startupCompleted()", SAMPLE.register)


#
# Parameter node
#


@parameterNodeWrapper
class MidlineShiftParameterNode:
    """The panel's state, saved with the scene.

    inputVolume - the head CT to measure.
    modality, model - the kit's model selectors (midline models are for CT; "" model: the default).
    showResult - overlay the displacement magnitude and jump the slice views to the maximum.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: str = MODALITY
    model: str = ""
    showResult: bool = True


#
# Widget: the module's own input and result; the rest is DiffusionRegCore's JobPanel
#


class MidlineShiftWidget(JobModuleWidget):
    """The input and result panel (``Resources/UI``); the rest is DiffusionRegCore's
    :class:`JobModuleWidget` and :class:`JobPanel` (its run button reads "Measure")."""

    task = TASK
    requester = _("Midline Shift")
    runText = _("Measure")
    firstVolumeParameter = "inputVolume"
    libModules = ("MidlineShiftLib.midline_job",)
    sample = SAMPLE
    sampleModality = MODALITY

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.result: MidlineShiftResult | None = None

    def createLogic(self):
        return MidlineShiftLogic()

    def setupModule(self) -> None:
        self.ui.exportTableButton.connect("clicked(bool)", self.onExportTable)
        self.ui.showNormalAnatomyCheckBox.connect("toggled(bool)", self.onShowNormalAnatomy)
        # A loaded scene has the lines and tables but not their observers: corrections resume.
        self.addObserver(
            slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, lambda caller, event: reconnectCorrections(slicer.mrmlScene)
        )
        reconnectCorrections(slicer.mrmlScene)

    def onSceneStartClose(self, caller, event) -> None:
        super().onSceneStartClose(caller, event)
        self.showResultNodes(None)

    # --- what the kit asks ---------------------------------------------------------------
    def startRegistration(self, panel: JobPanel) -> BackendTask:
        task = super().startRegistration(panel)  # raises when the run cannot start: the labels stay
        self.ui.resultLabel.text = _("Measuring...")
        return task

    def onTaskFinished(self, task: BackendTask) -> None:
        if task.state != "completed":
            self.ui.resultLabel.text = _("No result ({state}).").format(state=task.state)
        super().onTaskFinished(task)

    def onResult(self, result: MidlineShiftResult) -> None:
        for note in result.notes:
            self.panel.log(note)
        self.panel.log(result.summary())
        self.showResultNodes(result)

    def showResultNodes(self, result: MidlineShiftResult | None) -> None:
        """The large case MLS with its side, the flag in its colour, the table; None clears them."""
        self.result = result
        self.ui.exportTableButton.enabled = result is not None
        self.ui.showNormalAnatomyCheckBox.enabled = result is not None and result.transformNode is not None
        self.ui.showNormalAnatomyCheckBox.blockSignals(True)
        self.ui.showNormalAnatomyCheckBox.checked = False
        self.ui.showNormalAnatomyCheckBox.blockSignals(False)
        if result is None:
            self.ui.caseMlsLabel.text = "-- mm"
            self.ui.flagLabel.text = ""
            self.ui.flagLabel.setStyleSheet("")
            self.ui.resultLabel.text = _("No result yet.")
            self.ui.tableView.setMRMLTableNode(None)
            return
        side = {"left": _("patient left"), "right": _("patient right")}.get(result.side, _("no side"))
        self.ui.caseMlsLabel.text = f"{result.caseMlsMm:.1f} mm ({side})"
        if result.flag:
            self.ui.flagLabel.text = _("FLAG: shift >= {mm:g} mm").format(mm=result.flagMm)
            self.ui.flagLabel.setStyleSheet(FLAG_STYLE)
        else:
            self.ui.flagLabel.text = _("Below {mm:g} mm").format(mm=result.flagMm)
            self.ui.flagLabel.setStyleSheet(NO_FLAG_STYLE)
        where = (
            _("Maximum on slice {index}.").format(index=result.sliceOfMaximum)
            if result.sliceOfMaximum is not None
            else _("No slice could be measured.")
        )
        self.ui.resultLabel.text = f"{where} {result.report.get('model', '')}, {result.seconds:.1f} s"
        self.ui.tableView.setMRMLTableNode(result.tableNode)

    def onExportTable(self) -> None:
        if self.result is None:
            return
        path = qt.QFileDialog.getSaveFileName(
            None, _("Save the midline table"), f"{self.result.tableNode.GetName()}.csv", _("CSV files (*.csv)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to save the table."), waitCursor=True):
            written = exportTable(self.result.tableNode, path)
            self.panel.log(_("Table saved to {path}").format(path=written))

    def onShowNormalAnatomy(self, checked: bool) -> None:
        if self.result is not None and self._parameterNode and self._parameterNode.inputVolume:
            self.logic.showNormalAnatomy(self._parameterNode.inputVolume, self.result, checked)

    def onLoadSampleData(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            ct = self.logic.loadSampleData()
            self._parameterNode.inputVolume = ct
            slicer.util.setSliceViewerLayers(background=ct, fit=True)


#
# Logic
#


class MidlineShiftLogic(JobModuleLogic):
    """Midline-shift measurement, callable without the panel.

    ``processFactory`` (default: the real process runner) is injectable for tests.
    ``measure(ctNode, ...)`` blocks and returns a ``MidlineShiftResult``; ``start(options)``
    returns the running :class:`DiffusionRegCore.BackendTask` (the panel uses it).
    """

    parameterNodeClass = MidlineShiftParameterNode

    def requirementFiles(self) -> list:
        """The midline path: the deformable path's packages (MONAI) and MONAI's diffusion UNet's (einops)."""
        return self.coreLogic.requirementFiles("requirements-deformable.txt") + [REQUIREMENTS]

    @staticmethod
    def optionsFromParameterNode(p, device: str = "auto") -> MidlineOptions:
        return MidlineOptions(p.inputVolume, modality=p.modality, model=p.model, device=device)

    def modelReason(self, options: MidlineOptions) -> str:
        """Why the chosen model cannot run ("" when it can), e.g. "No midline model for CT is installed"."""
        entries = self.coreLogic.modelManager().models(TASK)
        return model_choice.modelToRun(entries, TASK, options.modality, options.model)[1]

    def prepare(self, options: MidlineOptions):
        """The job for ``options`` (the CT exported); raises ValueError with the reason it cannot run."""
        reason = options.isValid()[1] or self.modelReason(options)
        if reason:
            raise ValueError(reason)
        core = self.coreLogic
        python, env = core.pythonExecutable(), core.backendEnvironment()  # may fail: before any folder exists
        return prepareMidlineJob(options, slicer.mrmlScene, core.createWorkFolder(), python, env)

    def start(
        self,
        options: MidlineOptions,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        onProgress=None,
        onLog=None,
        onFinished=None,
    ) -> BackendTask:
        """Start the measurement in the background; the result is shown when it completes."""
        job = self.prepare(options)

        def finished(task: BackendTask) -> None:
            if task.state == "completed" and showResult:
                self.showResult(options.inputVolume, task.outputs)
            if onFinished:
                onFinished(task)

        return self.coreLogic.startJob(
            job, keepTemporaryFiles=keepTemporaryFiles, onProgress=onProgress, onLog=onLog, onFinished=finished
        )

    def measure(
        self,
        ctNode,
        model: str = "",
        device: str | None = None,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        timeout: float | None = None,
        onProgress=None,
        onLog=None,
    ) -> MidlineShiftResult:
        """Measure ``ctNode`` and wait (Slicer stays responsive).

        Returns the case MLS (``caseMlsMm``, ``side``, ``flag``, ``sliceOfMaximum``), the
        ``tableNode``, the ``markupsNodes`` (falx and shift lines per slice), the
        ``transformNode`` (CT -> normal anatomy) and the ``magnitudeNode``. ``model``: "" for the
        default registered midline model (none ships yet), else a registered model's name or an
        imported model's path (``ModelManager.importFile(...).modelArgument()``). ``device``: auto, cpu,
        cuda, cuda:N (default: the panel's choice). Dependencies are not installed here. Raises
        ValueError for unusable inputs (no midline model installed included) and RuntimeError
        when the run fails or is cancelled.
        """
        options = MidlineOptions(ctNode, model=model, device=device or self.coreLogic.savedDevice())
        result = self.coreLogic.runToEnd(self.prepare(options), timeout, keepTemporaryFiles, onProgress, onLog)
        if showResult:
            self.showResult(ctNode, result)
        return result

    @staticmethod
    def showResult(ctNode, result: MidlineShiftResult) -> None:
        """The magnitude over the CT (with a colour bar) and every slice view on the slice of the maximum."""
        slicer.util.setSliceViewerLayers(background=ctNode, foreground=result.magnitudeNode, foregroundOpacity=OVERLAY_OPACITY)
        try:  # the colour bar (Slicer >= 5.0's Colors module)
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(result.magnitudeNode)
        except AttributeError:
            legend = None
        if legend is not None:
            legend.SetTitleText(_("Displacement (mm)"))
        jumpSlicesToMaximum(slicer.mrmlScene, result)

    @staticmethod
    def showNormalAnatomy(ctNode, result: MidlineShiftResult, show: bool = True) -> None:
        """Put the CT under the result's transform (shown as the normal anatomy), or back at world level."""
        if show:
            if ctNode.GetParentTransformNode() is not None and not mrml_io.sameNode(
                ctNode.GetParentTransformNode(), result.transformNode
            ):
                raise ValueError(f"'{ctNode.GetName()}' is under another transform; harden it first")
            ctNode.SetAndObserveTransformNodeID(result.transformNode.GetID())
        elif mrml_io.sameNode(ctNode.GetParentTransformNode(), result.transformNode):
            ctNode.SetAndObserveTransformNodeID(None)

    # --- sample data ----------------------------------------------------------------------
    @staticmethod
    def loadSampleData():
        """Load the synthetic shifted head; returns its volume node."""
        return SAMPLE.load()[0]


#
# Test
#


class MidlineShiftTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). The measurement test measures the synthetic
    sample end to end on the CPU and checks the flag and the table; without PyTorch, MONAI or an
    installed midline model it is skipped with a message saying what is missing (it never installs
    anything; no midline model ships yet)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # The result import and manual corrections run in the MRML tier (Testing/mrml/test_midline_module.py).
        self.setUp()
        self.test_parameterNode()
        self.setUp()
        self.test_measurement()

    def test_parameterNode(self):
        self.delayDisplay("Parameter node round trip")
        logic = MidlineShiftLogic()
        p = logic.getParameterNode()
        ct = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
        p.inputVolume = ct
        p.model = "my-model"
        options = logic.optionsFromParameterNode(logic.getParameterNode(), device="cpu")
        self.assertEqual((options.inputVolume.GetID(), options.model, options.device), (ct.GetID(), "my-model", "cpu"))
        self.assertIn("no image data", options.isValid()[1])
        self.delayDisplay("Test passed")

    def _skipReason(self) -> str:
        from DiffusionRegCore import DiffusionRegCoreLogic
        from DiffusionRegCoreLib import install

        if install.installedVersion("torch") is None:
            return "PyTorch is not installed in this Slicer: install it with the PyTorch Utils module"
        plan = DiffusionRegCoreLogic().dependencyPlan(MidlineShiftLogic().requirementFiles())
        if plan.pipRequirements:
            return "missing Python packages: " + ", ".join(plan.pipRequirements) + " (press Install dependencies)"
        reason = MidlineShiftLogic().modelReason(MidlineOptions())
        if reason:
            return reason
        if not SAMPLE.available():
            return "the sample data file is missing from Resources/Sample"
        return ""

    def test_measurement(self):
        reason = self._skipReason()
        if reason:
            self.delayDisplay(f"Skipping the measurement test: {reason}")
            self.skipTest(reason)
        self.delayDisplay("Loading the synthetic sample")
        logic = MidlineShiftLogic()
        ct = logic.loadSampleData()
        self.delayDisplay("Measuring (CPU)")
        result = logic.measure(ct, device="cpu", timeout=1800)
        table = result.tableNode
        self.assertGreater(table.GetNumberOfRows(), 0)
        self.assertEqual(len(result.markupsNodes), 2 * table.GetNumberOfRows())
        shift, side = SAMPLE_TRUTH
        self.assertTrue(result.flag, f"the {shift:g} mm synthetic shift is not flagged: {result.summary()}")
        self.assertEqual(result.side, side)
        flags = [table.GetCellText(r, table.GetColumnIndex("flag")) for r in range(table.GetNumberOfRows())]
        self.assertIn("FLAG", flags)
        self.delayDisplay(f"Test passed: {result.summary()}")
