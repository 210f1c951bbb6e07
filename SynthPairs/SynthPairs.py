"""SynthPairs: deformable, inverse-consistent registration of two volumes in a panel.

The module is thin. Its own parts are the inputs/outputs/options panel (``Resources/UI``), the
parameter node, and :class:`SynthPairsLogic`, which turns them into a ``DeformableOptions`` job
(``SynthPairsLib/deformable_job.py``: export, command line, result import, "register as
displayed", the chained affine run) and shows the result. Everything else (model and device
selectors, dependency install, Register <-> Cancel, progress, log) is DiffusionRegCore's panel
kit. Scripting::

    from SynthPairs import SynthPairsLogic
    logic = SynthPairsLogic()
    result = logic.register(fixedNode, movingNode, modality="lung-vessels")
    result.transformNode, result.inverseTransformNode, result.jacobianNode, result.summary()

The "Generate pairs" half of the module (issue 14) needs the pair generator backend
(``diffusionreg synth``, issue 12) and is not here yet.
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
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


def _addSiblingModulesToPath() -> None:
    """From a source checkout the kit and SpatialDiffusionReg (the chained affine job) are sibling
    folders that Slicer may not have put on sys.path yet when this file loads; installed, all
    modules share one folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("DiffusionRegCore", "SpatialDiffusionReg"):
        folder = os.path.join(root, name)
        if os.path.isfile(os.path.join(folder, f"{name}.py")) and folder not in sys.path:
            sys.path.append(folder)


_addSiblingModulesToPath()

from SynthPairsLib.deformable_job import (
    MODEL_DEFAULT,
    QUALITY_DEFAULT,
    TASK,
    DeformableOptions,
    DeformableResult,
    QualityChoice,
    prepareRegistration,
    qualityChoices,
    qualityReason,
)

from DiffusionRegCore import BackendTask, DiffusionRegCoreLogic, JobModuleLogic, JobModuleWidget, JobPanel, SamplePair
from DiffusionRegCoreLib import model_choice

#: The affine task whose installed models "run the affine first" can use.
AFFINE_TASK = "affine"
#: Sample Data entry of the extension's lung vessel pair (inspiration fixed, expiration moving).
SAMPLE_NAME = "DiffusionRegLungPair"
SAMPLE_CATEGORY = "DiffusionReg"
SAMPLE_NODE_NAMES = ("DiffusionRegLungFixed", "DiffusionRegLungMoving")
#: The sample files and their sha256, fixed here: Sample Data checks the files against these
#: (a checksum computed from the file it checks would check nothing).
SAMPLE_SHA256 = {
    "lung_vessels_fixed.nii.gz": "11dad3ce135ac2353717cc953ca84356f5e5858a8eaeea4c5390b0e5cfc2dc0e",
    "lung_vessels_moving.nii.gz": "8b0b3a5d8bc57dddb1509d63b9bc395b0ae1a1e5c50f2f16b0cd6e26df7a039a",
}
#: The sample pair is binary lung vessel maps, the shipped lung-vessels model's modality.
SAMPLE_MODALITY = "lung-vessels"
SAMPLE = SamplePair(
    SAMPLE_NAME,
    SAMPLE_SHA256,
    SAMPLE_NODE_NAMES,
    Path(__file__).resolve().parent / "Resources" / "Icons" / f"{SAMPLE_NAME}.png",
    SAMPLE_CATEGORY,
)


#
# SynthPairs
#


class SynthPairs(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SynthPairs")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DiffusionRegCore", "SpatialDiffusionReg"]
        self.parent.contributors = ["DiffusionReg developers (DiffusionReg project)"]
        self.parent.helpText = _(
            "Deformable, inverse-consistent registration of a moving volume to a fixed volume (SITReg brain MRI, "
            "ICON lung vessels, and any installed deformable model that fits). The result is a grid transform "
            "(the moving volume is shown through it; the fixed volume never moves), its inverse as a second grid "
            "transform, and the Jacobian determinant map (1 white, shrinking blue, growing red, folding yellow). "
            "'Run the affine first' starts from a Spatial Diffusion Registration result. The computation runs in a "
            "separate process; Cancel stops it. See docs/slicer.md of the DiffusionReg repository."
        )
        self.parent.acknowledgementText = _(
            "Deformable registration in the DiffusionReg extension (SITReg; two-step ICON as in 'Unleashing "
            "Registration'). Uses 3D Slicer, PyTorch (SlicerPyTorch), MONAI and SimpleITK."
        )
        slicer.app.connect("startupCompleted()", SAMPLE.register)


