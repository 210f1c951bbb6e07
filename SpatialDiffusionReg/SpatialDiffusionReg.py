"""Spatial Diffusion Registration: affine registration of two volumes with a diffusion model.

The module is thin: the widget binds the panel to a parameter node, the logic writes the
inputs with Slicer's storage nodes, runs ``PythonSlicer -m diffusionreg affine ...`` in the
background (DiffusionRegCore), and loads the ITK transform it writes into a linear transform
node (fixed -> moving, resampling convention, stored "from parent"). Scripting::

    from SpatialDiffusionReg import SpatialDiffusionRegLogic
    logic = SpatialDiffusionRegLogic()
    result = logic.register(fixedNode, movingNode, modality="MRI")
    result.transformNode                                         # moving is shown through it
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

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

from DiffusionRegCore import BackendTask, DiffusionRegCoreLogic, reloadLib  # noqa: E402
from DiffusionRegCoreLib import command as backendCommand  # noqa: E402
from DiffusionRegCoreLib import device as deviceProbe  # noqa: E402
from DiffusionRegCoreLib import models as modelRegistry  # noqa: E402
from DiffusionRegCoreLib import mrml_io, paths  # noqa: E402
from DiffusionRegCoreLib.progress import ProgressEvent  # noqa: E402

#: Modality names shown in the panel; the backend gets them lower-cased.
MODALITY_CHOICES = ("MRI", "CT", "OCT", "OCTA", "Venous", "Any")
#: Pre-alignment choices of the backend (``--initialize``); its default is "moments".
INITIALIZE_CHOICES = backendCommand.INITIALIZATIONS
#: Sample Data entry of the extension's brain MRI pair.
SAMPLE_NAME = "DiffusionRegBrainPair"
SAMPLE_CATEGORY = "DiffusionReg"
SAMPLE_FILES = ("sample_fixed.nii.gz", "sample_moving.nii.gz")
SAMPLE_NODE_NAMES = ("DiffusionRegSampleFixed", "DiffusionRegSampleMoving")


#
# SpatialDiffusionReg
#


class SpatialDiffusionReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Spatial Diffusion Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["DiffusionRegCore"]
        self.parent.contributors = ["DiffusionReg developers"]
        self.parent.helpText = _(
            "Affine registration of a moving volume to a fixed volume with a spatial-diffusion model. "
            "Pick the two volumes and their modality and press Register: the result is a linear transform "
            "(the moving volume is shown through it) and, optionally, the moving volume resampled onto the "
            "fixed grid. The computation runs in a separate process on the GPU when there is one; "
            "Cancel stops it. PyTorch and the other Python packages are installed on first use, after one "
            "confirmation. See docs/slicer.md of the DiffusionReg repository for a walkthrough and scripting."
        )
        self.parent.acknowledgementText = _(
            "Spatial-diffusion affine registration in the DiffusionReg extension. Uses 3D Slicer, PyTorch "
            "(SlicerPyTorch), MONAI and SimpleITK."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def sampleFiles() -> list[Path]:
    return [paths.extensionResourcePath("Sample", name) for name in SAMPLE_FILES]


def registerSampleData():
    """Add the extension's brain pair to the Sample Data module (local files, sha256-checked)."""
    try:
        import SampleData
    except ImportError:
        return
    files = sampleFiles()
    if not all(f.is_file() for f in files):
        logging.info("DiffusionReg sample data not found; not registered in Sample Data")
        return
    iconPath = Path(__file__).resolve().parent / "Resources" / "Icons"
    thumbnail = iconPath / f"{SAMPLE_NAME}.png"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(thumbnail if thumbnail.is_file() else iconPath / "SpatialDiffusionReg.png"),
        uris=[f.as_uri() for f in files],
        fileNames=[f"DiffusionReg_{f.name}" for f in files],
        nodeNames=list(SAMPLE_NODE_NAMES),
        checksums=[f"SHA256:{modelRegistry.sha256File(f)}" for f in files],
    )


