"""SynthPairs: deformable, inverse-consistent registration of two volumes, and synthetic pairs to browse.

The module is thin. Its own parts are two panels (``Resources/UI``: the Register part and the
"Generate pairs" section), the parameter node, and :class:`SynthPairsLogic`, which turns them
into jobs: a ``DeformableOptions`` registration (``SynthPairsLib/deformable_job.py``: export,
command line, result import, "register as displayed", the chained affine run) and a
``GenerateOptions`` generation (``SynthPairsLib/generate_job.py``: ``diffusionreg synth`` runs,
the pairs in a subject-hierarchy folder with their figures in a table). Everything else (model
and device selectors, dependency install, Run <-> Cancel, progress, log) is DiffusionRegCore's
panel kit, once per part. Scripting::

    from SynthPairs import SynthPairsLogic
    logic = SynthPairsLogic()
    result = logic.register(fixedNode, movingNode, modality="lung-vessels")
    result.transformNode, result.inverseTransformNode, result.jacobianNode, result.summary()

    pairs = logic.generatePairs(4, seed=0)  # the installed pair generator, its sampling defaults
    pairs.pairs[0].fixedNode, pairs.pairs[0].movingNode, pairs.tableNode, pairs.summary()
"""

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import qt
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
from SynthPairsLib.generate_job import (
    MAX_PAIRS,
    OVERLAY_OPACITY,
    SAMPLING_DEFAULT,
    GeneratedPair,
    GeneratedPairs,
    GenerateOptions,
    GenerationRun,
    GeneratorChoice,
    generatorToRun,
    prepareGeneration,
    samplingDefaults,
    showPair,
)
from SynthPairsLib.generate_job import TASK as GENERATE_TASK

from DiffusionRegCore import BackendTask, DiffusionRegCoreLogic, JobModuleLogic, JobModuleWidget, JobPanel, SamplePair
from DiffusionRegCoreLib import model_choice
from DiffusionRegCoreLib.job import runJob

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
#: Limits of the Generate boxes (the seed box is a 32-bit Qt spin box).
SEED_MAXIMUM = 2**31 - 1
TEMPERATURE_MAXIMUM = 10.0
STEPS_MAXIMUM = 100000


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
            "'Run the affine first' starts from a Spatial Diffusion Registration result. 'Generate pairs' draws "
            "synthetic lung-vessel pairs from a trained generator, to browse pair by pair with their novelty and "
            "realism figures and to register. The computations run in a separate process; Cancel stops them. See "
            "docs/slicer.md of the DiffusionReg repository."
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

    Generate pairs (GenerateOptions):
    generateCount, generateSeed - pairs 0..count-1 of the seed (pair i of a seed is always the same).
    generateTemperature, generateSteps - sampling; 0 for the generator config's own value.
    generateOutputFolder - existing folder for the files and manifest.json ("" = the scene only).
    keepPairsOnCancel - a cancel keeps the pairs finished so far.
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
    generateCount: Annotated[int, WithinRange(1, MAX_PAIRS)] = 4
    generateSeed: Annotated[int, WithinRange(0, SEED_MAXIMUM)] = 0
    generateTemperature: Annotated[float, WithinRange(float(SAMPLING_DEFAULT), TEMPERATURE_MAXIMUM)] = float(SAMPLING_DEFAULT)
    generateSteps: Annotated[int, WithinRange(SAMPLING_DEFAULT, STEPS_MAXIMUM)] = SAMPLING_DEFAULT
    generateOutputFolder: str = ""
    keepPairsOnCancel: bool = False


#
# Widget: the module's own inputs; the rest is DiffusionRegCore's JobPanel
#