#
# Parameter node
#


@parameterNodeWrapper
class SynthPairsParameterNode:
    """The Register panel's state, saved with the scene.

    fixedVolume, movingVolume - the volumes to register (moving is aligned to fixed).
    initialTransform - optional linear start (fixed -> the moving volume's own coordinates).
    runAffineFirst, affineModality - chain Spatial Diffusion Registration (that modality's affine model) first.
    fixedLabels, movingLabels - optional label maps: Dice before/after in the result.
    outputTransform, outputInverseTransform, outputJacobian - results (created when None).
    outputVolume - optional: moving resampled onto the fixed grid.
    modality, model - deformable model choice ("" model: the modality's default).
    quality - speed/accuracy preset of the model's config ("default": the model's own settings).
    instanceOptimization, refineIterations - -1 for the chosen quality's number, 0 to switch off.
    showResult - put moving under the transform and show the overlay when done.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    initialTransform: vtkMRMLTransformNode
    runAffineFirst: bool = False
    affineModality: str = "mri"
    fixedLabels: vtkMRMLLabelMapVolumeNode
    movingLabels: vtkMRMLLabelMapVolumeNode
    outputTransform: vtkMRMLTransformNode
    outputInverseTransform: vtkMRMLTransformNode
    outputJacobian: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    modality: str = SAMPLE_MODALITY
    model: str = ""
    quality: str = QUALITY_DEFAULT
    instanceOptimization: Annotated[int, WithinRange(MODEL_DEFAULT, 100000)] = MODEL_DEFAULT
    refineIterations: Annotated[int, WithinRange(MODEL_DEFAULT, 100000)] = MODEL_DEFAULT
    showResult: bool = True


#
# Widget: the module's own inputs; the rest is DiffusionRegCore's JobPanel
#


class SynthPairsWidget(JobModuleWidget):
    """The Register panel's inputs, outputs, options and result line (``Resources/UI``); the rest is
    DiffusionRegCore's :class:`JobModuleWidget` and :class:`JobPanel`."""

    task = TASK
    requester = _("SynthPairs")
    libModules = ("SpatialDiffusionRegLib.affine_job", "SynthPairsLib.deformable_job")
    sample = SAMPLE
    sampleModality = SAMPLE_MODALITY

    def createLogic(self):
        return SynthPairsLogic()

    def setupModule(self) -> None:
        self.ui.affineModalityComboBox.connect("currentIndexChanged(int)", self.onAffineModalityChanged)
        self.ui.qualityComboBox.connect("currentIndexChanged(int)", self.onQualityChanged)
        self.populateAffineModalities()

    def enter(self) -> None:
        super().enter()
        self.populateAffineModalities()

    def setParameterNode(self, inputParameterNode) -> None:
        super().setParameterNode(inputParameterNode)
        if self._parameterNode:
            index = self.ui.affineModalityComboBox.findData(self._parameterNode.affineModality)
            if index >= 0:
                self.ui.affineModalityComboBox.currentIndex = index

    def onParametersChanged(self) -> None:
        self.ui.affineModalityComboBox.enabled = self._parameterNode.runAffineFirst

    def onModelSelection(self) -> None:
        """The kit's selectors choose modality and model; the quality box offers that model's presets."""
        super().onModelSelection()
        if self.panel is None:  # called while the kit builds its selectors
            return
        self.populateQualities()

    def populateQualities(self) -> None:
        """The chosen model's qualities (its config), fastest first; the saved one stays when offered."""
        choices = self.logic.qualities(self.panel.modality, self.panel.model) if self.panel.modality else []
        combo = self.ui.qualityComboBox
        wanted = self._parameterNode.quality if self._parameterNode else QUALITY_DEFAULT
        combo.blockSignals(True)
        try:
            combo.clear()
            for choice in choices:
                combo.addItem(choice.name, choice.name)
            index = combo.findData(wanted)
            combo.currentIndex = index if index >= 0 else combo.findData(QUALITY_DEFAULT)
        finally:
            combo.blockSignals(False)
        if self._parameterNode and combo.currentData and combo.currentData != self._parameterNode.quality:
            self._parameterNode.quality = combo.currentData  # a quality this model lacks is not kept
        self.showQualityIterations(next((c for c in choices if c.name == combo.currentData), None))

    def onQualityChanged(self, index: int) -> None:
        """A quality chosen: the iteration boxes go back to its numbers (shown in brackets)."""
        name = self.ui.qualityComboBox.currentData
        if not self._parameterNode or not name:
            return
        self._parameterNode.quality = name
        self._parameterNode.instanceOptimization = MODEL_DEFAULT
        self._parameterNode.refineIterations = MODEL_DEFAULT
        choices = self.logic.qualities(self.panel.modality, self.panel.model) if self.panel.modality else []
        self.showQualityIterations(next((c for c in choices if c.name == name), None))

    def showQualityIterations(self, choice: QualityChoice | None) -> None:
        """The iteration boxes' lowest value says what the quality runs, e.g. 'fast preset (0)'."""
        default = choice is None or choice.name == QUALITY_DEFAULT
        label = _("model default") if default else _("{quality} preset").format(quality=choice.name)
        values = (None, None) if choice is None else (choice.instanceOptimization, choice.refineIterations)
        for box, value in zip((self.ui.instanceOptimizationSpinBox, self.ui.refineIterationsSpinBox), values):
            box.specialValueText = f"{label} ({value})" if value is not None else label

    def populateAffineModalities(self) -> None:
        """'Run the affine first' offers the modalities an installed affine model supports."""
        combo = self.ui.affineModalityComboBox
        previous = combo.currentData
        combo.blockSignals(True)
        try:
            combo.clear()
            for modality in self.logic.affineModalities():
                combo.addItem(model_choice.modalityLabel(modality), modality)
            index = combo.findData(previous)
            combo.currentIndex = index if index >= 0 else 0
        finally:
            combo.blockSignals(False)

    def onAffineModalityChanged(self, index: int) -> None:
        if self._parameterNode and self.ui.affineModalityComboBox.currentData:
            self._parameterNode.affineModality = self.ui.affineModalityComboBox.currentData

    # --- what the kit asks ---------------------------------------------------------------
    def reasonNotToRun(self) -> str:
        reason = super().reasonNotToRun()
        if reason:
            return reason
        options = self.options()
        return self.logic.qualityReason(options) or self.logic.affineReason(options)

    def startRegistration(self, panel: JobPanel) -> BackendTask:
        task = super().startRegistration(panel)  # raises when the run cannot start: the label stays
        self.ui.resultLabel.text = _("Running...")
        return task

    def onTaskFinished(self, task: BackendTask) -> None:
        if task.state != "completed":
            self.ui.resultLabel.text = _("No result ({state}).").format(state=task.state)
        super().onTaskFinished(task)

    def onResult(self, result: DeformableResult) -> None:
        super().onResult(result)
        self.ui.resultLabel.text = result.summary()
        self.panel.log(result.summary())
        if self._parameterNode:
            self._parameterNode.outputInverseTransform = result.inverseTransformNode
            self._parameterNode.outputJacobian = result.jacobianNode


