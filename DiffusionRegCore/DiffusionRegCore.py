"""DiffusionRegCore: the hidden module shared by the DiffusionReg modules, and their panel kit.

It owns what every module needs and nothing module-specific:

- :class:`BackendTask`: one prepared job (``DiffusionRegCoreLib.job``) run in the background
  from a Qt timer, with an injectable process factory;
- :class:`DiffusionRegCoreLogic`: locations, the worker's Python, first-use dependency
  installation, settings, the device probe, the model manager;
- :class:`JobPanel`: the widgets every module panel has (modality and model selectors with the
  model that will run, model buttons, device selector, temporary files, dependency install,
  the Run <-> Cancel button with the reason it is disabled as text, one weighted progress bar
  with elapsed/remaining time, and the log). A module adds only its inputs, options and result
  handling (see SpatialDiffusionReg.py).

The testable parts live in ``DiffusionRegCoreLib`` (no Qt there); this file adds the Qt/Slicer
glue. Nothing heavy happens at import or in ``setup()``: torch is never imported into Slicer's
process, and dependencies are only installed when the user runs a job (or presses "Install").
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4

    def _(text):
        return text


from DiffusionRegCoreLib import command as backendCommand
from DiffusionRegCoreLib import device as deviceProbe
from DiffusionRegCoreLib import install as dependencyInstall
from DiffusionRegCoreLib import model_choice, mrml_io, paths
from DiffusionRegCoreLib import models as modelRegistry
from DiffusionRegCoreLib.job import JobOutcome, PreparedJob, finishJob, nextJob, prefixedProgress, runJob
from DiffusionRegCoreLib.process import BackendProcess, WorkFolder
from DiffusionRegCoreLib.progress import OverallProgress, ProgressEvent

#: Lib modules in dependency order (reloaded by the modules' "Reload" in developer mode).
LIB_MODULES = (
    "DiffusionRegCoreLib.paths",
    "DiffusionRegCoreLib.progress",
    "DiffusionRegCoreLib.command",
    "DiffusionRegCoreLib.process",
    "DiffusionRegCoreLib.job",
    "DiffusionRegCoreLib.mrml_io",
    "DiffusionRegCoreLib.results",
    "DiffusionRegCoreLib.device",
    "DiffusionRegCoreLib.models",
    "DiffusionRegCoreLib.model_choice",
    "DiffusionRegCoreLib.install",
)

SETTINGS_DEVICE = "DiffusionReg/Device"
#: The requirement files of the backend's affine path (every module needs these).
COMMON_REQUIREMENTS = "requirements.txt"

#: Running tasks, kept referenced so their timers live even if the caller drops the task.
_ACTIVE_TASKS: set = set()


def reloadLib(extraModules: Sequence[str] = ()) -> None:
    """Reload DiffusionRegCoreLib (+ a module's own Lib) and DiffusionRegCore (importlib; ``imp`` is gone in 3.12)."""
    for name in (*LIB_MODULES, *extraModules):
        importlib.reload(importlib.import_module(name))
    import DiffusionRegCore

    importlib.reload(DiffusionRegCore)


#
# DiffusionRegCore
#


class DiffusionRegCore(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DiffusionReg Core")
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.hidden = True
        self.parent.contributors = ["DiffusionReg developers (DiffusionReg project)"]
        self.parent.helpText = _(
            "Shared services of the DiffusionReg extension: dependency installation, device probe, "
            "background jobs, node import/export, result import and the model manager. "
            "Used by Spatial Diffusion Registration and the other DiffusionReg modules."
        )
        self.parent.acknowledgementText = _(
            "DiffusionReg builds on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and SimpleITK."
        )


#
# Sample data: a fixed/moving pair shipped in Resources/Sample, offered in the Sample Data module
#


@dataclass(frozen=True)
class SamplePair:
    """A sample pair of the extension (``Resources/Sample``), listed in the Sample Data module.

    ``sha256``: file name -> sha256, fixed first (a pair) or a single volume. Module files keep
    them as constants: Sample Data checks the files against them (a checksum computed from the file
    it checks would check nothing). ``nodeNames``: one per file, in the same order.
    """

    name: str
    sha256: Mapping[str, str]
    nodeNames: tuple[str, ...]
    thumbnail: Path
    category: str = "DiffusionReg"

    def files(self) -> list[Path]:
        return [paths.extensionResourcePath("Sample", name) for name in self.sha256]

    def available(self) -> bool:
        return all(f.is_file() for f in self.files())

    def register(self) -> None:
        """Add the pair to the Sample Data module (local files, sha256-checked)."""
        try:
            import SampleData
        except ImportError:
            return
        if not self.available():
            logging.info(f"{self.name}: sample data not found; not registered in Sample Data")
            return
        files = self.files()
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=self.category,
            sampleName=self.name,
            thumbnailFileName=str(self.thumbnail),
            uris=[f.as_uri() for f in files],
            fileNames=[f"DiffusionReg_{f.name}" for f in files],
            nodeNames=list(self.nodeNames),
            checksums=[f"SHA256:{self.sha256[f.name]}" for f in files],
        )

    def load(self) -> tuple:
        """Load the files (through Sample Data, else directly); one node per file: ``(fixed, moving)`` for a pair."""
        self.register()
        nodes = []
        try:
            import SampleData

            nodes = SampleData.SampleDataLogic().downloadSamples(self.name)
        except Exception as error:  # fall back to loading the files directly
            logging.warning(f"Sample Data could not load {self.name} ({error}); loading the files directly")
        if len(nodes) != len(self.sha256) or not all(hasattr(n, "GetImageData") for n in nodes):
            files = self.files()
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError("sample data not found: " + ", ".join(missing))
            nodes = [slicer.util.loadVolume(str(f), {"name": name}) for f, name in zip(files, self.nodeNames)]
        return tuple(nodes)


#
# Background task: one prepared job driven by a QTimer
#


class BackendTask:
    """A :class:`PreparedJob` running in the background inside Slicer.

    ``processFactory`` (default :class:`BackendProcess`) is injectable, like
    :func:`DiffusionRegCoreLib.job.runJob`'s. ``onFinished(task)`` always runs last; ``state`` is
    ``running``, ``completed``, ``cancelled`` or ``failed`` and ``outputs`` what the job imported.
    """

    POLL_INTERVAL_MS = 100

    def __init__(
        self,
        job: PreparedJob,
        processFactory=BackendProcess,
        keepTemporaryFiles: bool = False,
        onProgress: Callable[[ProgressEvent], None] | None = None,
        onLog: Callable[[str], None] | None = None,
        onFinished: Callable[[BackendTask], None] | None = None,
    ) -> None:
        self.job = job
        self.processFactory = processFactory
        self.keepTemporaryFiles = keepTemporaryFiles
        self.onProgress = onProgress
        self.onLog = onLog
        self.onFinished = onFinished
        self.state = "idle"
        self.outcome: JobOutcome | None = None
        self._process = None
        self._timer: qt.QTimer | None = None

    @property
    def outputs(self):
        return self.outcome.outputs if self.outcome else None

    @property
    def error(self) -> str | None:
        return self.outcome.error if self.outcome else None

    @property
    def processResult(self):
        return self.outcome.processResult if self.outcome else None

    def start(self) -> BackendTask:
        """Start the job's process; a chained job's next steps start when the previous one completed."""
        self._log(f"Running: {backendCommand.quoteCommand(self.job.command)}")
        for note in self.job.notes:
            self._log(note)
        self._process = self.processFactory(
            self.job.command,
            env=self.job.env,
            cwd=str(self.job.workFolder.path),
            onProgress=prefixedProgress(self.onProgress, self.job.stagePrefix),
            onLog=lambda line, stream: self._log(line),
            onFinished=self._processFinished,
        )
        try:
            self._process.start()
        except OSError as error:
            self.job.workFolder.cleanup()
            raise RuntimeError(f"could not start {self.job.command[0]}: {error}") from error
        self.state = "running"
        _ACTIVE_TASKS.add(self)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)
        self._timer.start()
        return self

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self) -> None:
        """Stop the backend (whole process tree); the task then ends as ``cancelled``."""
        if self._process is not None and self.state == "running":
            self._log("Cancelling...")
            self._process.cancel()

    def wait(self, timeout: float | None = None) -> BackendTask:
        """Block (keeping Slicer responsive) until the task has ended; cancel after ``timeout`` s."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self._poll()
            if self.running:
                slicer.app.processEvents()
                time.sleep(0.05)
            if deadline is not None and time.monotonic() > deadline and self.running:
                self.cancel()
                deadline = None
        return self

    def _poll(self) -> None:
        if self._process is not None and self.state == "running":
            self._process.poll()

    def _log(self, line: str) -> None:
        logging.info(f"{self.job.name}: {line}")
        if self.onLog:
            self.onLog(line)

    def _processFinished(self, process) -> None:
        if self._timer is not None:
            self._timer.stop()
        outcome = finishJob(self.job, process.result(), self.keepTemporaryFiles, self._log)
        following, outcome = nextJob(self.job, outcome, self._log)
        if following is not None:
            self.job = following
            try:
                self.start()
                return
            except RuntimeError as error:
                outcome = JobOutcome("failed", outcome.outputs, str(error), outcome.processResult)
        self.outcome = outcome
        self.state = self.outcome.state
        _ACTIVE_TASKS.discard(self)
        if self.onFinished:
            self.onFinished(self)

    @staticmethod
    def activeTasks() -> list:
        """Tasks still running in this session (e.g. to cancel them all)."""
        return list(_ACTIVE_TASKS)


#
# DiffusionRegCoreLogic
#


class DiffusionRegCoreLogic(ScriptedLoadableModuleLogic):
    """Services for the DiffusionReg modules (usable from the Python console too)."""

    #: Device probe result shared by all modules of this session (probing imports torch: ~seconds).
    deviceInfo: deviceProbe.DeviceInfo | None = None

    def __init__(self, processFactory=BackendProcess):
        ScriptedLoadableModuleLogic.__init__(self)
        self.processFactory = processFactory

    # --- locations --------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """``PythonSlicer``; raises :class:`command.PythonSlicerNotFound` with a clear message."""
        return backendCommand.pythonExecutable(slicer.app.slicerHome, inSlicer=True)

    @staticmethod
    def backendRoot() -> Path:
        return paths.backendRoot()

    @staticmethod
    def requirementFiles(*extra: str) -> list[Path]:
        """The common requirement file plus a module's extra ones (e.g. ``requirements-deformable.txt``)."""
        return [paths.coreResourcePath(name) for name in (COMMON_REQUIREMENTS, *extra)]

    @staticmethod
    def modelManager() -> modelRegistry.ModelManager:
        return modelRegistry.ModelManager(paths.modelsRegistryPath(), paths.userModelsDir())

    @staticmethod
    def temporaryParent() -> str:
        return str(Path(slicer.app.temporaryPath) / "DiffusionReg")

    def createWorkFolder(self) -> WorkFolder:
        return WorkFolder(self.temporaryParent())

    @staticmethod
    def openFolder(path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    # --- dependencies -----------------------------------------------------------------
    def dependencyPlan(self, requirementFiles=None) -> dependencyInstall.InstallPlan:
        return dependencyInstall.currentPlan(requirementFiles or self.requirementFiles())

    def ensureDependencies(
        self, requirementFiles=None, requester: str = "DiffusionReg", askConfirmation: bool = True, log=None
    ) -> bool:
        """Install what the module's requirement files list after one confirmation (see DiffusionRegCoreLib.install)."""
        return dependencyInstall.ensureDependencies(requirementFiles or self.requirementFiles(), requester, askConfirmation, log)

    # --- settings ---------------------------------------------------------------------
    @staticmethod
    def savedDevice() -> str:
        value = qt.QSettings().value(SETTINGS_DEVICE, "auto")
        return str(value) if value else "auto"

    @staticmethod
    def saveDevice(device: str) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, device)

    # --- jobs -------------------------------------------------------------------------
    def backendEnvironment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return backendCommand.backendEnvironment(self.backendRoot(), extra=extra)

    def startJob(self, job: PreparedJob, **kwargs) -> BackendTask:
        """Run ``job`` in the background; see :class:`BackendTask` for the callbacks."""
        return BackendTask(job, self.processFactory, **kwargs).start()

    def runToEnd(
        self,
        job: PreparedJob,
        timeout: float | None = None,
        keepTemporaryFiles: bool = False,
        onProgress: Callable[[ProgressEvent], None] | None = None,
        onLog: Callable[[str], None] | None = None,
    ):
        """Run ``job`` (and the steps chained after it) and wait, Slicer staying responsive.

        Returns what the job imported; raises RuntimeError when it failed or was cancelled
        (``timeout`` seconds per step cancels it).
        """
        outcome = runJob(job, self.processFactory, timeout, keepTemporaryFiles, onProgress, onLog, idle=slicer.app.processEvents)
        if outcome.state != "completed":
            raise RuntimeError(f"{job.name} {outcome.state}: {outcome.error or 'see the log'}")
        return outcome.outputs

    @staticmethod
    def showOverlay(fixedVolume, movingVolume, resampledVolume=None) -> None:
        """Fixed volume in the background, the resampled volume (else the moving one, shown through
        its transform) on top at 50 %; the resampled volume gets the moving volume's colours."""
        if resampledVolume is not None:
            if resampledVolume.GetDisplayNode() is None:
                resampledVolume.CreateDefaultDisplayNodes()
            source = movingVolume.GetDisplayNode()
            if source is not None and source.GetColorNodeID():
                resampledVolume.GetDisplayNode().SetAndObserveColorNodeID(source.GetColorNodeID())
        foreground = resampledVolume or movingVolume
        slicer.util.setSliceViewerLayers(background=fixedVolume, foreground=foreground, foregroundOpacity=0.5, fit=False)

    def probeDevices(
        self, onFinished: Callable[[deviceProbe.DeviceInfo], None] | None = None, wait: bool = False, timeout: float = 180.0
    ):
        """Find torch devices in a subprocess; the result is also kept in ``deviceInfo``."""
        probe = deviceProbe.probeCommand(self.pythonExecutable())  # may fail: before any folder exists

        def parse(processResult):
            info = deviceProbe.parseProbeOutput("\n".join(processResult.log))
            DiffusionRegCoreLogic.deviceInfo = info
            return info

        job = PreparedJob("DiffusionReg device probe", probe, self.createWorkFolder(), parse, env=self.backendEnvironment())

        def done(task: BackendTask):
            # Always answer (a failed or cancelled probe too), so the caller's button comes back.
            info = task.outputs if task.outputs is not None else parse(task.processResult)
            if onFinished:
                onFinished(info)

        task = self.startJob(job, onFinished=done)
        if wait:
            task.wait(timeout)
            return DiffusionRegCoreLogic.deviceInfo
        return task

    def downloadModelJob(self, name: str) -> PreparedJob:
        """``diffusionreg models pull NAME``: the backend downloads and sha256-checks registry weights."""
        commandLine = backendCommand.backendCommand(self.pythonExecutable(), ["models", "pull"], [name])
        return PreparedJob(
            f"DiffusionReg download {name}",
            commandLine,
            self.createWorkFolder(),
            lambda result: name,
            {"download": 1.0},
            env=self.backendEnvironment(),
        )


