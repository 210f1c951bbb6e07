"""DiffusionRegCore: the hidden module shared by the DiffusionReg modules.

It owns what every module needs and nothing module-specific: installing the backend's
dependencies on first use, probing devices in a subprocess, running the backend in a
background process (progress, log, cancel, temporary folder), moving volumes and transforms
between MRML nodes and files, and the model manager. The testable parts live in
``DiffusionRegCoreLib`` (no Qt there); this file adds the Qt/Slicer glue.

Nothing heavy happens at import or in ``setup()``: torch is never imported into Slicer's
process by this extension, and dependencies are only installed when the user asks for a
registration (or presses "Install dependencies").
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4

    def _(text):
        return text


from DiffusionRegCoreLib import command as backendCommand
from DiffusionRegCoreLib import device as deviceProbe
from DiffusionRegCoreLib import install as dependencyInstall
from DiffusionRegCoreLib import models as modelRegistry
from DiffusionRegCoreLib import mrml_io, paths
from DiffusionRegCoreLib.process import BackendProcess, ProcessResult, WorkFolder
from DiffusionRegCoreLib.progress import ProgressEvent

#: Lib modules in dependency order (reloaded by the modules' "Reload" in developer mode).
LIB_MODULES = (
    "DiffusionRegCoreLib.paths",
    "DiffusionRegCoreLib.progress",
    "DiffusionRegCoreLib.command",
    "DiffusionRegCoreLib.process",
    "DiffusionRegCoreLib.mrml_io",
    "DiffusionRegCoreLib.device",
    "DiffusionRegCoreLib.models",
    "DiffusionRegCoreLib.install",
)

SETTINGS_DEVICE = "DiffusionReg/Device"

#: Running tasks, kept referenced so their timers live even if the caller drops the task.
_ACTIVE_TASKS: set = set()


def reloadLib() -> None:
    """Reload DiffusionRegCoreLib and DiffusionRegCore (importlib; ``imp`` is gone in 3.12)."""
    for name in LIB_MODULES:
        module = importlib.import_module(name)
        importlib.reload(module)
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
        self.parent.contributors = ["DiffusionReg developers"]
        self.parent.helpText = _(
            "Shared services of the DiffusionReg extension: dependency installation, device probe, "
            "background process runner, node import/export and model manager. "
            "Used by Spatial Diffusion Registration and the other DiffusionReg modules."
        )
        self.parent.acknowledgementText = _(
            "DiffusionReg builds on 3D Slicer, PyTorch (through the SlicerPyTorch extension), MONAI and SimpleITK."
        )


#
# Background task: one backend run driven by a QTimer
#


class BackendTask:
    """A backend run inside Slicer: process + temporary folder + result import.

    ``importResults(task)`` runs on the main thread after a successful exit (load the output
    files into nodes there); ``onFinished(task)`` always runs last. ``state`` is one of
    ``running``, ``importing``, ``completed``, ``cancelled``, ``failed``.
    """

    POLL_INTERVAL_MS = 100

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        workFolder: WorkFolder,
        keepTemporaryFiles: bool = False,
        onProgress: Callable[[ProgressEvent], None] | None = None,
        onLog: Callable[[str], None] | None = None,
        importResults: Callable[["BackendTask"], object] | None = None,
        onFinished: Callable[["BackendTask"], None] | None = None,
        name: str = "DiffusionReg",
    ) -> None:
        self.command = command
        self.env = env
        self.workFolder = workFolder
        self.keepTemporaryFiles = keepTemporaryFiles
        self.onProgress = onProgress
        self.onLog = onLog
        self.importResults = importResults
        self.onFinished = onFinished
        self.name = name
        self.state = "idle"
        self.error: str | None = None
        self.outputs: object = None
        self.processResult: ProcessResult | None = None
        self._process: BackendProcess | None = None
        self._timer: qt.QTimer | None = None

    def start(self) -> "BackendTask":
        self._log(f"Running: {backendCommand.quoteCommand(self.command)}")
        self._process = BackendProcess(
            self.command, env=self.env, cwd=str(self.workFolder.path),
            onProgress=self.onProgress, onLog=lambda line, stream: self._log(line), onFinished=self._processFinished,
        )
        try:
            self._process.start()
        except OSError as error:
            self.state = "failed"
            self.error = f"could not start {self.command[0]}: {error}"
            self._cleanup()
            raise RuntimeError(self.error) from error
        self.state = "running"
        _ACTIVE_TASKS.add(self)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)
        self._timer.start()
        return self

    @property
    def running(self) -> bool:
        return self.state in ("running", "importing")

    def cancel(self) -> None:
        """Stop the backend (whole process tree); the task then ends as ``cancelled``."""
        if self._process is not None and self.state == "running":
            self._log("Cancelling...")
            self._process.cancel()

    def wait(self, timeout: float | None = None) -> "BackendTask":
        """Block (keeping Slicer responsive) until the task has ended."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            self._poll()
            if self.running:
                slicer.app.processEvents()
                time.sleep(0.05)
            if deadline is not None and time.monotonic() > deadline and self.state == "running":
                self.cancel()
                deadline = None
        return self

    def _poll(self) -> None:
        if self._process is not None and self.state == "running":
            self._process.poll()

    def _log(self, line: str) -> None:
        logging.info(f"{self.name}: {line}")
        if self.onLog:
            self.onLog(line)

    def _processFinished(self, process: BackendProcess) -> None:
        if self._timer is not None:
            self._timer.stop()
        self.processResult = process.result()
        if process.cancelled:
            self.state = "cancelled"
            self._log("Cancelled.")
        elif not self.processResult.succeeded:
            self.state = "failed"
            self.error = self.processResult.summary()
            self._log(f"Failed: {self.error}")
        else:
            self.state = "importing"
            try:
                if self.importResults is not None:
                    self.outputs = self.importResults(self)
                self.state = "completed"
                self._log(f"Completed in {self.processResult.elapsedSeconds:.1f} s.")
            except Exception as error:  # noqa: BLE001 - reported to the user
                logging.exception(f"{self.name}: loading the results failed")
                self.state = "failed"
                self.error = f"loading the results failed: {error}"
                self._log(self.error)
        self._cleanup()
        _ACTIVE_TASKS.discard(self)
        if self.onFinished:
            self.onFinished(self)

    @staticmethod
    def activeTasks() -> list:
        """Tasks still running in this session (e.g. to cancel them all)."""
        return list(_ACTIVE_TASKS)

    def _cleanup(self) -> None:
        if self.keepTemporaryFiles:
            self._log(f"Temporary files kept in {self.workFolder.path}")
        else:
            self.workFolder.cleanup()