#
# Logic
#


class SynthPairsLogic(JobModuleLogic):
    """Deformable registration, callable without the panel.

    ``processFactory`` (default: the real process runner) is injectable for tests.
    ``register(fixed, moving, ...)`` blocks and returns a ``DeformableResult``; ``start(options)``
    returns the running :class:`DiffusionRegCore.BackendTask` (the panel uses it).
    """

    parameterNodeClass = SynthPairsParameterNode

    def requirementFiles(self) -> list:
        """The deformable backend needs MONAI besides the common requirements."""
        return self.coreLogic.requirementFiles("requirements-deformable.txt")

    @staticmethod
    def optionsFromParameterNode(p, device: str = "auto") -> DeformableOptions:
        return DeformableOptions(
            p.fixedVolume,
            p.movingVolume,
            p.outputTransform,
            p.outputInverseTransform,
            p.outputJacobian,
            p.outputVolume,
            initialTransform=p.initialTransform,
            runAffineFirst=p.runAffineFirst,
            affineModality=p.affineModality,
            fixedLabels=p.fixedLabels,
            movingLabels=p.movingLabels,
            modality=p.modality,
            model=p.model,
            quality=p.quality,
            instanceOptimization=p.instanceOptimization,
            refineIterations=p.refineIterations,
            device=device,
        )

    # --- models -------------------------------------------------------------------------
    def affineModalities(self) -> list[str]:
        return model_choice.installedModalities(self.coreLogic.modelManager().models(AFFINE_TASK), AFFINE_TASK)

    def modelReason(self, options: DeformableOptions) -> str:
        entries = self.coreLogic.modelManager().models(TASK)
        return model_choice.modelToRun(entries, TASK, options.modality, options.model)[1]

    def affineReason(self, options: DeformableOptions) -> str:
        """Why the chained affine run cannot run ("" when it is not asked for or can)."""
        if not options.runAffineFirst:
            return ""
        entries = self.coreLogic.modelManager().models(AFFINE_TASK)
        reason = model_choice.modelToRun(entries, AFFINE_TASK, options.affineModality, options.affineModel)[1]
        return _("Run the affine first: {reason}").format(reason=reason) if reason else ""

    def inferenceDefaults(self, modality: str, model: str = "") -> dict:
        """The chosen model's registration defaults (config.json ``inference``), e.g. ``{"io_steps": 50, ...}``."""
        entry = model_choice.modelToRun(self.coreLogic.modelManager().models(TASK), TASK, modality, model)[0]
        return self.coreLogic.modelManager().inferenceDefaults(entry) if entry is not None else {}

    def qualities(self, modality: str, model: str = "") -> list[QualityChoice]:
        """The chosen model's speed/accuracy presets (``default`` and its config's ``qualities``), fastest first."""
        return qualityChoices(self.inferenceDefaults(modality, model))

    def qualityReason(self, options: DeformableOptions) -> str:
        """Why ``options.quality`` cannot run with the chosen model ("" when it can)."""
        return qualityReason(self.qualities(options.modality, options.model), options.quality)

    # --- running ------------------------------------------------------------------------
    def prepare(self, options: DeformableOptions):
        """The job for ``options`` (inputs exported); raises ValueError with the reason it cannot run."""
        reason = options.isValid()[1] or self.modelReason(options) or self.qualityReason(options) or self.affineReason(options)
        if reason:
            raise ValueError(reason)
        core = self.coreLogic
        python, env = core.pythonExecutable(), core.backendEnvironment()  # may fail: before any folder exists
        return prepareRegistration(options, slicer.mrmlScene, core.createWorkFolder, python, env)

    def register(
        self,
        fixedVolume,
        movingVolume,
        outputTransform=None,
        outputInverseTransform=None,
        outputJacobian=None,
        outputVolume=None,
        initialTransform=None,
        runAffineFirst: bool = False,
        affineModality: str = "mri",
        fixedLabels=None,
        movingLabels=None,
        modality: str = SAMPLE_MODALITY,
        model: str = "",
        quality: str = QUALITY_DEFAULT,
        instanceOptimization: int = MODEL_DEFAULT,
        refineIterations: int = MODEL_DEFAULT,
        device: str | None = None,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        timeout: float | None = None,
        onProgress=None,
        onLog=None,
    ) -> DeformableResult:
        """Register ``movingVolume`` to ``fixedVolume`` and wait (Slicer stays responsive).

        Returns the nodes (``transformNode``, ``inverseTransformNode``, ``jacobianNode``,
        ``volumeNode``, ``affineTransformNode``) and the backend's ``report``; see
        ``SynthPairsLib/deformable_job.py`` for what they map. ``quality``: a preset of the model's
        config (``fast``, ``default``, ``best``: :meth:`qualities` lists the model's). ``instanceOptimization``
        and ``refineIterations``: -1 the quality's number, 0 off. ``device``: auto, cpu, cuda, cuda:N
        (default: the panel's choice). Dependencies are not installed here; call
        ``DiffusionRegCoreLogic().ensureDependencies(SynthPairsLogic().requirementFiles())`` first
        if needed. Raises ValueError for unusable inputs and RuntimeError when the run fails or is
        cancelled; ``timeout`` (seconds) applies to each step.
        """
        options = DeformableOptions(
            fixedVolume,
            movingVolume,
            outputTransform,
            outputInverseTransform,
            outputJacobian,
            outputVolume,
            initialTransform=initialTransform,
            runAffineFirst=runAffineFirst,
            affineModality=affineModality,
            fixedLabels=fixedLabels,
            movingLabels=movingLabels,
            modality=modality,
            model=model,
            quality=quality,
            instanceOptimization=instanceOptimization,
            refineIterations=refineIterations,
            device=device or self.coreLogic.savedDevice(),
            placeMoving=showResult,
        )
        return self.run(options, timeout, keepTemporaryFiles, onProgress, onLog)

    # --- sample data ----------------------------------------------------------------------
    @staticmethod
    def loadSampleData():
        """Load the extension's lung vessel pair; returns ``(fixed, moving)`` volume nodes."""
        return SAMPLE.load()