class SynthPairsWidget(JobModuleWidget):
    """The Register panel's inputs, outputs, options and result line (``Resources/UI/SynthPairs.ui``)
    and the "Generate pairs" section (``SynthPairsGenerate.ui``, with a second kit panel for the
    generator); the rest is DiffusionRegCore's :class:`JobModuleWidget` and :class:`JobPanel`."""

    task = TASK
    requester = _("SynthPairs")
    libModules = ("SpatialDiffusionRegLib.affine_job", "SynthPairsLib.deformable_job", "SynthPairsLib.generate_job")
    sample = SAMPLE
    sampleModality = SAMPLE_MODALITY
    #: The Generate section's kit panel (generator model, device, Generate <-> Cancel, progress, log).
    generatePanel: JobPanel | None = None
    #: The pairs the slider browses (the last generation).
    generated: GeneratedPairs | None = None

    def createLogic(self):
        return SynthPairsLogic()

    def setup(self) -> None:
        super().setup()
        self.setupGenerate()
        self.setParameterNode(self._parameterNode)  # binds the Generate section's boxes too

    def setupGenerate(self) -> None:
        """The Generate section below the Register part, its own kit panel inside it."""
        section = slicer.util.loadUI(self.resourcePath("UI/SynthPairsGenerate.ui"))
        self.layout.insertWidget(self.layout.count() - 1, section)  # above the stretch
        for name, child in vars(slicer.util.childWidgetVariables(section)).items():
            setattr(self.ui, name, child)
        section.setMRMLScene(slicer.mrmlScene)
        self.generatePanel = JobPanel(
            qt.QVBoxLayout(self.ui.generatePanelWidget),
            GENERATE_TASK,
            self.generateReason,
            self.startGeneration,
            self.logic.requirementFiles(),
            self.requester,
            _("Generate"),
            onResult=self.showGenerated,
            logic=self.logic.coreLogic,
            onModelChanged=self.onGeneratorChanged,
        )
        self.ui.browseOutputFolderButton.connect("clicked(bool)", self.onBrowseOutputFolder)
        self.ui.pairSlider.connect("valueChanged(int)", self.onPairChanged)
        self.ui.registerThisPairButton.connect("clicked(bool)", self.onRegisterThisPair)
        self.onGeneratorChanged()

    def cleanup(self) -> None:
        super().cleanup()
        if self.generatePanel is not None:
            self.generatePanel.cancelRunning()

    def onSceneStartClose(self, caller, event) -> None:
        super().onSceneStartClose(caller, event)
        if self.generatePanel is not None:
            self.generatePanel.cancelRunning()
            self.showGenerated(None)

    def setupModule(self) -> None:
        self.ui.affineModalityComboBox.connect("currentIndexChanged(int)", self.onAffineModalityChanged)
        self.ui.qualityComboBox.connect("currentIndexChanged(int)", self.onQualityChanged)
        self.populateAffineModalities()

    def enter(self) -> None:
        super().enter()
        self.populateAffineModalities()
        if self.generatePanel is not None:
            self.generatePanel.populateModels()

    def setParameterNode(self, inputParameterNode) -> None:
        super().setParameterNode(inputParameterNode)
        if self._parameterNode:
            index = self.ui.affineModalityComboBox.findData(self._parameterNode.affineModality)
            if index >= 0:
                self.ui.affineModalityComboBox.currentIndex = index

    def onParametersChanged(self) -> None:
        self.ui.affineModalityComboBox.enabled = self._parameterNode.runAffineFirst
        if self.generatePanel is not None:
            self.generatePanel.updateRunButton()

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

    # --- generate pairs ------------------------------------------------------------------
    def generateOptions(self) -> GenerateOptions:
        """The generation as the Generate section shows it (the generator: its kit panel's choice)."""
        p = self._parameterNode
        return GenerateOptions(
            count=p.generateCount,
            seed=p.generateSeed,
            model=self.generatePanel.model if self.generatePanel is not None else "",
            temperature=p.generateTemperature,
            steps=p.generateSteps,
            outputFolder=(p.generateOutputFolder or "").strip(),
            keepOnCancel=p.keepPairsOnCancel,
            device=self.generatePanel.device if self.generatePanel is not None else "auto",
        )

    def generateReason(self) -> str:
        if self._parameterNode is None:
            return _("No parameter node")
        return self.logic.generationReason(self.generateOptions())

    def onGeneratorChanged(self) -> None:
        """The steps and temperature boxes' lowest value says the chosen generator's own, e.g. 'model default (256)'."""
        if self.generatePanel is None:  # called while the kit builds its selectors
            return
        defaults = self.logic.samplingDefaults(self.generatePanel.model)
        label = _("model default")
        for box, key in ((self.ui.stepsSpinBox, "steps"), (self.ui.temperatureSpinBox, "temperature")):
            box.specialValueText = f"{label} ({defaults[key]})" if key in defaults else label

    def onBrowseOutputFolder(self) -> None:
        current = self._parameterNode.generateOutputFolder if self._parameterNode else ""
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the generated pairs"), current)
        if folder and self._parameterNode:
            self._parameterNode.generateOutputFolder = folder

    def startGeneration(self, panel: JobPanel) -> BackendTask:
        task = self.logic.startGeneration(
            self.generateOptions(),
            keepTemporaryFiles=panel.keepTemporaryFiles,
            onProgress=panel.onProgress,
            onLog=panel.log,
            onFinished=self.onGenerationFinished,
        )  # raises when the run cannot start: the labels stay
        self.ui.generateResultLabel.text = _("Generating...")
        return task

    def onGenerationFinished(self, task: BackendTask, generated: GeneratedPairs | None) -> None:
        """Back to idle (a completed run's pairs come through the panel's onResult); after a cancel
        the kept pairs, if any, are shown."""
        self.generatePanel.onFinished(task)
        if task.state == "completed":
            return
        if generated is not None:
            self.showGenerated(generated)
        else:
            self.ui.generateResultLabel.text = _("No pairs ({state}).").format(state=task.state)

    def showGenerated(self, generated: GeneratedPairs | None) -> None:
        """Browse ``generated`` (the slider, the table, "Register this pair"); None clears them."""
        self.generated = generated
        slider = self.ui.pairSlider
        slider.blockSignals(True)
        slider.minimum, slider.maximum, slider.value = 0, max(len(generated.pairs) - 1, 0) if generated else 0, 0
        slider.blockSignals(False)
        slider.enabled = self.ui.registerThisPairButton.enabled = generated is not None and bool(generated.pairs)
        self.ui.pairTableView.setMRMLTableNode(generated.tableNode if generated else None)
        if generated is None:
            self.ui.pairLabel.text = _("no pairs yet")
            self.ui.generateResultLabel.text = _("No pairs generated yet.")
            return
        for note in generated.notes:
            self.generatePanel.log(note)
        self.generatePanel.log(generated.summary())
        reference = generated.manifest.get("training_reference") or {}
        text = generated.summary()
        if reference:
            figures = ", ".join(f"{key.replace('_', ' ')} {value:.3f}" for key, value in reference.items())
            text += _(". Training pairs: {figures}.").format(figures=figures)
        self.ui.generateResultLabel.text = text
        if generated.pairs:
            self.onPairChanged(0)

    def onPairChanged(self, position: int) -> None:
        if self.generated is None or not self.generated.pairs:
            return
        pair = self.logic.showPair(self.generated, int(position), fit=int(position) == 0)
        self.ui.pairLabel.text = _("pair {index:03d} ({n} of {total})").format(
            index=pair.index, n=int(position) + 1, total=len(self.generated.pairs)
        )

    def onRegisterThisPair(self) -> None:
        """The pair shown becomes the Register part's fixed and moving volumes (lung-vessels model)."""
        if self.generated is None or not self._parameterNode:
            return
        pair = self.generated.pairs[int(self.ui.pairSlider.value)]
        self.logic.useForRegistration(self._parameterNode, pair)
        self.panel.selectModality(self._parameterNode.modality)


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

    # --- generate pairs ---------------------------------------------------------------------
    def generatorChoice(self, model: str = "") -> tuple[GeneratorChoice | None, str]:
        """The installed generator ``model`` names ("" the default), or ``(None, reason)``."""
        return generatorToRun(self.coreLogic.modelManager().models(GENERATE_TASK), model)

    def samplingDefaults(self, model: str = "") -> dict:
        """The generator's sampling defaults (config.json ``sampling``: steps, temperature); {} without one."""
        choice = self.generatorChoice(model)[0]
        return samplingDefaults(choice.config) if choice is not None else {}

    def generationReason(self, options: GenerateOptions) -> str:
        """Why ``options`` cannot run ("" when it can), e.g. "No pair generator is installed"."""
        return options.isValid()[1] or self.generatorChoice(options.model)[1]

    def prepareGeneration(self, options: GenerateOptions, keepTemporaryFiles: bool = False) -> GenerationRun:
        """The generation for ``options`` (the generator resolved); raises ValueError with the reason it cannot run."""
        reason = self.generationReason(options)
        if reason:
            raise ValueError(reason)
        choice = self.generatorChoice(options.model)[0]
        core = self.coreLogic
        python, env = core.pythonExecutable(), core.backendEnvironment()  # may fail: before any folder exists
        options = replace(options, model=choice.argument)
        name = f"Synthetic pairs ({choice.label}, seed {int(options.seed)})"
        return prepareGeneration(options, slicer.mrmlScene, core.createWorkFolder, python, env, name, keepTemporaryFiles)

    def startGeneration(
        self,
        options: GenerateOptions,
        keepTemporaryFiles: bool = False,
        show: bool = True,
        onProgress=None,
        onLog=None,
        onFinished=None,
    ) -> BackendTask:
        """Start generating in the background. ``onFinished(task, generated)``: ``generated`` is the
        pairs loaded (also the kept ones after a cancel with ``keepOnCancel``), else None."""
        run = self.prepareGeneration(options, keepTemporaryFiles)

        def finished(task: BackendTask) -> None:
            try:
                generated = run.conclude(task.outcome)
            except Exception as error:  # the kept pairs could not be saved or loaded
                generated = None
                if onLog:
                    onLog(f"Keeping the finished pairs failed: {error}")
            if generated is not None and generated.pairs and show:
                self.showPair(generated, 0)
            if onFinished:
                onFinished(task, generated)

        try:
            return self.coreLogic.startJob(
                run.firstJob(), keepTemporaryFiles=keepTemporaryFiles, onProgress=onProgress, onLog=onLog, onFinished=finished
            )
        except Exception:
            run.discard()  # nothing started: no staging folder left behind
            raise

    def generatePairs(
        self,
        count: int,
        seed: int = 0,
        model: str = "",
        temperature: float = SAMPLING_DEFAULT,
        steps: int = SAMPLING_DEFAULT,
        outputFolder: str = "",
        keepOnCancel: bool = False,
        device: str | None = None,
        keepTemporaryFiles: bool = False,
        show: bool = True,
        timeout: float | None = None,
        onProgress=None,
        onLog=None,
    ) -> GeneratedPairs:
        """Draw ``count`` synthetic (fixed, moving) lung-vessel pairs and wait (Slicer stays responsive).

        Returns a ``GeneratedPairs``: ``pairs`` (each ``index``, ``fixedNode``, ``movingNode``) in a
        subject-hierarchy folder (``folderItem``), the ``tableNode`` of their novelty and realism
        figures, the ``manifest`` and ``summary()``. ``model``: "" for the installed generator, a
        registered name, an imported model's path or a model folder. ``temperature``, ``steps``: 0
        for the generator's config.json values. ``outputFolder``: an existing folder that receives
        the files and manifest.json ("" keeps the pairs in the scene only). ``keepOnCancel``: a
        cancel (or ``timeout`` seconds per backend run) returns the pairs finished so far (then
        made one backend run per pair) instead of raising. Raises ValueError for unusable options
        (no generator installed included) and RuntimeError when the run fails or is cancelled.
        """
        options = GenerateOptions(
            count=count,
            seed=seed,
            model=str(model or ""),
            temperature=temperature,
            steps=steps,
            outputFolder=str(outputFolder or ""),
            keepOnCancel=keepOnCancel,
            device=device or self.coreLogic.savedDevice(),
        )
        run = self.prepareGeneration(options, keepTemporaryFiles)
        try:
            outcome = runJob(
                run.firstJob(),
                self.coreLogic.processFactory,
                timeout,
                keepTemporaryFiles,
                onProgress,
                onLog,
                idle=slicer.app.processEvents,
            )
        except Exception:
            run.discard()  # the backend could not start: no staging folder left behind
            raise
        generated = run.conclude(outcome)
        if generated is None:
            raise RuntimeError(f"generating pairs {outcome.state}: {outcome.error or 'no pair was kept'}")
        if show and generated.pairs:
            self.showPair(generated, 0)
        return generated

    @staticmethod
    def showPair(generated: GeneratedPairs, position: int, fit: bool = True) -> GeneratedPair:
        """Pair number ``position`` in the slice views: fixed magenta, moving green blended over it."""
        pair = generated.pairs[position]
        slicer.util.setSliceViewerLayers(
            background=pair.fixedNode, foreground=pair.movingNode, foregroundOpacity=OVERLAY_OPACITY, fit=fit
        )
        return showPair(slicer.mrmlScene, generated, position)

    @staticmethod
    def useForRegistration(parameterNode, pair: GeneratedPair) -> None:
        """'Register this pair': the pair's scans become the Register part's fixed and moving volumes,
        with the lung-vessels model's modality (generated pairs are lung vessel maps)."""
        parameterNode.fixedVolume = pair.fixedNode
        parameterNode.movingVolume = pair.movingNode
        parameterNode.modality = SAMPLE_MODALITY

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
    moves); the generation test draws two pairs with the installed generator and checks the nodes
    and the table. Without PyTorch/MONAI or the model a test is skipped with a message saying
    what is missing (it never installs anything)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # The input checks run in the MRML tier (Testing/mrml/test_mrml_synthpairs.py) outside Slicer.
        self.setUp()
        self.test_parameterNode()
        self.setUp()
        self.test_registration()
        self.setUp()
        self.test_generatePairs()

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

    @staticmethod
    def _dependencyReason() -> str:
        from DiffusionRegCoreLib import install

        if install.installedVersion("torch") is None:
            return (
                "PyTorch is not installed in this Slicer: install it with the PyTorch Utils module "
                "(or press Register once) to run the registration test"
            )
        plan = DiffusionRegCoreLogic().dependencyPlan(SynthPairsLogic().requirementFiles())
        if plan.pipRequirements:
            return "missing Python packages: " + ", ".join(plan.pipRequirements) + " (press Install dependencies)"
        return ""

    def _skipReason(self) -> str:
        reason = self._dependencyReason()
        if reason:
            return reason
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

    def test_generatePairs(self):
        logic = SynthPairsLogic()
        reason = self._dependencyReason() or logic.generatorChoice()[1]
        if reason:
            self.delayDisplay(f"Skipping the generation test: {reason}")
            self.skipTest(reason)
        self.delayDisplay("Generating two pairs with the installed generator (CPU)")
        result = logic.generatePairs(2, seed=0, device="cpu", timeout=3600)
        self.assertEqual([pair.index for pair in result.pairs], [0, 1])
        self.assertEqual(result.tableNode.GetNumberOfRows(), 2)
        for pair in result.pairs:
            values = slicer.util.arrayFromVolume(pair.movingNode)
            self.assertTrue(0.0 <= float(values.min()) and float(values.max()) <= 1.0)
            self.assertEqual(slicer.util.arrayFromVolume(pair.fixedNode).shape, values.shape)  # the generator's frame
        self.delayDisplay(f"Test passed: {result.summary()}")