#
# DiffusionRegCoreLogic
#


class DiffusionRegCoreLogic(ScriptedLoadableModuleLogic):
    """Services for the DiffusionReg modules (usable from the Python console too)."""

    #: Device probe result shared by all modules of this session (probing imports torch: ~seconds).
    deviceInfo: deviceProbe.DeviceInfo | None = None

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    # --- locations --------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        return backendCommand.pythonExecutable(slicer.app.slicerHome)

    @staticmethod
    def backendRoot() -> Path:
        return paths.backendRoot()

    @staticmethod
    def requirementsPath() -> Path:
        return paths.coreResourcePath("requirements.txt")

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
    def dependencyPlan(self) -> dependencyInstall.InstallPlan:
        return dependencyInstall.currentPlan(self.requirementsPath())

    def dependenciesInstalled(self) -> bool:
        return self.dependencyPlan().empty

    def ensureDependencies(self, requester: str = "DiffusionReg", askConfirmation: bool = True, log=None) -> bool:
        """Install missing dependencies after one confirmation (see DiffusionRegCoreLib.install)."""
        return dependencyInstall.ensureDependencies(self.requirementsPath(), requester, askConfirmation, log)

    # --- settings ---------------------------------------------------------------------
    @staticmethod
    def savedDevice() -> str:
        value = qt.QSettings().value(SETTINGS_DEVICE, "auto")
        return str(value) if value else "auto"

    @staticmethod
    def saveDevice(device: str) -> None:
        qt.QSettings().setValue(SETTINGS_DEVICE, device)

    # --- processes --------------------------------------------------------------------
    def backendEnvironment(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return backendCommand.backendEnvironment(self.backendRoot(), extra=extra)

    def startTask(self, command, workFolder: WorkFolder, **kwargs) -> BackendTask:
        """Start ``command`` in the background; see :class:`BackendTask` for the callbacks."""
        env = kwargs.pop("env", None) or self.backendEnvironment()
        return BackendTask(command, env, workFolder, **kwargs).start()

    def probeDevices(self, onFinished: Callable[[deviceProbe.DeviceInfo], None] | None = None,
                     wait: bool = False, timeout: float = 180.0):
        """Find torch devices in a subprocess; the result is also kept in ``deviceInfo``.

        With ``wait`` returns the DeviceInfo; otherwise returns the running BackendTask and
        calls ``onFinished(info)`` when done.
        """
        workFolder = self.createWorkFolder()

        def done(task: BackendTask):
            output = "\n".join(task.processResult.log if task.processResult else [])
            info = deviceProbe.parseProbeOutput(output)
            DiffusionRegCoreLogic.deviceInfo = info
            if onFinished:
                onFinished(info)

        task = BackendTask(deviceProbe.probeCommand(self.pythonExecutable()), self.backendEnvironment(),
                           workFolder, onFinished=done, name="DiffusionReg device probe").start()
        if wait:
            task.wait(timeout)
            return DiffusionRegCoreLogic.deviceInfo
        return task

    # --- nodes ------------------------------------------------------------------------
    @staticmethod
    def exportVolume(volumeNode, path, world=True, stopAt=None):
        return mrml_io.exportVolume(volumeNode, path, world=world, stopAt=stopAt)

    @staticmethod
    def importVolume(path, volumeNode=None, name=None):
        return mrml_io.importVolume(path, slicer.mrmlScene, volumeNode, name)

    @staticmethod
    def importTransform(path, transformNode=None, name=None, movingNode=None, fixedNode=None):
        return mrml_io.importTransform(path, slicer.mrmlScene, transformNode, name, movingNode, fixedNode)


#
# DiffusionRegCoreWidget: a small panel for dependencies, devices and models
#


class DiffusionRegCoreWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = DiffusionRegCoreLogic()

        dependencies = qt.QGroupBox(_("Dependencies"))
        self.layout.addWidget(dependencies)
        form = qt.QFormLayout(dependencies)
        self.dependencyLabel = qt.QLabel(_("not checked"))
        self.dependencyLabel.wordWrap = True
        form.addRow(_("Status:"), self.dependencyLabel)
        self.installButton = qt.QPushButton(_("Install dependencies"))
        self.installButton.toolTip = _("Install PyTorch (through PyTorch Utils) and the backend's Python packages")
        form.addRow(self.installButton)

        devices = qt.QGroupBox(_("Devices"))
        self.layout.addWidget(devices)
        form = qt.QFormLayout(devices)
        self.deviceLabel = qt.QLabel(_("not probed"))
        self.deviceLabel.wordWrap = True
        form.addRow(self.deviceLabel)
        self.probeButton = qt.QPushButton(_("Detect devices"))
        form.addRow(self.probeButton)

        models = qt.QGroupBox(_("Models"))
        self.layout.addWidget(models)
        box = qt.QVBoxLayout(models)
        self.modelList = qt.QListWidget()
        box.addWidget(self.modelList)
        buttons = qt.QHBoxLayout()
        self.importModelButton = qt.QPushButton(_("Import model file..."))
        self.verifyModelsButton = qt.QPushButton(_("Verify checksums"))
        self.openModelsFolderButton = qt.QPushButton(_("Open models folder"))
        for button in (self.importModelButton, self.verifyModelsButton, self.openModelsFolderButton):
            buttons.addWidget(button)
        box.addLayout(buttons)
        self.layout.addStretch(1)

        self.installButton.clicked.connect(self.onInstall)
        self.probeButton.clicked.connect(self.onProbe)
        self.importModelButton.clicked.connect(self.onImportModel)
        self.verifyModelsButton.clicked.connect(self.onVerifyModels)
        self.openModelsFolderButton.clicked.connect(lambda: self.logic.openFolder(paths.userModelsDir()))

    def enter(self):
        self.updateDependencyStatus()
        self.updateModelList()

    def updateDependencyStatus(self):
        try:
            plan = self.logic.dependencyPlan()
        except Exception as error:  # noqa: BLE001
            self.dependencyLabel.text = str(error)
            return
        self.dependencyLabel.text = _("all installed") if plan.empty else _("missing: ") + ", ".join(plan.describe())

    def updateModelList(self):
        self.modelList.clear()
        try:
            for entry in self.logic.modelManager().models():
                self.modelList.addItem(f"{entry.label()} [{entry.task}]")
        except ValueError as error:
            self.modelList.addItem(str(error))

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to install dependencies."), waitCursor=True):
            self.logic.ensureDependencies("DiffusionReg")
        self.updateDependencyStatus()

    def onProbe(self):
        self.deviceLabel.text = _("probing (starts Python with torch)...")
        self.probeButton.enabled = False

        def done(info):
            self.deviceLabel.text = info.summary()
            self.probeButton.enabled = True

        with slicer.util.tryWithErrorDisplay(_("Device probe failed."), waitCursor=False):
            self.logic.probeDevices(done)

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import model weights"), "",
                                              "Model files (*.safetensors *.pt *.pth);;All files (*)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            entry = self.logic.modelManager().importFile(path)
            slicer.util.infoDisplay(_("Imported model '{name}' (sha256 {sha}).").format(name=entry.name, sha=entry.sha256[:16]))
        self.updateModelList()

    def onVerifyModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to verify models."), waitCursor=True):
            results = self.logic.modelManager().verifyAll()
            text = "\n".join(r.text() for r in results) or _("No models are registered.")
            slicer.util.infoDisplay(text, windowTitle=_("Model checksums"))

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
            node = DiffusionRegCoreLogic.importTransform(path)
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
            path = DiffusionRegCoreLogic.exportVolume(volume, folder.file("volume.nrrd"))
            loaded = DiffusionRegCoreLogic.importVolume(path)
            np.testing.assert_allclose(mrml_io.volumeIjkToRas(loaded), mrml_io.volumeIjkToRas(volume), atol=1e-6)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), array)
        finally:
            folder.cleanup()
        self.delayDisplay("Test passed")
