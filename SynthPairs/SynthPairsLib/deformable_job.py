"""The deformable registration job: :class:`DeformableOptions` -> :func:`prepareDeformableJob` -> results.

The backend is ``diffusionreg deformable`` (inverse consistent: SITReg, two-step ICON). What it
writes and where it goes in the scene:

- the **forward** displacement field (fixed grid) maps a fixed point, as displayed, to a point
  of the moving volume's **own** (file) coordinates; it becomes a grid transform stored "from
  parent" (resampling convention) and **only the moving volume** is put directly under it, so the
  moving volume overlays the fixed one and nothing else moves;
- the **inverse** field (moving grid) maps moving (own coordinates) to fixed points: its own grid
  transform, with the registration roles swapped;
- the **Jacobian determinant** of the forward map (fixed grid): a volume with the kit's diverging
  colour table centred at 1, folding (det <= 0) in its own colour;
- optionally the moving volume resampled onto the fixed grid, and the JSON report (time,
  folding %, inverse-consistency error, Dice when label maps are given).

"Register as displayed" without a composite result: the moving volume is exported in its own
coordinates and where it is displayed becomes the backend's ``--initial-transform`` (a fixed
point -> its own coordinates: the inverse of its linear parent transforms ``C``), so the field the
backend writes already includes ``C^-1`` and stays one grid transform. A chosen initial linear
transform (e.g. a SpatialDiffusionReg result, which maps fixed points to the moving volume's own
coordinates) replaces ``C^-1``; "run the affine first" chains SpatialDiffusionReg's affine job
and uses its result that way. The fixed volume is used where it is displayed and never moves.

No Qt and no ``slicer.util`` here: the MRML tier calls these functions as the module does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from slicer import vtkMRMLTransformNode

from DiffusionRegCoreLib import command, mrml_io, results
from DiffusionRegCoreLib.job import JobOptions, PreparedJob, stageWeightsOfStep
from DiffusionRegCoreLib.process import WorkFolder

TASK = "deformable"
#: Share of the time each stage of ``diffusionreg deformable`` usually takes (CPU runs of the
#: shipped lung-vessels model with its defaults: instance optimisation and the fine-grid
#: refinement dominate). "register" opens before both (the network, the inverse, the Jacobian);
#: "write" is the output set writing the files.
STAGE_WEIGHTS = {"read": 0.03, "register": 0.07, "instance optimisation": 0.4, "velocity refinement": 0.48, "write": 0.02}
#: "Run the affine first": its progress stages are shown as "affine: <stage>", and its share of
#: the chained run's time (the shipped affine model on a CPU vs the deformable defaults).
AFFINE_STAGE_PREFIX = "affine: "
AFFINE_SHARE = 0.25
#: Option value meaning "the model's default" for the iteration counts (0 switches a stage off).
MODEL_DEFAULT = -1
#: ``quality`` meaning the model's own registration settings (no ``--quality`` is passed).
QUALITY_DEFAULT = "default"


@dataclass(frozen=True)
class QualityChoice:
    """A speed/accuracy preset a model offers (``--quality NAME``) and the iterations it runs
    (None: not stated in the model's config)."""

    name: str
    instanceOptimization: int | None
    refineIterations: int | None


def qualityChoices(inference: Mapping) -> list[QualityChoice]:
    """The qualities of a model, from the ``inference`` section of its config.json: its own settings
    as ``default`` and each of ``inference.qualities``, fastest first (by instance-optimisation
    steps + refinement iterations; a tie keeps the config's order, ``default`` first)."""
    refine = inference.get("refine") or {}
    choices = [QualityChoice(QUALITY_DEFAULT, inference.get("io_steps"), refine.get("iterations"))]
    for preset in inference.get("qualities") or ():
        choices.append(QualityChoice(preset["name"], preset.get("io_steps"), preset.get("refine_iterations")))
    return sorted(choices, key=lambda c: (c.instanceOptimization or 0) + (c.refineIterations or 0))


def qualityReason(choices: list[QualityChoice], quality: str) -> str:
    """Why ``quality`` cannot run with a model of these ``choices`` ("" when it can)."""
    names = [choice.name for choice in choices]
    if quality in names:
        return ""
    return f"The model has no '{quality}' quality (it has {', '.join(names)})"


@dataclass
class DeformableOptions(JobOptions):
    """One deformable registration: the nodes and the backend options (defaults from the model's config).

    modality - backend modality name (``lung-vessels``, ``mri``...), one an installed deformable model supports.
    model - ``--model``: "" for the modality's default model, else a name or an imported model's path.
    quality - ``--quality``: a preset of the model's config (:func:`qualityChoices`); QUALITY_DEFAULT
      passes nothing (the model's own settings).
    instanceOptimization, refineIterations - ``--instance-optimization`` / ``--refine-iterations``;
      MODEL_DEFAULT (-1) passes nothing (the chosen quality of the model's config.json decides), 0
      switches the stage off; a number overrides the quality's.
    initialTransform - optional linear transform node whose "from parent" maps fixed points to the
      moving volume's own coordinates (a SpatialDiffusionReg result); replaces the moving volume's
      parent transforms as the starting point.
    runAffineFirst, affineModality, affineModel - chain SpatialDiffusionReg's affine job first and
      start from its result (``affineModality`` must have an installed affine model).
    fixedLabels, movingLabels - optional label maps (fixed: as displayed; moving: in the moving
      volume's own coordinates, like the moving volume): Dice before/after in the report.
    placeMoving - put the moving volume under the forward transform when done.
    """

    subcommand: ClassVar[tuple[str, ...]] = ("deformable",)
    stageWeights: ClassVar[Mapping[str, float]] = STAGE_WEIGHTS

    fixedVolume: Any = None
    movingVolume: Any = None
    outputTransform: Any = None
    outputInverseTransform: Any = None
    outputJacobian: Any = None
    outputVolume: Any = None
    initialTransform: Any = None
    runAffineFirst: bool = False
    affineModality: str = "mri"
    affineModel: str = ""
    fixedLabels: Any = None
    movingLabels: Any = None
    modality: str = "any"
    model: str = ""
    quality: str = QUALITY_DEFAULT
    instanceOptimization: int = MODEL_DEFAULT
    refineIterations: int = MODEL_DEFAULT
    device: str = "auto"
    placeMoving: bool = True

    def isValid(self) -> tuple[bool, str]:
        reason = self._reason()
        return (not reason, reason)

    def _reason(self) -> str:
        fixed, moving = self.fixedVolume, self.movingVolume
        reason = mrml_io.registrationInputsReason(fixed, moving, self.outputVolume, self.outputTransform)
        if reason:
            return reason
        outputs = {
            "inverse transform": self.outputInverseTransform,
            "Jacobian volume": self.outputJacobian,
            "output volume": self.outputVolume,
        }
        if self.outputTransform is not None and mrml_io.sameNode(self.outputTransform, self.outputInverseTransform):
            return "The output transform and its inverse must be different transforms"
        if mrml_io.sameNode(self.outputJacobian, self.outputVolume):
            return "The Jacobian volume and the output volume must be different volumes"
        for what, node in outputs.items():
            if any(mrml_io.sameNode(node, n) for n in (fixed, moving, self.fixedLabels, self.movingLabels)):
                return f"The {what} must not be one of the inputs"
        if self.outputInverseTransform is not None and mrml_io.chainIncludes(fixed, self.outputInverseTransform):
            return "The fixed volume must not be under the inverse transform"
        if (self.fixedLabels is None) != (self.movingLabels is None):
            return "Select both label maps (fixed and moving) for Dice, or neither"
        if self.initialTransform is not None:
            if self.runAffineFirst:
                return "Either run the affine first or give an initial transform, not both"
            if not self.initialTransform.IsLinear():
                return "The initial transform must be linear"
            if any(mrml_io.sameNode(self.initialTransform, t) for t in (self.outputTransform, self.outputInverseTransform)):
                return "The initial transform must not be an output transform"
        if self.modality not in command.MODALITIES:
            return f"Unknown modality '{self.modality}'"
        if self.runAffineFirst and self.affineModality not in command.MODALITIES:
            return f"Unknown affine modality '{self.affineModality}'"
        if not self.quality:
            return "Choose a quality (default: the model's own settings)"
        for what, value in (("Instance optimisation", self.instanceOptimization), ("Refinement", self.refineIterations)):
            if int(value) < MODEL_DEFAULT:
                return f"{what} iterations must be 0 or more (or the model's default)"
        try:
            command.checkDevice(self.device)
        except ValueError as error:
            return str(error)
        return ""

    def asArgList(self, files: Mapping[str, Path | None]) -> list[str]:
        """Arguments of ``diffusionreg deformable`` for ``files`` (the names of :func:`prepareDeformableJob`)."""
        ok, reason = self.isValid()
        if not ok:
            raise ValueError(reason)
        flags = {
            "fixed": "--fixed",
            "moving": "--moving",
            "initial": "--initial-transform",
            "transform": "--output-transform",
            "inverse": "--output-inverse-transform",
            "jacobian": "--output-jacobian",
            "volume": "--output-volume",
            "report": "--output-json",
            "fixedLabels": "--fixed-labels",
            "movingLabels": "--moving-labels",
        }
        arguments: list[str] = []
        for name, flag in flags.items():
            if files.get(name):
                arguments += [flag, str(files[name])]
        if self.model:
            arguments += ["--model", str(self.model)]
        arguments += ["--modality", self.modality]
        if self.quality != QUALITY_DEFAULT:
            arguments += ["--quality", self.quality]
        if int(self.instanceOptimization) != MODEL_DEFAULT:
            arguments += ["--instance-optimization", str(int(self.instanceOptimization))]
        if int(self.refineIterations) != MODEL_DEFAULT:
            arguments += ["--refine-iterations", str(int(self.refineIterations))]
        arguments += ["--device", command.checkDevice(self.device)]
        return arguments

    def affineOptions(self):
        """The SpatialDiffusionReg job run first (``runAffineFirst``): its result only, nothing placed."""
        from SpatialDiffusionRegLib.affine_job import AffineOptions

        return AffineOptions(
            self.fixedVolume,
            self.movingVolume,
            modality=self.affineModality,
            model=self.affineModel,
            device=self.device,
            placeMoving=False,
        )


@dataclass
class DeformableResult:
    """What a deformable run put into the scene, and the backend's report."""

    transformNode: Any
    inverseTransformNode: Any = None
    jacobianNode: Any = None
    volumeNode: Any = None
    affineTransformNode: Any = None  # "run the affine first": the affine result it started from
    report: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """One line for the panel: time, folding, inverse consistency, Dice (with label maps)."""
        r = self.report
        parts = [f"{self.seconds:.1f} s"]
        if "folding_percent" in r:
            parts.append(f"folding {r['folding_percent']:.3f} %")
        if "ice_mean_mm" in r:
            parts.append(f"inverse-consistency error {r['ice_mean_mm']:.3f} mm (mean), {r['ice_max_mm']:.3f} mm (max)")
        if r.get("dice_after") is not None:
            before = r.get("dice_before")
            parts.append(f"Dice {before:.3f} -> {r['dice_after']:.3f}" if before is not None else f"Dice {r['dice_after']:.3f}")
        return ", ".join(parts)


def startingTransformRas(options: DeformableOptions) -> tuple[np.ndarray, str]:
    """RAS 4x4 "from parent" the registration starts from (fixed point -> moving own coordinates), and a note.

    The initial transform when given, else the inverse of the moving volume's linear parent
    transforms (up to the output transform); identity with a note when a parent is non-linear.
    """
    if options.initialTransform is not None:
        return mrml_io.arrayFromVtkMatrix(_fromParentMatrix(options.initialTransform)), ""
    moving = options.movingVolume
    try:
        return np.linalg.inv(mrml_io.linearChainToWorld(moving, stopAt=options.outputTransform)), ""
    except mrml_io.GeometryError:
        chain = mrml_io.transformChain(moving, options.outputTransform)
        name = f"'{chain[0].GetName()}'" if chain else "its parent transform"
        return np.eye(4), (
            f"'{moving.GetName()}' is under {name}, which is not linear: registering '{moving.GetName()}' in its own "
            "coordinates (without its parent transforms); it is put directly under the result."
        )


def _fromParentMatrix(transformNode):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformFromParent(matrix)
    return matrix


def writeLinearTransform(matrixRas: np.ndarray, path: Path) -> Path:
    """An ITK transform file (LPS, resampling convention) of a RAS "from parent" matrix, written by Slicer."""
    node = vtkMRMLTransformNode()
    node.SetMatrixTransformFromParent(mrml_io.vtkMatrixFromArray(matrixRas))
    return mrml_io.exportTransform(node, path)


def prepareDeformableJob(
    options: DeformableOptions,
    scene,
    workFolder: WorkFolder,
    python: str,
    env: dict[str, str] | None = None,
    affineResult=None,
) -> PreparedJob:
    """Export the inputs into ``workFolder`` and return the job (command + result import).

    ``affineResult`` (an ``AffineResult`` of the chained affine run) supplies the starting
    transform. The starting transform is taken now, so what is imported matches what was
    exported even if the scene changes while the backend runs.
    """
    ok, reason = options.isValid()
    if not ok:
        raise ValueError(reason)
    if affineResult is not None:
        options = replace(options, initialTransform=affineResult.transformNode, runAffineFirst=False)
    fixed, moving = options.fixedVolume, options.movingVolume
    startRas, note = startingTransformRas(options)
    try:
        files: dict[str, Path | None] = {
            "fixed": mrml_io.exportVolume(fixed, workFolder.file("fixed.nrrd")),
            "moving": mrml_io.exportVolume(moving, workFolder.file("moving.nrrd"), world=False),
            "initial": None
            if np.allclose(startRas, np.eye(4), atol=1e-12)
            else writeLinearTransform(startRas, workFolder.file("initial.h5")),
            "fixedLabels": None,
            "movingLabels": None,
            "transform": workFolder.file("forward.nrrd"),
            "inverse": workFolder.file("inverse.nrrd"),
            "jacobian": workFolder.file("jacobian.nrrd"),
            "volume": workFolder.file("resampled.nrrd") if options.outputVolume is not None else None,
            "report": workFolder.file("report.json"),
        }
        if options.fixedLabels is not None:
            files["fixedLabels"] = mrml_io.exportVolume(options.fixedLabels, workFolder.file("fixed_labels.nrrd"))
            files["movingLabels"] = mrml_io.exportVolume(options.movingLabels, workFolder.file("moving_labels.nrrd"), world=False)
    except Exception:
        workFolder.cleanup()  # nothing runs: leave no half-exported inputs behind
        raise
    commandLine = command.backendCommand(python, options.subcommand, options.asArgList(files))
    name = f"{moving.GetName()} to {fixed.GetName()} (deformable)"

    def importResults(processResult) -> DeformableResult:
        forward, inverse = results.importDisplacementFields(
            scene,
            files["transform"],
            files["inverse"],
            options.outputTransform,
            options.outputInverseTransform,
            moving,
            fixed,
            None if options.outputTransform is not None else name,
        )
        if options.outputInverseTransform is None:
            inverse.SetName(scene.GenerateUniqueName(f"{fixed.GetName()} to {moving.GetName()} (deformable inverse)"))
        jacobianName = None if options.outputJacobian is not None else f"{moving.GetName()} to {fixed.GetName()} Jacobian"
        jacobian = results.importScalarMap(scene, files["jacobian"], options.outputJacobian, jacobianName)
        volume = None
        if files["volume"] is not None:
            volume = mrml_io.importVolume(files["volume"], scene, options.outputVolume)
        for node in (jacobian, volume):
            if node is not None:
                node.SetAndObserveTransformNodeID(None)  # on the fixed grid, in world coordinates
        report = json.loads(Path(files["report"]).read_text(encoding="utf-8"))
        notes = [note] if note else []
        results.placeBeside(scene, [forward, inverse, jacobian, volume], moving)
        if options.placeMoving:
            notes += mrml_io.placeMovingUnderResult(moving, forward)
        return DeformableResult(
            forward,
            inverse,
            jacobian,
            volume,
            affineResult.transformNode if affineResult is not None else None,
            report,
            processResult.elapsedSeconds,
            notes,
        )

    return PreparedJob("SynthPairs", commandLine, workFolder, importResults, options.stageWeights, [note] if note else [], env)


def prepareRegistration(
    options: DeformableOptions,
    scene,
    createWorkFolder: Callable[[], WorkFolder],
    python: str,
    env: dict[str, str] | None = None,
) -> PreparedJob:
    """The whole run: the deformable job, or with ``runAffineFirst`` the affine job chained before it.

    The chained affine job (SpatialDiffusionReg's own ``prepareAffineJob``) puts nothing in place;
    its transform is the deformable job's starting point, prepared once the affine run completed.
    One progress bar covers both (affine stages prefixed with :data:`AFFINE_STAGE_PREFIX`).
    """
    ok, reason = options.isValid()
    if not ok:
        raise ValueError(reason)
    if not options.runAffineFirst:
        return prepareDeformableJob(options, scene, createWorkFolder(), python, env)
    from SpatialDiffusionRegLib.affine_job import prepareAffineJob

    affine = prepareAffineJob(options.affineOptions(), scene, createWorkFolder(), python, env)
    affine.stageWeights = {
        **stageWeightsOfStep(affine.stageWeights, AFFINE_STAGE_PREFIX, AFFINE_SHARE),
        **stageWeightsOfStep(STAGE_WEIGHTS, "", 1.0 - AFFINE_SHARE),
    }
    affine.stagePrefix = AFFINE_STAGE_PREFIX
    affine.then = lambda affineResult: prepareDeformableJob(options, scene, createWorkFolder(), python, env, affineResult)
    return affine