#
# Parameter node
#


@parameterNodeWrapper
class SpatialDiffusionRegParameterNode:
    """The panel's state, saved with the scene.

    fixedVolume, movingVolume - the volumes to register (moving is aligned to fixed).
    outputTransform - linear transform receiving the result (created when None).
    outputVolume - optional: moving resampled onto the fixed grid.
    modality - image type (selects the default model).
    model - "" for the modality's default model, else a model name or an imported model path.
    steps - reverse-diffusion steps, 0 for the model's default.
    bidirectional, initialize, seed - backend options (see ``diffusionreg affine --help``).
    keepTemporaryFiles - keep the files exchanged with the backend.
    showResult - put moving under the transform and show the overlay when done.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(list(MODALITY_CHOICES))] = "MRI"
    model: str = ""
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    bidirectional: bool = False
    initialize: Annotated[str, Choice(list(INITIALIZE_CHOICES))] = "moments"
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    keepTemporaryFiles: bool = False
    showResult: bool = True


#
# Widget
#


class SpatialDiffusionRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.coreLogic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task: Optional[BackendTask] = None
        self._updatingCombos = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpatialDiffusionReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SpatialDiffusionRegLogic()
        self.coreLogic = DiffusionRegCoreLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.loadSampleDataButton.connect("clicked(bool)", self.onLoadSampleData)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        self.ui.showTemporaryFolderButton.connect("clicked(bool)", self.onShowTemporaryFolder)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.verifyModelsButton.connect("clicked(bool)", self.onVerifyModels)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)

        self.ui.loadSampleDataButton.enabled = all(f.is_file() for f in sampleFiles())
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(_("Idle"))
        self.populateDevices()
        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None and self._task.running:
            self._task.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.populateModels()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None and self._task.running:
            self._task.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        reloadLib()
        ScriptedLoadableModuleWidget.onReload(self)

    # --- parameter node ---------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode: Optional[SpatialDiffusionRegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModel(self._parameterNode.model)
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        button = self.ui.registerButton
        if self._task is not None and self._task.running:
            button.text = _("Cancel")
            button.toolTip = _("Stop the registration (ends the backend process)")
            button.enabled = True
            return
        button.text = _("Register")
        p = self._parameterNode
        message = _("No parameter node") if p is None else self.logic.checkInputs(
            p.fixedVolume, p.movingVolume, p.outputTransform, p.outputVolume)
        button.enabled = not message
        button.toolTip = message if message else _("Register the moving volume to the fixed volume")

    # --- models and devices -------------------------------------------------------------
    def populateModels(self) -> None:
        combo = self.ui.modelComboBox
        self._updatingCombos = True
        try:
            combo.clear()
            combo.addItem(_("Default for the modality"), "")
            try:
                entries = self.coreLogic.modelManager().models(SpatialDiffusionRegLogic.TASK)
            except ValueError as error:
                self.log(str(error))
                entries = []
            for entry in entries:
                combo.addItem(entry.label(), entry.modelArgument())
        finally:
            self._updatingCombos = False
        if self._parameterNode:
            self._selectModel(self._parameterNode.model)

    def _selectModel(self, value: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(value or "")
        if index < 0 and value:
            combo.addItem(value, value)
            index = combo.count - 1
        self._updatingCombos = True
        combo.currentIndex = max(index, 0)
        self._updatingCombos = False

    def onModelChanged(self, index: int) -> None:
        if self._updatingCombos or not self._parameterNode:
            return
        self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def populateDevices(self) -> None:
        combo = self.ui.deviceComboBox
        saved = self.coreLogic.savedDevice()
        info = DiffusionRegCoreLogic.deviceInfo
        self._updatingCombos = True
        try:
            combo.clear()
            for label, value in deviceProbe.deviceChoices(info):
                combo.addItem(label, value)
            index = combo.findData(saved)
            if index < 0:
                combo.addItem(saved, saved)
                index = combo.count - 1
            combo.currentIndex = index
        finally:
            self._updatingCombos = False
        self.updateDeviceInfo()

    def selectedDevice(self) -> str:
        return self.ui.deviceComboBox.currentData or "auto"

    def onDeviceChanged(self, index: int) -> None:
        if self._updatingCombos:
            return
        self.coreLogic.saveDevice(self.selectedDevice())
        self.updateDeviceInfo()

    def updateDeviceInfo(self) -> None:
        info = DiffusionRegCoreLogic.deviceInfo
        if info is None:
            self.ui.deviceInfoLabel.text = _("Devices not detected yet (press Detect).")
            return
        lines = [info.summary()] + deviceProbe.deviceWarnings(info, self.selectedDevice())
        self.ui.deviceInfoLabel.text = "\n".join(lines)

    def onDetectDevices(self) -> None:
        self.ui.detectDevicesButton.enabled = False
        self.ui.deviceInfoLabel.text = _("Detecting devices (starts Python with PyTorch)...")

        def done(info):
            self.ui.detectDevicesButton.enabled = True
            self.populateDevices()

        with slicer.util.tryWithErrorDisplay(_("Device detection failed."), waitCursor=False):
            try:
                self.coreLogic.probeDevices(done)
            except Exception:
                self.ui.detectDevicesButton.enabled = True
                raise

    # --- buttons ------------------------------------------------------------------------
    def onLoadSampleData(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            fixed, moving = self.logic.loadSampleData()
            self._parameterNode.fixedVolume = fixed
            self._parameterNode.movingVolume = moving
            self._parameterNode.modality = "MRI"
            slicer.util.setSliceViewerLayers(background=fixed, foreground=moving, foregroundOpacity=0.5, fit=True)

    def onShowTemporaryFolder(self) -> None:
        self.coreLogic.openFolder(self.coreLogic.temporaryParent())

    def onOpenModelsFolder(self) -> None:
        self.coreLogic.openFolder(paths.userModelsDir())

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import model weights"), "", _("Model files (*.safetensors *.pt *.pth);;All files (*)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            entry = self.coreLogic.modelManager().importFile(path, task=SpatialDiffusionRegLogic.TASK)
            self.log(f"Imported model '{entry.name}' to {entry.path} (sha256 {entry.sha256}).")
            self.populateModels()
            self._selectModel(entry.modelArgument())
            self._parameterNode.model = entry.modelArgument()

    def onVerifyModels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to verify the models."), waitCursor=True):
            results = self.coreLogic.modelManager().verifyAll(SpatialDiffusionRegLogic.TASK)
            for result in results:
                self.log(result.text())
            if not results:
                self.log(_("No models are registered."))
            bad = [r for r in results if r.status in ("mismatch", "missing")]
            if bad:
                slicer.util.warningDisplay("\n".join(r.text() for r in bad), windowTitle=_("Model checksums"))

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the dependencies."), waitCursor=False):
            if self.coreLogic.ensureDependencies(_("Spatial Diffusion Registration"), log=self.log):
                self.log(_("All dependencies are installed."))

    # --- registration -------------------------------------------------------------------
    def onRegisterButton(self) -> None:
        if self._task is not None and self._task.running:
            self._task.cancel()
            self.ui.registerButton.text = _("Cancelling...")
            self.ui.registerButton.enabled = False
            return
        p = self._parameterNode
        self.ui.logTextEdit.clear()
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setFormat(_("Starting..."))
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=False):
            if not self.coreLogic.ensureDependencies(_("Spatial Diffusion Registration"), log=self.log):
                self.log(_("Dependencies are not installed: registration not started."))
                self.ui.progressBar.setFormat(_("Idle"))
                return
            self._task = self.logic.register(
                p.fixedVolume, p.movingVolume, p.outputTransform, p.outputVolume,
                modality=p.modality, model=p.model or None, steps=p.steps or None,
                bidirectional=p.bidirectional, initialize=p.initialize, seed=p.seed,
                device=self.selectedDevice(), keepTemporaryFiles=p.keepTemporaryFiles,
                showResult=p.showResult, wait=False,
                onProgress=self.onProgress, onLog=self.log, onFinished=self.onFinished,
            )
        if self._task is None:
            self.ui.progressBar.setFormat(_("Idle"))
        self._checkCanApply()

    def onProgress(self, event: ProgressEvent) -> None:
        self.ui.progressBar.setValue(int(round(event.fraction * 100)))
        self.ui.progressBar.setFormat(event.stage + " %p%")
        if event.message and event.message not in ("started", "done"):
            self.ui.progressBar.setFormat(f"{event.stage}: {event.message} (%p%)")

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        bar = self.ui.logTextEdit.verticalScrollBar()
        bar.setValue(bar.maximum)

    def onFinished(self, task: BackendTask) -> None:
        if task.state == "completed":
            result: RegistrationResult = task.outputs
            self.ui.progressBar.setValue(100)
            self.ui.progressBar.setFormat(_("Done in {seconds:.1f} s").format(seconds=result.seconds))
            for note in result.notes:
                self.log(note)
            if self._parameterNode and result.transformNode is not None:
                self._parameterNode.outputTransform = result.transformNode
        elif task.state == "cancelled":
            self.ui.progressBar.setFormat(_("Cancelled"))
        else:
            self.ui.progressBar.setFormat(_("Failed"))
            slicer.util.errorDisplay(
                _("Registration failed: {error}").format(error=task.error or _("unknown error")),
                detailedText="\n".join(task.processResult.log[-200:]) if task.processResult else "",
            )
        self._task = None
        self._checkCanApply()


#
# Logic
#


@dataclass
class RegistrationResult:
    """What :meth:`SpatialDiffusionRegLogic.register` produced."""

    transformNode: object
    volumeNode: object = None
    seconds: float = 0.0
    log: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    temporaryFolder: Optional[str] = None


class SpatialDiffusionRegLogic(ScriptedLoadableModuleLogic):
    """Spatial-diffusion affine registration, callable without the panel.

    ``register(fixed, moving, ...)`` runs the backend and returns a :class:`RegistrationResult`
    (``wait=True``, for scripts; Slicer stays responsive) or the running
    :class:`DiffusionRegCore.BackendTask` (``wait=False``, for the panel).
    """

    TASK = "affine"

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.coreLogic = DiffusionRegCoreLogic()

    def getParameterNode(self):
        return SpatialDiffusionRegParameterNode(super().getParameterNode())

    # --- checks -------------------------------------------------------------------------
    @staticmethod
    def checkInputs(fixedVolume, movingVolume, outputTransform=None, outputVolume=None) -> str:
        """Why the inputs cannot be registered, or "" when they can."""
        if fixedVolume is None and movingVolume is None:
            return _("Select the fixed and moving volumes")
        if fixedVolume is None:
            return _("Select the fixed volume")
        if movingVolume is None:
            return _("Select the moving volume")
        if mrml_io.sameNode(fixedVolume, movingVolume):
            return _("Fixed and moving volumes must be different volumes")
        for node, what in ((fixedVolume, _("fixed")), (movingVolume, _("moving"))):
            image = node.GetImageData()
            if image is None:
                return _("The {what} volume has no image data").format(what=what)
            dims = image.GetDimensions()
            if min(dims) < 2:
                return _("The {what} volume is not 3D (size {dims})").format(what=what, dims="x".join(map(str, dims)))
            if image.GetNumberOfScalarComponents() != 1:
                return _("The {what} volume must have one component per voxel").format(what=what)
        if outputVolume is not None and (mrml_io.sameNode(outputVolume, fixedVolume) or mrml_io.sameNode(outputVolume, movingVolume)):
            return _("The output volume must not be the fixed or moving volume")
        if outputTransform is not None and mrml_io.chainIncludes(fixedVolume, outputTransform):
            return _("The fixed volume must not be under the output transform")
        try:
            mrml_io.exportableIjkToRas(fixedVolume)
        except mrml_io.GeometryError as error:
            return _("The fixed volume cannot be used as it is: {reason}").format(reason=error)
        return ""

    # --- registration -------------------------------------------------------------------
    def register(
        self,
        fixedVolume,
        movingVolume,
        outputTransform=None,
        outputVolume=None,
        modality: str = "MRI",
        model: Optional[str] = None,
        steps: Optional[int] = None,
        bidirectional: bool = False,
        initialize: Optional[str] = "moments",
        seed: Optional[int] = 0,
        device: Optional[str] = None,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        wait: bool = True,
        timeout: Optional[float] = None,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[BackendTask], None]] = None,
    ):
        """Register ``movingVolume`` to ``fixedVolume``.

        The transform is written into ``outputTransform`` (a new linear transform node when
        None) and maps fixed RAS to moving RAS (stored "from parent"): with ``showResult`` the
        moving volume is shown through it, over the fixed volume. ``outputVolume`` (optional)
        receives the moving volume resampled onto the fixed grid. ``device``: auto, cpu, cuda,
        cuda:N (default: the one chosen in the panel). Dependencies are not installed here; call
        ``DiffusionRegCoreLogic().ensureDependencies()`` first if needed.

        Returns a :class:`RegistrationResult` when ``wait`` (raises RuntimeError on failure or
        cancel), else the running :class:`BackendTask` (its ``outputs`` is the result).
        """
        message = self.checkInputs(fixedVolume, movingVolume, outputTransform, outputVolume)
        if message:
            raise ValueError(message)
        core = self.coreLogic
        device = device or core.savedDevice()
        workFolder = core.createWorkFolder()
        movingInWorld, movingNote = mrml_io.movingVolumeFrame(movingVolume, stopAt=outputTransform)
        if movingNote:
            logging.info(movingNote)
            if onLog:
                onLog(movingNote)
        try:
            fixedPath = core.exportVolume(fixedVolume, workFolder.file("fixed.nrrd"))
            movingPath = core.exportVolume(movingVolume, workFolder.file("moving.nrrd"), world=movingInWorld,
                                           stopAt=outputTransform)
            transformPath = workFolder.file("transform.h5")
            volumePath = workFolder.file("resampled.nrrd") if outputVolume is not None else None
            commandLine = backendCommand.affineCommand(
                core.pythonExecutable(), fixedPath, movingPath, transformPath, volumePath,
                model=model or None, modality=str(modality).lower(), steps=steps or None,
                bidirectional=bidirectional, initialize=initialize or None, seed=seed, device=device,
            )
        except Exception:
            workFolder.cleanup()
            raise
        transformName = None if outputTransform is not None else f"{movingVolume.GetName()} to {fixedVolume.GetName()}"

        def importResults(task: BackendTask) -> RegistrationResult:
            transformNode = core.importTransform(transformPath, outputTransform, transformName, movingVolume, fixedVolume)
            volumeNode = None
            if volumePath is not None:
                volumeNode = core.importVolume(volumePath, outputVolume)
                volumeNode.SetAndObserveTransformNodeID(None)
                self._copyDisplay(movingVolume, volumeNode)
            notes: list[str] = [movingNote] if movingNote else []
            self._placeInSubjectHierarchy(movingVolume, [transformNode, volumeNode])
            if showResult:
                notes += mrml_io.placeUnderTransform(movingVolume, transformNode, replaceChain=not movingInWorld)
                self.showResult(fixedVolume, volumeNode or movingVolume)
            seconds = task.processResult.elapsedSeconds if task.processResult else 0.0
            return RegistrationResult(transformNode, volumeNode, seconds,
                                      list(task.processResult.log) if task.processResult else [], notes,
                                      str(workFolder.path) if keepTemporaryFiles else None)

        task = core.startTask(
            commandLine, workFolder, keepTemporaryFiles=keepTemporaryFiles, onProgress=onProgress, onLog=onLog,
            importResults=importResults, onFinished=onFinished, name="SpatialDiffusionReg",
        )
        if not wait:
            return task
        task.wait(timeout)
        if task.state != "completed":
            raise RuntimeError(f"registration {task.state}: {task.error or 'see the log'}")
        return task.outputs

    def registerUsingParameterNode(self, parameterNode=None, **kwargs):
        """Run :meth:`register` with the values of a parameter node (the panel's by default)."""
        p = parameterNode or self.getParameterNode()
        options = dict(
            outputTransform=p.outputTransform, outputVolume=p.outputVolume, modality=p.modality,
            model=p.model or None, steps=p.steps or None, bidirectional=p.bidirectional,
            initialize=p.initialize, seed=p.seed, keepTemporaryFiles=p.keepTemporaryFiles, showResult=p.showResult,
        )
        options.update(kwargs)
        result = self.register(p.fixedVolume, p.movingVolume, **options)
        if isinstance(result, RegistrationResult):
            p.outputTransform = result.transformNode
        return result

    # --- results --------------------------------------------------------------------------
    @staticmethod
    def showResult(fixedVolume, foregroundVolume) -> None:
        """Fixed volume in the background, the (transformed or resampled) moving one on top."""
        slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=foregroundVolume,
                                         foregroundOpacity=0.5, fit=False)

    @staticmethod
    def _copyDisplay(sourceVolume, targetVolume) -> None:
        if targetVolume.GetDisplayNode() is None:
            targetVolume.CreateDefaultDisplayNodes()
        source, target = sourceVolume.GetDisplayNode(), targetVolume.GetDisplayNode()
        if source is not None and target is not None and source.GetColorNodeID():
            target.SetAndObserveColorNodeID(source.GetColorNodeID())

    @staticmethod
    def _placeInSubjectHierarchy(referenceNode, nodes) -> None:
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        if shNode is None:
            return
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(referenceNode))
        for node in nodes:
            if node is not None and parent:
                shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    # --- sample data ----------------------------------------------------------------------
    @staticmethod
    def loadSampleData():
        """Load the extension's brain MRI pair; returns ``(fixed, moving)`` volume nodes."""
        registerSampleData()
        nodes = []
        try:
            import SampleData

            nodes = SampleData.SampleDataLogic().downloadSamples(SAMPLE_NAME)
        except Exception as error:  # noqa: BLE001 - fall back to loading the files directly
            logging.warning(f"Sample Data could not load {SAMPLE_NAME} ({error}); loading the files directly")
        if len(nodes) != 2 or not all(hasattr(n, "GetImageData") for n in nodes):
            files = sampleFiles()
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError("sample data not found: " + ", ".join(missing))
            nodes = [slicer.util.loadVolume(str(f), {"name": name}) for f, name in zip(files, SAMPLE_NODE_NAMES)]
        return nodes[0], nodes[1]


