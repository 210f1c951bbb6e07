"""Spatial Diffusion Registration: affine registration of two volumes with a diffusion model.

The module is thin. Its own parts are the inputs/outputs/options panel (``Resources/UI``), the
parameter node, and :class:`SpatialDiffusionRegLogic`, which turns them into an
``AffineOptions`` job (``SpatialDiffusionRegLib/affine_job.py``: export, command line, result
import, "register as displayed") and shows the result. Everything else (model and device
selectors, dependency install, Register <-> Cancel, progress, log) is DiffusionRegCore's panel
kit. Scripting::

    from SpatialDiffusionReg import SpatialDiffusionRegLogic
    logic = SpatialDiffusionRegLogic()
    result = logic.register(fixedNode, movingNode, modality="mri")
    result.transformNode                                         # moving is shown through it
    result.doubtful, result.doubtReason                          # the backend's similarity check
"""

import os
import sys
from pathlib import Path
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
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

from DiffusionRegCore import BackendTask, DiffusionRegCoreLogic, JobModuleLogic, JobModuleWidget, JobPanel, SamplePair
from DiffusionRegCoreLib import model_choice, mrml_io
from SpatialDiffusionRegLib.affine_job import (
    INITIALIZE_CHOICES,
    SOUND_STYLE,
    TASK,
    AffineOptions,
    AffineResult,
    prepareAffineJob,
)

#: Sample Data entry of the extension's brain MRI pair.
SAMPLE_NAME = "DiffusionRegBrainPair"
SAMPLE_CATEGORY = "DiffusionReg"
SAMPLE_NODE_NAMES = ("DiffusionRegSampleFixed", "DiffusionRegSampleMoving")
#: The sample files and their sha256, fixed here: Sample Data checks the files against these
#: (a checksum computed from the file it checks would check nothing).
SAMPLE_SHA256 = {
    "sample_fixed.nii.gz": "8d53d75c24bcaa66b275648c652ef207a7437c7b0670226efc2973f12be83418",
    "sample_moving.nii.gz": "a0b5e545d12572023752b24d8e6295ce890d99ec3c263b39c4b927cb3ddbe427",
}
#: The sample pair is brain MRI.
SAMPLE_MODALITY = "mri"


#
# SpatialDiffusionReg
#


class SpatialDiffusionReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Spatial Diffusion Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DiffusionRegCore"]
        self.parent.contributors = ["DiffusionReg developers (DiffusionReg project)"]
        self.parent.helpText = _(
            "Affine registration of a moving volume to a fixed volume with a spatial-diffusion model. "
            "Pick the two volumes and press Register: the result is a transform (the moving volume is shown "
            "through it; nothing else moves) and, optionally, the moving volume resampled onto the fixed grid. "
            "The modality list shows only what an installed model supports (MRI and CT with the shipped models, "
            "and any: modality-agnostic). Any starting pose is searched, up to 180 degrees. "
            "The computation runs in a separate process on the GPU when there is one; Cancel stops it. "
            "Python packages are installed on first use, after one confirmation. See docs/slicer.md of the "
            "DiffusionReg repository for a walkthrough and scripting."
        )
        self.parent.acknowledgementText = _(
            "Spatial-diffusion affine registration in the DiffusionReg extension. Uses 3D Slicer, PyTorch "
            "(SlicerPyTorch) and SimpleITK."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


SAMPLE = SamplePair(
    SAMPLE_NAME,
    SAMPLE_SHA256,
    SAMPLE_NODE_NAMES,
    Path(__file__).resolve().parent / "Resources" / "Icons" / f"{SAMPLE_NAME}.png",
    SAMPLE_CATEGORY,
)


def sampleFiles() -> list[Path]:
    return SAMPLE.files()


def registerSampleData():
    """Add the extension's brain pair to the Sample Data module (local files, checked against SAMPLE_SHA256)."""
    SAMPLE.register()


#
# Parameter node
#


@parameterNodeWrapper
class SpatialDiffusionRegParameterNode:
    """The panel's state, saved with the scene.

    fixedVolume, movingVolume - the volumes to register (moving is aligned to fixed).
    outputTransform - transform receiving the result (created when None).
    outputVolume - optional: moving resampled onto the fixed grid.
    modality - backend modality name; the panel offers only those of installed models.
    model - "" for the modality's default model, else a model name or an imported model path.
    steps - reverse-diffusion steps, 0 for the model's default.
    bidirectional, initialize - backend options ("default": the model's config decides).
    showResult - put moving under the transform and show the overlay when done.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    modality: str = SAMPLE_MODALITY
    model: str = ""
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    bidirectional: bool = False
    initialize: Annotated[str, Choice(list(INITIALIZE_CHOICES))] = "default"
    showResult: bool = True


#
# Widget: the module's own inputs; the rest is DiffusionRegCore's JobPanel
#


class SpatialDiffusionRegWidget(JobModuleWidget):
    """The module's inputs, outputs and options (``Resources/UI``); the rest is DiffusionRegCore's
    :class:`JobModuleWidget` and :class:`JobPanel`."""

    task = TASK
    requester = _("Spatial Diffusion Registration")
    libModules = ("SpatialDiffusionRegLib.affine_job",)
    sample = SAMPLE
    sampleModality = SAMPLE_MODALITY

    def createLogic(self):
        return SpatialDiffusionRegLogic()

    def startRegistration(self, panel: JobPanel) -> BackendTask:
        task = super().startRegistration(panel)  # raises when the run cannot start: the summary stays
        self.showSummary(_("Registering..."))
        return task

    def onTaskFinished(self, task: BackendTask) -> None:
        if task.state != "completed":
            self.showSummary(_("No result ({state}).").format(state=task.state))
        super().onTaskFinished(task)

    def onResult(self, result: AffineResult) -> None:
        """Notes to the log, the transform to the parameter node, and the summary: a doubtful
        result in warning colours, its reason in the log too."""
        super().onResult(result)
        self.showSummary(result.summary(), result.summaryStyle())

    def showSummary(self, text: str, style: str = SOUND_STYLE) -> None:
        self.ui.resultLabel.text = text
        self.ui.resultLabel.setStyleSheet(style)


#
# Logic
#


class SpatialDiffusionRegLogic(JobModuleLogic):
    """Spatial-diffusion affine registration, callable without the panel.

    ``processFactory`` (default: the real process runner) is injectable for tests.
    ``register(fixed, moving, ...)`` blocks and returns an ``AffineResult``; ``start(options)``
    returns the running :class:`DiffusionRegCore.BackendTask` (the panel uses it).
    """

    parameterNodeClass = SpatialDiffusionRegParameterNode

    def requirementFiles(self) -> list:
        """The affine path needs only the common requirements (no MONAI)."""
        return self.coreLogic.requirementFiles()

    @staticmethod
    def optionsFromParameterNode(p, device: str = "auto") -> AffineOptions:
        return AffineOptions(
            p.fixedVolume,
            p.movingVolume,
            p.outputTransform,
            p.outputVolume,
            modality=p.modality,
            model=p.model,
            steps=p.steps,
            bidirectional=p.bidirectional,
            initialize=p.initialize,
            device=device,
        )

    def modelReason(self, options: AffineOptions) -> str:
        entries = self.coreLogic.modelManager().models(TASK)
        return model_choice.modelToRun(entries, TASK, options.modality, options.model)[1]

    def prepare(self, options: AffineOptions):
        """The job for ``options`` (inputs exported); raises ValueError with the reason it cannot run."""
        reason = options.isValid()[1] or self.modelReason(options)
        if reason:
            raise ValueError(reason)
        core = self.coreLogic
        python, env = core.pythonExecutable(), core.backendEnvironment()  # may fail: before any folder exists
        return prepareAffineJob(options, slicer.mrmlScene, core.createWorkFolder(), python, env)

    def register(
        self,
        fixedVolume,
        movingVolume,
        outputTransform=None,
        outputVolume=None,
        modality: str = SAMPLE_MODALITY,
        model: str = "",
        steps: int = 0,
        bidirectional: bool = False,
        initialize: str = "default",
        device: str | None = None,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        timeout: float | None = None,
        onProgress=None,
        onLog=None,
    ) -> AffineResult:
        """Register ``movingVolume`` to ``fixedVolume`` and wait (Slicer stays responsive).

        The transform goes into ``outputTransform`` (a new node when None); see
        ``SpatialDiffusionRegLib/affine_job.py`` for what it maps and where the moving volume
        goes. ``device``: auto, cpu, cuda, cuda:N (default: the panel's choice). Dependencies are
        not installed here; call ``DiffusionRegCoreLogic().ensureDependencies()`` first if needed.
        Raises ValueError for unusable inputs and RuntimeError when the run fails or is cancelled.
        """
        options = AffineOptions(
            fixedVolume,
            movingVolume,
            outputTransform,
            outputVolume,
            modality=modality,
            model=model,
            steps=steps or 0,
            bidirectional=bidirectional,
            initialize=initialize,
            device=device or self.coreLogic.savedDevice(),
            placeMoving=showResult,
        )
        return self.run(options, timeout, keepTemporaryFiles, onProgress, onLog)

    def registerSequence(self, fixedVolume, movingSequence, onFrame=None, **options):
        """Register every frame of ``movingSequence`` (a sequence node of scalar volumes, e.g. a 4D
        acquisition's) to ``fixedVolume``; returns a new sequence node of linear transforms in the
        scene, one per frame at the frame's index value, named after the input.

        Frame i's transform is what :meth:`register` gives for that frame alone (same ``options``:
        modality, model, steps, device, ...; one backend run per frame): "from parent" it maps fixed
        world (RAS mm) -> the frame's own coordinates, so a frame put under it overlays the fixed
        volume (``affine_job``'s convention with ``C`` = identity). Frames are registered as stored
        (a parent transform of the browser's proxy volume is not applied). Add the result to the
        frames' sequence browser
        (Sequences module) to review it frame by frame. ``onFrame(index, count)`` is called before
        each frame.
        All frames or none: when a frame fails or is cancelled, the partial result is removed from
        the scene and the error raised (ValueError for unusable inputs, RuntimeError otherwise).
        """
        reason = mrml_io.volumeSequenceReason(movingSequence) or mrml_io.registrationInputsReason(
            fixedVolume, movingSequence.GetNthDataNode(0)
        )
        if reason:
            raise ValueError(reason)
        perFrame = {"outputTransform", "outputVolume", "showResult"} & set(options)
        if perFrame:
            raise ValueError(f"registerSequence makes its own per-frame nodes; do not pass {', '.join(sorted(perFrame))}")
        scene = slicer.mrmlScene
        count = movingSequence.GetNumberOfDataNodes()
        name = scene.GenerateUniqueName(f"{movingSequence.GetName()} to {fixedVolume.GetName()}")
        transforms = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
        transforms.SetIndexName(movingSequence.GetIndexName())
        transforms.SetIndexUnit(movingSequence.GetIndexUnit())
        transforms.SetIndexType(movingSequence.GetIndexType())
        try:
            for index in range(count):
                if onFrame is not None:
                    onFrame(index, count)
                frameData = movingSequence.GetNthDataNode(index)
                frame = scene.AddNewNodeByClass(frameData.GetClassName(), f"{name} frame {index}")
                frame.CopyContent(frameData)
                made = [frame]  # no output volume: the frame and its transform are all a frame adds
                try:
                    transformNode = self.register(fixedVolume, frame, showResult=False, **options).transformNode
                    made.append(transformNode)
                    transforms.SetDataNodeAtValue(transformNode, movingSequence.GetNthIndexValue(index))
                finally:
                    for node in made:  # the sequence holds its own copy; the scene keeps nothing per frame
                        scene.RemoveNode(node)
        except BaseException:
            scene.RemoveNode(transforms)
            raise
        return transforms

    def registerUsingParameterNode(self, parameterNode=None, **kwargs) -> AffineResult:
        """Run :meth:`register` with the values of a parameter node (the panel's by default)."""
        p = parameterNode or self.getParameterNode()
        options = dict(
            outputTransform=p.outputTransform,
            outputVolume=p.outputVolume,
            modality=p.modality,
            model=p.model,
            steps=p.steps,
            bidirectional=p.bidirectional,
            initialize=p.initialize,
            showResult=p.showResult,
        )
        options.update(kwargs)
        result = self.register(p.fixedVolume, p.movingVolume, **options)
        p.outputTransform = result.transformNode
        return result

    # --- sample data ----------------------------------------------------------------------
    @staticmethod
    def loadSampleData():
        """Load the extension's brain MRI pair; returns ``(fixed, moving)`` volume nodes."""
        return SAMPLE.load()


#
# Test
#


class SpatialDiffusionRegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). The registration test loads the sample data,
    runs the job end to end and checks the result; without PyTorch or an installed affine model it
    is skipped with a message saying what is missing (it never installs anything)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_inputChecks()
        self.setUp()
        self.test_parameterNode()
        self.setUp()
        self.test_registration()

    def _syntheticVolume(self, name):
        import numpy as np

        k, j, i = np.meshgrid(np.arange(24), np.arange(28), np.arange(32), indexing="ij")
        array = np.exp(-(((k - 12) / 5) ** 2 + ((j - 14) / 7) ** 2 + ((i - 16) / 9) ** 2))
        return slicer.util.addVolumeFromArray((array * 100).astype(np.float32), name=name)

    def test_inputChecks(self):
        self.delayDisplay("Input checks")
        fixed = self._syntheticVolume("fixed")
        moving = self._syntheticVolume("moving")
        self.assertIn("Select", AffineOptions().isValid()[1])
        self.assertIn("moving", AffineOptions(fixed).isValid()[1])
        self.assertIn("different", AffineOptions(fixed, fixed).isValid()[1])
        self.assertEqual(AffineOptions(fixed, moving).isValid(), (True, ""))
        self.assertIn("output volume", AffineOptions(fixed, moving, None, moving).isValid()[1])
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode")
        fixed.SetAndObserveTransformNodeID(transform.GetID())
        self.assertIn("fixed volume must not be under", AffineOptions(fixed, moving, transform).isValid()[1])
        self.delayDisplay("Test passed")

    def test_parameterNode(self):
        self.delayDisplay("Parameter node round trip")
        logic = SpatialDiffusionRegLogic()
        p = logic.getParameterNode()
        fixed = self._syntheticVolume("fixed")
        p.fixedVolume = fixed
        p.modality = "ct"
        p.steps = 5
        self.assertEqual(logic.getParameterNode().fixedVolume.GetID(), fixed.GetID())
        options = logic.optionsFromParameterNode(logic.getParameterNode(), device="cpu")
        self.assertEqual((options.modality, options.steps, options.device), ("ct", 5, "cpu"))
        self.delayDisplay("Test passed")

    def _skipReason(self) -> str:
        from DiffusionRegCoreLib import install

        if install.installedVersion("torch") is None:
            return (
                "PyTorch is not installed in this Slicer: install it with the PyTorch Utils module "
                "(or press Register once) to run the registration test"
            )
        plan = DiffusionRegCoreLogic().dependencyPlan(SpatialDiffusionRegLogic().requirementFiles())
        if plan.pipRequirements:
            return "missing Python packages: " + ", ".join(plan.pipRequirements) + " (press Install dependencies)"
        reason = SpatialDiffusionRegLogic().modelReason(AffineOptions(modality=SAMPLE_MODALITY))
        if reason:
            return reason
        if not all(f.is_file() for f in sampleFiles()):
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
        logic = SpatialDiffusionRegLogic()
        fixed, moving = logic.loadSampleData()
        fixedBefore = mrml_io.volumeIjkToRas(fixed)
        outputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
        self.delayDisplay("Registering (CPU)")
        result = logic.register(fixed, moving, outputVolume=outputVolume, modality=SAMPLE_MODALITY, device="cpu", timeout=1800)
        transform = result.transformNode
        self.assertFalse(result.doubtful, result.doubtReason)  # the backend's similarity check
        self.assertTrue(transform.IsLinear())
        matrix = mrml_io.lpsMatrixFromTransformNode(transform)
        self.assertTrue(np.all(np.isfinite(matrix)))
        self.assertGreater(abs(np.linalg.det(matrix[:3, :3])), 0.1)
        movingRef, fixedRef = mrml_io.registrationReferences(transform)
        self.assertEqual((movingRef.GetID(), fixedRef.GetID()), (moving.GetID(), fixed.GetID()))
        self.assertEqual(moving.GetParentTransformNode().GetID(), transform.GetID())
        np.testing.assert_allclose(mrml_io.volumeIjkToRas(fixed), fixedBefore, atol=1e-9)  # the fixed volume never moves
        self.assertEqual(outputVolume.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        np.testing.assert_allclose(mrml_io.volumeIjkToRas(outputVolume), mrml_io.volumeIjkToRas(fixed), atol=1e-4)
        self.delayDisplay("Test passed")