#
# The panel kit
#


class JobPanel:
    """The shared part of a DiffusionReg module panel, added below the module's own ``.ui``.

    The module passes:

    - ``task``: the model task (``affine``, ``deformable``) whose installed models fill the
      modality and model selectors;
    - ``validate()``: returns "" when the job can run, else the reason (shown beside Run);
    - ``start(panel)``: prepares and starts the job (``logic.startJob``) and returns the task;
      the panel's :meth:`onProgress`, :meth:`log` and :meth:`onFinished` are the callbacks to use;
    - ``requirementFiles``: what must be installed before a run;
    - ``onResult(outputs)``: optional, called on the main thread after a completed run;
    - ``onModelChanged()``: optional, called when the modality or model selection changes.
    """

    def __init__(
        self,
        parentLayout,
        task: str,
        validate: Callable[[], str],
        start: Callable[[JobPanel], BackendTask],
        requirementFiles: Sequence[Path],
        requester: str,
        runText: str = "Run",
        onResult: Callable[[object], None] | None = None,
        logic: DiffusionRegCoreLogic | None = None,
        onModelChanged: Callable[[], None] | None = None,
    ) -> None:
        self.task = task
        self.validate = validate
        self.startJob = start
        self.requirementFiles = list(requirementFiles)
        self.requester = requester
        self.runText = runText
        self.onResult = onResult
        self.onModelChanged = onModelChanged
        self.logic = logic or DiffusionRegCoreLogic()
        self.runningTask: BackendTask | None = None
        self._overall: OverallProgress | None = None
        self._entries: list = []
        self._updating = False
        self._build(parentLayout)
        self.populateDevices()
        self.populateModels()
        self.setIdle(_("Idle"))

    # --- widgets ---------------------------------------------------------------------------
    def _build(self, parentLayout) -> None:
        import ctk

        modelSection = ctk.ctkCollapsibleButton()
        modelSection.text = _("Model")
        parentLayout.addWidget(modelSection)
        form = qt.QFormLayout(modelSection)
        self.modalityComboBox = qt.QComboBox()
        self.modalityComboBox.toolTip = _("Only modalities that an installed model supports are listed")
        form.addRow(_("Modality:"), self.modalityComboBox)
        self.modelComboBox = qt.QComboBox()
        form.addRow(_("Model:"), self.modelComboBox)
        self.modelInfoLabel = qt.QLabel()
        self.modelInfoLabel.wordWrap = True
        form.addRow("", self.modelInfoLabel)
        buttons = qt.QHBoxLayout()
        self.downloadModelButton = qt.QPushButton(_("Download"))
        self.downloadModelButton.toolTip = _("Download the selected model (sha256-checked) into your models folder")
        self.importModelButton = qt.QPushButton(_("Import..."))
        self.verifyModelsButton = qt.QPushButton(_("Verify"))
        self.openModelsFolderButton = qt.QPushButton(_("Open folder"))
        for button in (self.downloadModelButton, self.importModelButton, self.verifyModelsButton, self.openModelsFolderButton):
            buttons.addWidget(button)
        form.addRow(_("Models:"), buttons)

        advanced = ctk.ctkCollapsibleButton()
        advanced.text = _("Device and dependencies")
        advanced.collapsed = True
        parentLayout.addWidget(advanced)
        form = qt.QFormLayout(advanced)
        deviceRow = qt.QHBoxLayout()
        self.deviceComboBox = qt.QComboBox()
        self.detectDevicesButton = qt.QPushButton(_("Detect"))
        deviceRow.addWidget(self.deviceComboBox, 1)
        deviceRow.addWidget(self.detectDevicesButton)
        form.addRow(_("Device:"), deviceRow)
        self.deviceInfoLabel = qt.QLabel()
        self.deviceInfoLabel.wordWrap = True
        form.addRow("", self.deviceInfoLabel)
        tempRow = qt.QHBoxLayout()
        self.keepTemporaryFilesCheckBox = qt.QCheckBox(_("Keep"))
        self.keepTemporaryFilesCheckBox.toolTip = _("Keep the files exchanged with the backend (to repeat the logged command)")
        self.showTemporaryFolderButton = qt.QPushButton(_("Show folder"))
        tempRow.addWidget(self.keepTemporaryFilesCheckBox)
        tempRow.addWidget(self.showTemporaryFolderButton)
        form.addRow(_("Temporary files:"), tempRow)
        self.installDependenciesButton = qt.QPushButton(_("Install dependencies"))
        form.addRow(_("Python packages:"), self.installDependenciesButton)

        runRow = qt.QHBoxLayout()
        self.runButton = qt.QPushButton(self.runText)
        self.reasonLabel = qt.QLabel()
        self.reasonLabel.wordWrap = True
        self.reasonLabel.setStyleSheet("color: #b05000")
        runRow.addWidget(self.runButton)
        runRow.addWidget(self.reasonLabel, 1)
        parentLayout.addLayout(runRow)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 1000)  # per mille: smooth over long runs
        parentLayout.addWidget(self.progressBar)
        logSection = ctk.ctkCollapsibleButton()
        logSection.text = _("Log")
        parentLayout.addWidget(logSection)
        box = qt.QVBoxLayout(logSection)
        self.logTextEdit = qt.QPlainTextEdit()
        self.logTextEdit.readOnly = True
        self.logTextEdit.maximumBlockCount = 5000
        box.addWidget(self.logTextEdit)

        self.runButton.connect("clicked(bool)", self.onRunButton)
        self.modalityComboBox.connect("currentIndexChanged(int)", lambda index: self._modalityChanged())
        self.modelComboBox.connect("currentIndexChanged(int)", lambda index: self.updateModelInfo())
        self.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        self.showTemporaryFolderButton.connect("clicked(bool)", lambda: self.logic.openFolder(self.logic.temporaryParent()))
        self.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.verifyModelsButton.connect("clicked(bool)", self.onVerifyModels)
        self.openModelsFolderButton.connect("clicked(bool)", lambda: self.logic.openFolder(paths.userModelsDir()))
        self.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

    # --- values the module reads ---------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.modalityComboBox.currentData or ""

    @property
    def model(self) -> str:
        """``--model``: "" for the modality's default."""
        return self.modelComboBox.currentData or ""

    @property
    def device(self) -> str:
        return self.deviceComboBox.currentData or "auto"

    @property
    def keepTemporaryFiles(self) -> bool:
        return bool(self.keepTemporaryFilesCheckBox.checked)

    def selectModality(self, modality: str) -> None:
        index = self.modalityComboBox.findData(modality)
        if index >= 0:
            self.modalityComboBox.currentIndex = index

    def selectModel(self, model: str) -> None:
        index = self.modelComboBox.findData(model or "")
        self.modelComboBox.currentIndex = max(index, 0)

    # --- models (issue: only what is installed is offered) --------------------------------
    def populateModels(self) -> None:
        try:
            self._entries = [e for e in self.logic.modelManager().models(self.task)]
        except ValueError as error:
            self._entries = []
            self.log(str(error))
        previous = self.modality
        self._updating = True
        try:
            self.modalityComboBox.clear()
            for modality in model_choice.installedModalities(self._entries, self.task):
                self.modalityComboBox.addItem(model_choice.modalityLabel(modality), modality)
        finally:
            self._updating = False
        self.selectModality(previous)
        self._modalityChanged()

    def _modalityChanged(self) -> None:
        if self._updating:
            return
        previous = self.model
        self._updating = True
        try:
            combo = self.modelComboBox
            combo.clear()
            combo.addItem(_("Default for the modality"), "")
            for entry in self._entries:
                if entry.modality not in (self.modality, model_choice.ANY):
                    continue
                # Listed so the user sees it ("name (download)" when not installed yet); choosing one
                # that is not installed disables Register with the reason.
                missing = _(" (file missing)") if entry.state == "missing" else ""
                combo.addItem(entry.label() + missing, entry.modelArgument())
        finally:
            self._updating = False
        self.selectModel(previous)
        self.updateModelInfo()

    def updateModelInfo(self) -> None:
        if self._updating:
            return
        if not self.modality:
            self.modelInfoLabel.text = _("No {task} model is installed: import one, or download one below.").format(
                task=self.task
            )
        else:
            entry, reason = model_choice.modelToRun(self._entries, self.task, self.modality, self.model)
            self.modelInfoLabel.text = model_choice.describeModel(entry) if entry else reason
        downloadable = [e for e in self._entries if e.state == "downloadable"]
        self.downloadModelButton.enabled = bool(downloadable)
        if self.onModelChanged:
            self.onModelChanged()
        self.updateRunButton()

    def modelReason(self) -> str:
        """Why the selected modality/model cannot run ("" when it can)."""
        if not self.modality:
            return _("No {task} model is installed").format(task=self.task)
        return model_choice.modelToRun(self._entries, self.task, self.modality, self.model)[1]

    def onDownloadModel(self) -> None:
        names = [e.name for e in self._entries if e.state == "downloadable"]
        if not names:
            return
        name = (
            names[0]
            if len(names) == 1
            else qt.QInputDialog.getItem(self.runButton, _("Download model"), _("Model:"), names, 0, False)
        )
        if not name:
            return
        self._startTask(
            lambda: self.logic.startJob(
                self.logic.downloadModelJob(name), onProgress=self.onProgress, onLog=self.log, onFinished=self._downloadFinished
            ),
            {"download": 1.0},
        )

    def _downloadFinished(self, task: BackendTask) -> None:
        self.onFinished(task, quiet=True)
        self.populateModels()

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.runButton, _("Import model weights"), "", _("Model files (*.safetensors *.pt *.pth);;All files (*)")
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            entry = self.logic.modelManager().importFile(path, task=self.task, modality=self.modality or "any")
            self.log(f"Imported model '{entry.name}' to {entry.path} (sha256 {entry.sha256}).")
            self.populateModels()
            self.selectModel(entry.modelArgument())

    def onVerifyModels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to verify the models."), waitCursor=True):
            results = self.logic.modelManager().verifyAll(self.task)
            for result in results:
                self.log(result.text())
            if not results:
                self.log(_("No models are registered."))
            bad = [r for r in results if r.status in ("mismatch", "missing")]
            if bad:
                slicer.util.warningDisplay("\n".join(r.text() for r in bad), windowTitle=_("Model checksums"))

    # --- devices ---------------------------------------------------------------------------
    def populateDevices(self) -> None:
        combo = self.deviceComboBox
        saved = self.logic.savedDevice()
        self._updating = True
        try:
            combo.clear()
            for label, value in deviceProbe.deviceChoices(DiffusionRegCoreLogic.deviceInfo):
                combo.addItem(label, value)
            index = combo.findData(saved)
            if index < 0:
                combo.addItem(saved, saved)
                index = combo.count - 1
            combo.currentIndex = index
        finally:
            self._updating = False
        self.updateDeviceInfo()

    def onDeviceChanged(self, index: int) -> None:
        if self._updating:
            return
        self.logic.saveDevice(self.device)
        self.updateDeviceInfo()

    def updateDeviceInfo(self) -> None:
        info = DiffusionRegCoreLogic.deviceInfo
        if info is None:
            self.deviceInfoLabel.text = _("Devices not detected yet (press Detect).")
            return
        self.deviceInfoLabel.text = "\n".join([info.summary()] + deviceProbe.deviceWarnings(info, self.device))

    def onDetectDevices(self) -> None:
        self.detectDevicesButton.enabled = False
        self.deviceInfoLabel.text = _("Detecting devices (starts Python with PyTorch)...")

        def done(info):
            self.detectDevicesButton.enabled = True
            self.populateDevices()

        try:
            self.logic.probeDevices(done)
        except Exception as error:
            self.detectDevicesButton.enabled = True
            self.deviceInfoLabel.text = str(error)

    # --- dependencies ----------------------------------------------------------------------
    def onInstallDependencies(self) -> None:
        if self.ensureDependencies():
            self.log(_("All dependencies are installed."))

    def ensureDependencies(self) -> bool:
        """Install what is missing (one confirmation); on failure the panel stays idle with the error shown."""
        try:
            return self.logic.ensureDependencies(self.requirementFiles, self.requester, log=self.log)
        except Exception as error:
            self.fail(_("Installing the dependencies failed: {error}").format(error=error))
            return False

    # --- run <-> cancel ----------------------------------------------------------------------
    def updateRunButton(self) -> None:
        """Run (enabled, or disabled with the reason as text beside it) or Cancel while running."""
        if self.runningTask is not None and self.runningTask.running:
            self.runButton.text = _("Cancel")
            self.runButton.enabled = True
            self.runButton.toolTip = _("Stop the job (ends the backend process)")
            self.reasonLabel.text = ""
            return
        self.runButton.text = self.runText
        reason = self.validate() or self.modelReason()
        self.runButton.enabled = not reason
        self.runButton.toolTip = reason
        self.reasonLabel.text = reason

    def onRunButton(self) -> None:
        if self.runningTask is not None and self.runningTask.running:
            self.runningTask.cancel()
            self.runButton.text = _("Cancelling...")
            self.runButton.enabled = False
            return
        self.logTextEdit.clear()
        self.progressBar.value = 0
        self.progressBar.setFormat(_("Checking dependencies..."))
        if not self.ensureDependencies():
            if self.progressBar.format == _("Checking dependencies..."):
                self.setIdle(_("Not started: dependencies are not installed"))
            return
        self._startTask(lambda: self.startJob(self), None)

    def _startTask(self, start: Callable[[], BackendTask], weights) -> None:
        try:
            self.runningTask = start()
        except Exception as error:  # e.g. bad input found while exporting, PythonSlicer missing
            logging.exception(f"{self.requester}: could not start")
            self.fail(_("Could not start: {error}").format(error=error))
            return
        self._overall = OverallProgress(weights or self.runningTask.job.stageWeights or {"run": 1.0})
        self.progressBar.setFormat(_("Starting..."))
        self.updateRunButton()

    def onProgress(self, event: ProgressEvent) -> None:
        if self._overall is None:
            return
        status = self._overall.update(event)
        self.progressBar.value = int(round(status.fraction * 1000))
        self.progressBar.setFormat(status.text())

    def log(self, text: str) -> None:
        self.logTextEdit.appendPlainText(text)
        bar = self.logTextEdit.verticalScrollBar()
        bar.setValue(bar.maximum)

    def onFinished(self, task: BackendTask, quiet: bool = False) -> None:
        """The job ended: back to a clean idle state, the log kept, errors shown once."""
        self.runningTask = None
        seconds = task.processResult.elapsedSeconds if task.processResult else 0.0
        if task.state == "completed":
            self.progressBar.value = 1000
            self.setIdle(_("Done in {seconds:.1f} s").format(seconds=seconds), keepValue=True)
            if self.onResult and not quiet:
                self.onResult(task.outputs)
        elif task.state == "cancelled":
            self.setIdle(_("Cancelled"))
        else:
            self.fail(task.error or _("unknown error"), "\n".join(task.processResult.log[-200:]) if task.processResult else "")

    def fail(self, message: str, details: str = "") -> None:
        """Show one error, keep the log, and return to idle (Run enabled again when the inputs allow)."""
        self.runningTask = None
        self.log(message)
        self.setIdle(_("Failed: {message}").format(message=message.splitlines()[0][:120]))
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(message, windowTitle=self.requester, **extra)

    def setIdle(self, text: str, keepValue: bool = False) -> None:
        if not keepValue:
            self.progressBar.value = 0
        self.progressBar.setFormat(text)
        self._overall = None
        self.updateRunButton()

    def cancelRunning(self) -> None:
        if self.runningTask is not None and self.runningTask.running:
            self.runningTask.cancel()