#
# Test
#


class SpatialDiffusionRegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). The registration test needs PyTorch and a
    registered affine model; without them it is skipped with a message saying what is missing
    (it never installs anything)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_inputChecks()
        self.setUp()
        self.test_parameterNode()
        self.setUp()
        self.test_registration()

    def _syntheticVolume(self, name, shift=(0.0, 0.0, 0.0)):
        import numpy as np

        k, j, i = np.meshgrid(np.arange(24), np.arange(28), np.arange(32), indexing="ij")
        centre = np.array([12.0, 14.0, 16.0]) + np.array(shift)[::-1]
        array = np.exp(-(((k - centre[0]) / 5) ** 2 + ((j - centre[1]) / 7) ** 2 + ((i - centre[2]) / 9) ** 2))
        return slicer.util.addVolumeFromArray((array * 100).astype(np.float32), name=name)

    def test_inputChecks(self):
        self.delayDisplay("Input checks")
        logic = SpatialDiffusionRegLogic()
        fixed = self._syntheticVolume("fixed")
        moving = self._syntheticVolume("moving", (2.0, 0.0, 0.0))
        self.assertIn("Select", logic.checkInputs(None, None))
        self.assertIn("moving", logic.checkInputs(fixed, None))
        self.assertIn("different", logic.checkInputs(fixed, fixed))
        self.assertEqual(logic.checkInputs(fixed, moving), "")
        self.assertIn("output volume", logic.checkInputs(fixed, moving, None, moving))
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode")
        fixed.SetAndObserveTransformNodeID(transform.GetID())
        self.assertIn("fixed volume must not be under", logic.checkInputs(fixed, moving, transform))
        self.delayDisplay("Test passed")

    def test_parameterNode(self):
        self.delayDisplay("Parameter node round trip")
        logic = SpatialDiffusionRegLogic()
        p = logic.getParameterNode()
        fixed = self._syntheticVolume("fixed")
        p.fixedVolume = fixed
        p.modality = "CT"
        p.steps = 5
        self.assertEqual(logic.getParameterNode().fixedVolume.GetID(), fixed.GetID())
        self.assertEqual(logic.getParameterNode().modality, "CT")
        self.assertEqual(logic.getParameterNode().steps, 5)
        self.delayDisplay("Test passed")

    def _skipReason(self) -> str:
        from DiffusionRegCoreLib import install

        if install.installedVersion("torch") is None:
            return ("PyTorch is not installed in this Slicer: install it with the PyTorch Utils module "
                    "(or press Register once) to run the registration test")
        plan = DiffusionRegCoreLogic().dependencyPlan()
        if plan.pipRequirements:
            return "missing Python packages: " + ", ".join(plan.pipRequirements) + " (press Install dependencies)"
        if not any(e.available for e in DiffusionRegCoreLogic.modelManager().models(SpatialDiffusionRegLogic.TASK, "mri")):
            return "no affine model file is available (Resources/Models.json lists none that is present)"
        if not all(f.is_file() for f in sampleFiles()):
            return "the sample data files are missing from Resources/Sample"
        return ""

    def test_registration(self):
        import numpy as np

        reason = self._skipReason()
        if reason:
            self.delayDisplay(f"Skipping the registration test: {reason}")
            self.skipTest(reason)
        self.delayDisplay("Loading sample data")
        logic = SpatialDiffusionRegLogic()
        fixed, moving = logic.loadSampleData()
        outputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "resampled")
        self.delayDisplay("Registering (CPU)")
        result = logic.register(fixed, moving, outputVolume=outputVolume, modality="MRI", device="cpu", timeout=1800)
        transform = result.transformNode
        self.assertTrue(transform.IsLinear())
        matrix = mrml_io.lpsMatrixFromTransformNode(transform)
        self.assertTrue(np.all(np.isfinite(matrix)))
        self.assertGreater(abs(np.linalg.det(matrix[:3, :3])), 0.1)
        movingRef, fixedRef = mrml_io.registrationReferences(transform)
        self.assertEqual(movingRef.GetID(), moving.GetID())
        self.assertEqual(fixedRef.GetID(), fixed.GetID())
        self.assertTrue(mrml_io.chainIncludes(moving, transform))
        self.assertEqual(outputVolume.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions())
        np.testing.assert_allclose(mrml_io.volumeIjkToRas(outputVolume), mrml_io.volumeIjkToRas(fixed), atol=1e-4)
        self.delayDisplay("Test passed")
