"""The affine registration job: :class:`AffineOptions` -> :func:`prepareAffineJob` -> results.

"Register as displayed" (see docs/slicer.md):

- The **fixed** volume is registered where it is displayed (through its linear parent
  transforms) and is never moved: no transform above it is touched.
- The **moving** volume is registered where it is displayed too (through its linear parent
  transforms ``C``, up to the output transform), so a pre-alignment is the starting point. When
  those transforms cannot be written as image geometry (non-linear, shearing) it is registered
  in its own coordinates (``C`` = identity) and the log says so.
- The backend returns ``T``: fixed point (as displayed) -> moving point (as displayed). The
  output transform stores ``C^-1 o T`` "from parent" (fixed world -> the moving volume's own
  coordinates, the ITK meaning for the moving file) and **only the moving volume** is put
  directly under it: it is then displayed at ``T^-1 o C``, overlaying the fixed volume, and
  nothing else in the scene moves (parents shared with the fixed volume included).

The backend also writes its JSON report (``--output-json``): when it calls the result doubtful
(similarity after registration far below what a good alignment gives) the result says so
(``doubtful``, ``doubtReason``), the log gets a warning and the panel shows it in warning colours.

No Qt and no ``slicer.util`` here: the MRML tier calls these functions as the module does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from DiffusionRegCoreLib import command, mrml_io, results
from DiffusionRegCoreLib.job import JobOptions, PreparedJob
from DiffusionRegCoreLib.process import WorkFolder

TASK = "affine"
#: ``--initialize`` choices; "default" passes nothing (the model's config decides).
INITIALIZE_CHOICES = ("default",) + tuple(command.INITIALIZATIONS)
#: Share of the time each backend stage of ``diffusionreg affine`` usually takes (CPU runs of
#: the shipped brain model: the network's steps dominate, then the refinement).
STAGE_WEIGHTS = {"read": 0.05, "affine": 0.55, "refine": 0.3, "resample": 0.05, "write": 0.05}
#: Style sheet of the result summary of a doubtful result (bold dark red, unlike the kit's orange
#: "cannot run" reason) and of a result the backend found sound.
DOUBTFUL_STYLE = "color: #c00000; font-weight: bold"
SOUND_STYLE = ""


@dataclass
class AffineOptions(JobOptions):
    """One affine registration: the nodes and the backend options (defaults from the model's config).

    modality - backend modality name (``mri``, ...), one an installed model supports.
    model - ``--model``: "" for the modality's default model, else a name or an imported model's path.
    steps - reverse-diffusion steps, 0 for the model's default.
    initialize - "default" (model config) or one of the backend's initialisations.
    placeMoving - put the moving volume under the result when done.
    """

    subcommand: ClassVar[tuple[str, ...]] = ("affine",)
    stageWeights: ClassVar[Mapping[str, float]] = STAGE_WEIGHTS

    fixedVolume: Any = None
    movingVolume: Any = None
    outputTransform: Any = None
    outputVolume: Any = None
    modality: str = "mri"
    model: str = ""
    steps: int = 0
    bidirectional: bool = False
    initialize: str = "default"
    device: str = "auto"
    placeMoving: bool = True

    def isValid(self) -> tuple[bool, str]:
        reason = self._reason()
        return (not reason, reason)

    def _reason(self) -> str:
        reason = mrml_io.registrationInputsReason(self.fixedVolume, self.movingVolume, self.outputVolume, self.outputTransform)
        if reason:
            return reason
        if self.modality not in command.MODALITIES:
            return f"Unknown modality '{self.modality}'"
        if self.initialize not in INITIALIZE_CHOICES:
            return f"Unknown initialization '{self.initialize}'"
        if int(self.steps) < 0:
            return "Diffusion steps must be 0 (model default) or more"
        try:
            command.checkDevice(self.device)
        except ValueError as error:
            return str(error)
        return ""

    def asArgList(self, files: Mapping[str, Path]) -> list[str]:
        """Arguments of ``diffusionreg affine`` for ``files`` (fixed, moving, transform, volume)."""
        ok, reason = self.isValid()
        if not ok:
            raise ValueError(reason)
        arguments = [
            "--fixed",
            str(files["fixed"]),
            "--moving",
            str(files["moving"]),
            "--output-transform",
            str(files["transform"]),
        ]
        if files.get("report"):
            arguments += ["--output-json", str(files["report"])]
        if files.get("volume"):
            arguments += ["--output-volume", str(files["volume"])]
        if self.model:
            arguments += ["--model", str(self.model)]
        arguments += ["--modality", self.modality]
        if self.steps:
            arguments += ["--steps", str(int(self.steps))]
        if self.bidirectional:
            arguments.append("--bidirectional")
        if self.initialize != "default":
            arguments += ["--initialize", self.initialize]
        arguments += ["--device", command.checkDevice(self.device)]
        return arguments


@dataclass
class AffineResult:
    """What an affine run put into the scene, and the backend's verdict on it.

    doubtful - the backend found the result doubtful (its similarity check); doubtReason says why.
    similarity - normalised mutual information of the images after registration (None: not reported).
    report - the backend's JSON report (matrix, timings, search starts ...).
    """

    transformNode: Any
    volumeNode: Any = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    doubtful: bool = False
    doubtReason: str = ""
    similarity: float | None = None
    report: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the panel's result summary (a doubtful result says so first)."""
        if self.doubtful:
            return f"Doubtful result: {self.doubtReason}. Check the alignment before using it."
        similarity = "" if self.similarity is None else f", similarity {self.similarity:.2f}"
        return f"Registered in {self.seconds:.1f} s{similarity}."

    def summaryStyle(self) -> str:
        """Style sheet of the summary label: :data:`DOUBTFUL_STYLE` for a doubtful result."""
        return DOUBTFUL_STYLE if self.doubtful else SOUND_STYLE


def readReport(path: Path) -> dict:
    """The backend's ``--output-json`` report of a completed run (it always writes it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RuntimeError(f"The backend's report {path} cannot be read: {error}") from None


def prepareAffineJob(
    options: AffineOptions, scene, workFolder: WorkFolder, python: str, env: dict[str, str] | None = None
) -> PreparedJob:
    """Export the inputs into ``workFolder`` and return the job (command + result import).

    The moving volume's frame ``C`` (see the module docstring) is taken now, so what is
    imported matches what was exported even if the scene changes while the backend runs.
    """
    ok, reason = options.isValid()
    if not ok:
        raise ValueError(reason)
    fixed, moving, output = options.fixedVolume, options.movingVolume, options.outputTransform
    movingInWorld, movingNote = mrml_io.movingVolumeFrame(moving, stopAt=output)
    movingToWorld = mrml_io.linearChainToWorld(moving, stopAt=output) if movingInWorld else np.eye(4)
    try:
        files = {
            "fixed": mrml_io.exportVolume(fixed, workFolder.file("fixed.nrrd")),
            "moving": mrml_io.exportVolume(moving, workFolder.file("moving.nrrd"), world=movingInWorld, stopAt=output),
            "transform": workFolder.file("transform.h5"),
            "volume": workFolder.file("resampled.nrrd") if options.outputVolume is not None else None,
            "report": workFolder.file("report.json"),
        }
    except Exception:
        workFolder.cleanup()  # nothing runs: leave no half-exported inputs behind
        raise
    commandLine = command.backendCommand(python, options.subcommand, options.asArgList(files))
    transformName = None if output is not None else f"{moving.GetName()} to {fixed.GetName()}"

    def importResults(processResult) -> AffineResult:
        report = readReport(files["report"])
        transformNode = mrml_io.importTransform(files["transform"], scene, output, transformName, moving, fixed)
        mrml_io.composeWithMovingFrame(transformNode, movingToWorld)
        volumeNode = None
        if files["volume"] is not None:
            volumeNode = mrml_io.importVolume(files["volume"], scene, options.outputVolume)
            volumeNode.SetAndObserveTransformNodeID(None)  # on the fixed grid, in world coordinates
        notes = [movingNote] if movingNote else []
        doubtful, reason = bool(report.get("doubtful")), str(report.get("doubt_reason") or "")
        if doubtful:
            notes.append(f"Warning: the result is doubtful: {reason}")
        results.placeBeside(scene, [transformNode, volumeNode], moving)
        if options.placeMoving:
            notes += mrml_io.placeMovingUnderResult(moving, transformNode)
        return AffineResult(
            transformNode,
            volumeNode,
            processResult.elapsedSeconds,
            notes,
            doubtful,
            reason,
            report.get("similarity_nmi"),
            report,
        )

    return PreparedJob(
        "SpatialDiffusionReg",
        commandLine,
        workFolder,
        importResults,
        options.stageWeights,
        [movingNote] if movingNote else [],
        env,
    )