#
# DiffusionRegCoreWidget: dependencies, devices and models for all modules
#
# The module logic every registration module derives from
#


class JobModuleLogic(ScriptedLoadableModuleLogic):
    """The logic of a DiffusionReg registration module, callable without the panel.

    ``coreLogic`` holds the injectable process runner (``processFactory``, default the real one).
    A module sets ``parameterNodeClass`` (its ``@parameterNodeWrapper`` class) and implements
    ``prepare(options) -> PreparedJob`` (raising ValueError with the reason a run cannot start);
    :meth:`start` (the background run the panel uses) and :meth:`run` (the blocking one behind
    the module's ``register(...)``) show the result the same way in every module.
    """

    parameterNodeClass = None

    def __init__(self, processFactory=BackendProcess) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.coreLogic = DiffusionRegCoreLogic(processFactory)

    def getParameterNode(self):
        return self.parameterNodeClass(super().getParameterNode())

    def prepare(self, options) -> PreparedJob:
        raise NotImplementedError

    def start(
        self,
        options,
        keepTemporaryFiles: bool = False,
        showResult: bool = True,
        onProgress=None,
        onLog=None,
        onFinished: Callable[[BackendTask], None] | None = None,
    ) -> BackendTask:
        """Start the registration in the background; the result is shown when it completes."""
        options.placeMoving = showResult
        job = self.prepare(options)

        def finished(task: BackendTask) -> None:
            if task.state == "completed" and showResult:
                self.showResult(options.fixedVolume, options.movingVolume, task.outputs)
            if onFinished:
                onFinished(task)

        return self.coreLogic.startJob(
            job, keepTemporaryFiles=keepTemporaryFiles, onProgress=onProgress, onLog=onLog, onFinished=finished
        )

    def run(self, options, timeout=None, keepTemporaryFiles: bool = False, onProgress=None, onLog=None):
        """Run ``options`` and wait (Slicer stays responsive); shows the result when ``options.placeMoving``.

        Raises ValueError for unusable inputs and RuntimeError when the run fails or is cancelled.
        """
        result = self.coreLogic.runToEnd(self.prepare(options), timeout, keepTemporaryFiles, onProgress, onLog)
        if options.placeMoving:
            self.showResult(options.fixedVolume, options.movingVolume, result)
        return result

    @staticmethod
    def showResult(fixedVolume, movingVolume, result) -> None:
        """Fixed volume in the background, the resampled (or transformed moving) volume on top."""
        DiffusionRegCoreLogic.showOverlay(fixedVolume, movingVolume, result.volumeNode)