#
# Test
#


class SynthPairsTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). The registration test registers the sample lung
    pair end to end on the CPU and checks the result (grid transforms, folding 0, fixed never
    moves); without PyTorch/MONAI or the lung-vessels model it is skipped with a message saying
    what is missing (it never installs anything)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # The input checks run in the MRML tier (Testing/mrml/test_mrml_synthpairs.py) outside Slicer.
        self.setUp()
        self.test_parameterNode()
        self.setUp()
        self.test_registration()

    def test_parameterNode(self):
        self.delayDisplay("Parameter node round trip")
        logic = SynthPairsLogic()
        p = logic.getParameterNode()
        fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
        p.fixedVolume = fixed
        p.modality = "mri"
        p.quality = "fast"
        p.refineIterations = 0
        self.assertEqual(logic.getParameterNode().fixedVolume.GetID(), fixed.GetID())
        options = logic.optionsFromParameterNode(logic.getParameterNode(), device="cpu")
        self.assertEqual((options.modality, options.quality, options.refineIterations, options.device), ("mri", "fast", 0, "cpu"))
        self.assertEqual(options.instanceOptimization, MODEL_DEFAULT)
        self.delayDisplay("Test passed")

    def _skipReason(self) -> str:
        from DiffusionRegCoreLib import install

        if install.installedVersion("torch") is None:
            return (
                "PyTorch is not installed in this Slicer: install it with the PyTorch Utils module "
                "(or press Register once) to run the registration test"
            )
        plan = DiffusionRegCoreLogic().dependencyPlan(SynthPairsLogic().requirementFiles())
        if plan.pipRequirements:
            return "missing Python packages: " + ", ".join(plan.pipRequirements) + " (press Install dependencies)"
        reason = SynthPairsLogic().modelReason(DeformableOptions(modality=SAMPLE_MODALITY))
        if reason:
            return reason
        if not SAMPLE.available():
            return "the sample data files are missing from Resources/Sample"
        return ""

    def test_registration(self):
        import numpy as np

        from DiffusionRegCoreLib import mrml_io

        reason = self._skipReason()
        if reason:
            self.delayDisplay(f"Skipping the registration test: {reason}")
            self.skipTest(reason)
        self.delayDisplay("Loading sample data")
        logic = SynthPairsLogic()
        fixed, moving = logic.loadSampleData()
        fixedBefore = mrml_io.volumeIjkToRas(fixed)
        self.delayDisplay("Registering the lung vessel pair (CPU, the model's defaults: a few minutes)")
        result = logic.register(fixed, moving, modality=SAMPLE_MODALITY, device="cpu", timeout=3600)
        for node in (result.transformNode, result.inverseTransformNode):
            self.assertFalse(node.IsLinear())
            self.assertEqual(node.GetTransformFromParent().GetClassName(), "vtkOrientedGridTransform")
        self.assertEqual(result.report["folding_percent"], 0.0)
        self.assertLess(result.report["ice_mean_mm"], 0.5)
        movingRef, fixedRef = mrml_io.registrationReferences(result.transformNode)
        self.assertEqual((movingRef.GetID(), fixedRef.GetID()), (moving.GetID(), fixed.GetID()))
        self.assertEqual(moving.GetParentTransformNode().GetID(), result.transformNode.GetID())
        np.testing.assert_allclose(mrml_io.volumeIjkToRas(fixed), fixedBefore, atol=1e-9)  # the fixed volume never moves
        self.assertEqual(result.jacobianNode.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        self.assertGreater(float(slicer.util.arrayFromVolume(result.jacobianNode).min()), 0.0)
        self.delayDisplay(f"Test passed: {result.summary()}")