#
# The module widget every registration module derives from
#


class JobModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The widget of a DiffusionReg registration module: its ``.ui`` (inputs, outputs, options bound
    to the parameter node by ``SlicerParameterName``), the kit's :class:`JobPanel` below, and the
    scene / parameter-node lifecycle every module shares.

    A module's ``<Module>Widget`` derives from it and sets ``task`` (the model task of the kit's
    selectors), ``requester`` (its title, for dialogs), ``libModules`` (its ``...Lib`` modules, for
    Reload) and, with a ``loadSampleDataButton`` in its ``.ui``, ``sample`` and ``sampleModality``.
    It implements :meth:`createLogic` (a logic with ``getParameterNode``, ``requirementFiles``,
    ``coreLogic``, ``optionsFromParameterNode``, ``start`` and ``loadSampleData``) and may extend
    :meth:`setupModule`, :meth:`onParametersChanged`, :meth:`onModelSelection`,
    :meth:`reasonNotToRun`, :meth:`startRegistration` and :meth:`onResult`. The parameter node has
    ``fixedVolume``, ``movingVolume``, ``modality``, ``model``, ``outputTransform`` and ``showResult``.
    A module that is not a registration (MidlineShift) sets ``runText`` and ``firstVolumeParameter``
    and overrides :meth:`onResult` and :meth:`onLoadSampleData`; its logic overrides ``start``.
    """

    task: str = ""
    requester: str = ""
    #: Text of the kit's run button ("" for "Register"), e.g. "Measure".
    runText: str = ""
    #: The parameter-node volume that gets the scene's first scalar volume while it is empty.
    firstVolumeParameter: str = "fixedVolume"
    libModules: tuple[str, ...] = ()
    sample: SamplePair | None = None
    sampleModality: str = ""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel: JobPanel | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    # --- what a module provides ---------------------------------------------------------
    def createLogic(self):
        raise NotImplementedError

    def setupModule(self) -> None:
        """Module widgets' connections, after the panel is built and before the parameter node is set."""

    def onParametersChanged(self) -> None:
        """The parameter node changed (the Register button is updated after this)."""

    # --- lifecycle ----------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()
        self.panel = JobPanel(
            self.layout,
            self.task,
            self.reasonNotToRun,
            self.startRegistration,
            self.logic.requirementFiles(),
            self.requester,
            self.runText or _("Register"),
            onResult=self.onResult,
            logic=self.logic.coreLogic,
            onModelChanged=self.onModelSelection,
        )
        self.layout.addStretch(1)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        if self.sample is not None:
            self.ui.loadSampleDataButton.connect("clicked(bool)", self.onLoadSampleData)
            self.ui.loadSampleDataButton.enabled = self.sample.available()
        self.setupModule()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cancelRunning()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.panel.populateModels()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)

    def onSceneStartClose(self, caller, event) -> None:
        self.panel.cancelRunning()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        reloadLib(self.libModules)
        ScriptedLoadableModuleWidget.onReload(self)

    # --- parameter node ---------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not getattr(self._parameterNode, self.firstVolumeParameter):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                setattr(self._parameterNode, self.firstVolumeParameter, first)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterChanged)
            self.panel.selectModality(self._parameterNode.modality)
            self.panel.selectModel(self._parameterNode.model)
            self.onModelSelection()  # a saved modality no installed model supports is not kept
        self._onParameterChanged()

    def _onParameterChanged(self, caller=None, event=None) -> None:
        if self._parameterNode:
            self.onParametersChanged()
        self.panel.updateRunButton()

    def onModelSelection(self) -> None:
        """Modality and model are chosen in the kit's selectors; the parameter node keeps them."""
        if self.panel is not None and self._parameterNode and self.panel.modality:
            self._parameterNode.modality = self.panel.modality
            self._parameterNode.model = self.panel.model

    # --- what the kit asks ---------------------------------------------------------------
    def options(self):
        """The job as the panel shows it (modality and model are what the kit's selectors show)."""
        options = self.logic.optionsFromParameterNode(self._parameterNode, device=self.panel.device)
        if self.panel.modality:  # none when no model is installed: the kit says so beside Register
            options.modality, options.model = self.panel.modality, self.panel.model
        return options

    def reasonNotToRun(self) -> str:
        if self._parameterNode is None:
            return _("No parameter node")
        return self.options().isValid()[1]

    def startRegistration(self, panel: JobPanel) -> BackendTask:
        return self.logic.start(
            self.options(),
            keepTemporaryFiles=panel.keepTemporaryFiles,
            showResult=self._parameterNode.showResult,
            onProgress=panel.onProgress,
            onLog=panel.log,
            onFinished=self.onTaskFinished,
        )

    def onTaskFinished(self, task: BackendTask) -> None:
        """The run ended (any state); the panel goes back to idle and calls :meth:`onResult` on success."""
        self.panel.onFinished(task)

    def onResult(self, result) -> None:
        for note in result.notes:
            self.panel.log(note)
        if self._parameterNode and result.transformNode is not None:
            self._parameterNode.outputTransform = result.transformNode

    def onLoadSampleData(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample data."), waitCursor=True):
            fixed, moving = self.logic.loadSampleData()
            self._parameterNode.fixedVolume = fixed
            self._parameterNode.movingVolume = moving
            self.panel.selectModality(self.sampleModality)
            slicer.util.setSliceViewerLayers(background=fixed, foreground=moving, foregroundOpacity=0.5, fit=True)


#


class DiffusionRegCoreWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = DiffusionRegCoreLogic()
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.layout.addWidget(self.statusLabel)
        # The same kit the modules use, for every task: here it only manages models/devices/dependencies.
        self.panel = JobPanel(
            self.layout,
            "affine",
            lambda: _("Use a DiffusionReg module to run a job"),
            lambda panel: None,
            self.logic.requirementFiles("requirements-deformable.txt"),
            "DiffusionReg",
        )
        self.layout.addStretch(1)

    def enter(self):
        try:
            plan = self.logic.dependencyPlan(self.panel.requirementFiles)
            self.statusLabel.text = (
                _("Python packages: all installed")
                if plan.empty
                else (_("Python packages missing: ") + ", ".join(plan.describe()))
            )
        except Exception as error:
            self.statusLabel.text = str(error)
        self.panel.populateModels()

    def onReload(self):
        reloadLib()
        ScriptedLoadableModuleWidget.onReload(self)


#
# DiffusionRegCoreTest
#


class DiffusionRegCoreTest(ScriptedLoadableModuleTest):
    """Fast checks of the shared services inside Slicer (no torch needed)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_progressParsing()
        self.setUp()
        self.test_affineFileImport()
        self.setUp()
        self.test_volumeRoundTrip()
        self.setUp()
        self.test_backgroundJob()

    def test_progressParsing(self):
        from DiffusionRegCoreLib.progress import parseErrorLine, parseProgressLine

        event = parseProgressLine('{"stage": "diffusion", "fraction": 0.5, "message": "step 5/10"}')
        self.assertEqual(event.stage, "diffusion")
        self.assertAlmostEqual(event.fraction, 0.5)
        self.assertIsNone(parseProgressLine("plain log line"))
        self.assertEqual(parseErrorLine("error: fixed image not found: x"), "fixed image not found: x")

    def test_affineFileImport(self):
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Affine ITK file -> transform node")
        itkTransform = sitk.AffineTransform(3)
        itkTransform.SetMatrix([1.1, 0.1, 0.0, -0.05, 0.95, 0.02, 0.0, 0.03, 1.02])
        itkTransform.SetTranslation([4.0, -3.0, 2.5])
        itkTransform.SetCenter([10.0, 20.0, -5.0])
        folder = DiffusionRegCoreLogic().createWorkFolder()
        try:
            path = folder.file("affine.h5")
            sitk.WriteTransform(itkTransform, str(path))
            node = mrml_io.importTransform(path, slicer.mrmlScene)
            self.assertEqual(node.GetClassName(), "vtkMRMLTransformNode")
            points = np.array([[0.0, 0.0, 0.0], [12.5, -40.0, 33.0]])
            expected = np.array([itkTransform.TransformPoint(p.tolist()) for p in points])
            np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), expected, atol=1e-6)
        finally:
            folder.cleanup()
        self.delayDisplay("Test passed")

    def test_volumeRoundTrip(self):
        import numpy as np

        self.delayDisplay("Volume export/import keeps geometry")
        array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)
        volume = slicer.util.addVolumeFromArray(array, name="roundtrip")
        volume.SetSpacing(1.5, 2.0, 2.5)
        volume.SetOrigin(-10.0, 20.0, 5.0)
        folder = DiffusionRegCoreLogic().createWorkFolder()
        try:
            path = mrml_io.exportVolume(volume, folder.file("volume.nrrd"))
            loaded = mrml_io.importVolume(path, slicer.mrmlScene)
            np.testing.assert_allclose(mrml_io.volumeIjkToRas(loaded), mrml_io.volumeIjkToRas(volume), atol=1e-6)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), array)
        finally:
            folder.cleanup()
        self.delayDisplay("Test passed")

    def test_backgroundJob(self):
        """A BackendTask runs PythonSlicer in the background: progress, log and the imported result."""
        self.delayDisplay("Background job with progress")
        logic = DiffusionRegCoreLogic()
        script = (
            "import json; [print(json.dumps({'stage': 'work', 'fraction': f / 4, 'message': ''}), flush=True) "
            "for f in range(5)]; print('done')"
        )
        job = PreparedJob(
            "self-test",
            [logic.pythonExecutable(), "-c", script],
            logic.createWorkFolder(),
            lambda result: "imported",
            {"work": 1.0},
        )
        events, lines = [], []
        task = logic.startJob(job, onProgress=events.append, onLog=lines.append).wait(120)
        self.assertEqual(task.state, "completed", task.error)
        self.assertEqual(task.outputs, "imported")
        self.assertEqual([e.fraction for e in events], [0.0, 0.25, 0.5, 0.75, 1.0])
        self.assertIn("done", lines)
        self.assertFalse(job.workFolder.path.exists())
        self.delayDisplay("Test passed")
