"""The "Generate pairs" job: :class:`GenerateOptions` -> :class:`GenerationRun` -> :class:`GeneratedPairs`.

The backend is ``diffusionreg synth``: it draws ``--count`` (fixed, moving) lung-vessel maps
from a trained pair generator into an existing folder, ``pair_NNN_fixed.nii.gz`` /
``pair_NNN_moving.nii.gz`` (vessel probability in [0, 1], on the generator's frame: exact LPS
geometry) and ``manifest.json`` (per pair: novelty against the training pairs and realism
figures), all or nothing. Pair ``i`` of seed ``s`` is the same pair whatever ``--count`` and
``--first-index`` are, so a long run can be made of several backend runs ("chunks", each
``--first-index I --count C``) with the same pairs as one run.

That is what "keep the finished pairs on cancel" uses: with it, the pairs are made a few at a
time (:data:`KEEP_PAIRS_PER_RUN` per backend run), each run's files wait in a staging folder,
and a cancel keeps exactly the runs that had finished. Without it, one backend run makes all
pairs and a cancel leaves nothing (the backend writes all its outputs or none). Only when
everything that is kept is known are the files moved into the output folder (with one
``manifest.json`` for them) and loaded into the scene:

- a subject-hierarchy folder holding one sub-folder per pair with its fixed and moving volume
  (read with Slicer's storage node: LPS on disk -> RAS, the positions the backend wrote);
- the volumes in two colours (fixed magenta, moving green: :func:`showPair` blends them half and
  half in the slice views, so overlapping vessels are grey), window [0, 1];
- a table node with each pair's novelty and realism figures from the manifest, the training
  pairs' reference figures as its attributes.

No Qt and no ``slicer.util`` here: the MRML tier calls these functions as the module does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import vtk

from DiffusionRegCoreLib import command, mrml_io, results
from DiffusionRegCoreLib.job import JobOptions, JobOutcome, PreparedJob, stageWeightsOfStep
from DiffusionRegCoreLib.models import ModelEntry
from DiffusionRegCoreLib.process import WorkFolder

TASK = "synth"
#: The disabled reason when no generator of the ``synth`` task is installed.
NO_GENERATOR_REASON = "No pair generator is installed"
#: Most pairs one run makes (the backend's ``MAX_PAIRS``: file names have three digits).
MAX_PAIRS = 1000
#: Sampling option value meaning "the model's own" (config.json ``sampling``): nothing is passed.
#: 0 is never a valid value (steps >= 1, temperature > 0).
SAMPLING_DEFAULT = 0
#: Pairs per backend run when finished pairs are kept on cancel: a cancel loses at most this many.
#: A pair takes tens of seconds with a real generator on a CPU, starting a run a few seconds.
KEEP_PAIRS_PER_RUN = 1
#: Share of the time each stage of ``diffusionreg synth`` takes (CPU runs of the tiny and the
#: compact generator: sampling dominates; "read" loads torch and the model, "write" renames).
STAGE_WEIGHTS = {"read": 0.1, "generate": 0.85, "write": 0.05}
MANIFEST = "manifest.json"
#: Colours of the two scans (blended half and half: fixed only purple, moving only green, both grey).
FIXED_COLOR_NAME = "DiffusionReg synthetic fixed (magenta)"
MOVING_COLOR_NAME = "DiffusionReg synthetic moving (green)"
FIXED_RGB = (1.0, 0.0, 1.0)
MOVING_RGB = (0.0, 1.0, 0.0)
#: The window of the vessel-probability volumes.
PROBABILITY_RANGE = (0.0, 1.0)
#: Foreground opacity of the moving scan over the fixed one (the kit's overlay opacity). Slicer's
#: additive compositing would show overlap white, but it is a view setting that would stay for
#: everything shown later, so the views keep their alpha blending.
OVERLAY_OPACITY = 0.5
#: Table columns from the manifest: (section, key, unit, description), in this order; a key a
#: manifest lacks (the displacement figures without a realism model) is left out.
FIGURE_COLUMNS = (
    ("novelty", "nearest_dice_fixed", "", "Highest Dice of the fixed scan to any training scan (memorised near 1)"),
    ("novelty", "nearest_dice_moving", "", "Highest Dice of the moving scan to any training scan"),
    ("novelty", "nearest_token_agreement", "", "Highest share of tokens equal to a training pair's"),
    ("realism", "vessel_fraction", "", "Mean vessel probability of both scans (training pairs: the table's attribute)"),
    ("realism", "overlap_dice", "", "Soft Dice of fixed and moving (training pairs: the table's attribute)"),
    ("realism", "displacement_mean_mm", "mm", "Mean displacement a deformable model finds, over vessel voxels"),
    ("realism", "displacement_p95_mm", "mm", "95th percentile of that displacement"),
)
ATTRIBUTE_PREFIX = "SynthPairs."


def pairFileNames(index: int) -> tuple[str, str]:
    """The backend's file names of pair ``index`` (fixed, moving)."""
    return f"pair_{index:03d}_fixed.nii.gz", f"pair_{index:03d}_moving.nii.gz"


# --- the model -------------------------------------------------------------------------------
def samplingDefaults(configPath: str | os.PathLike | None) -> dict:
    """The ``sampling`` section of a generator's config.json (``{"steps": 256, "temperature": 0.9, ...}``):
    what the backend uses when the panel passes nothing. Empty when there is no config."""
    if not configPath or not Path(configPath).is_file():
        return {}
    try:
        section = json.loads(Path(configPath).read_text(encoding="utf-8")).get("sampling", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


@dataclass(frozen=True)
class GeneratorChoice:
    """The generator a run uses: ``argument`` for ``--model``, its ``config`` path and a ``label``."""

    argument: str
    config: str
    label: str


def generatorToRun(entries: Sequence[ModelEntry], model: str = "") -> tuple[GeneratorChoice | None, str]:
    """``(choice, "")`` for the generator ``model`` names, or ``(None, reason)``.

    ``model``: "" for the default (the first installed registry generator, then an imported one),
    a registered or imported model's name or ``--model`` argument, or a model folder (scripting:
    a training run's ``best`` folder with ``config.json`` beside its weights).
    """
    generators = [e for e in entries if e.task == TASK]
    if model and Path(model).is_dir():
        return GeneratorChoice(str(model), str(Path(model) / "config.json"), Path(model).name), ""
    if model:
        entry = next((e for e in generators if e.name == model or e.modelArgument() == model), None)
        if entry is None:
            return None, f"The pair generator '{model}' is not installed"
    else:
        available = sorted((e for e in generators if e.available), key=lambda e: e.source != "registry")
        if not available:
            downloadable = [e for e in generators if e.state == "downloadable"]
            if downloadable:
                return None, f"{NO_GENERATOR_REASON} ('{downloadable[0].name}' can be downloaded under Model)"
            return None, NO_GENERATOR_REASON
        entry = available[0]
    if not entry.available:
        if entry.isRemote:
            return None, f"The pair generator '{entry.name}' is not downloaded yet (Download it under Model)"
        return None, f"The model file of '{entry.name}' is missing"
    return GeneratorChoice(entry.modelArgument(), entry.config, entry.name), ""


# --- options ---------------------------------------------------------------------------------
@dataclass
class GenerateOptions(JobOptions):
    """One generation: how many pairs, their seed, the sampling, where they go.

    count, seed, firstIndex - pairs ``firstIndex .. firstIndex + count - 1`` of ``seed`` (pair i of
      seed s is always the same pair).
    model - ``--model``: a generator's name or imported path, or a model folder ("" is resolved
      to the default generator by :func:`generatorToRun` before a run).
    temperature, steps - ``--temperature`` / ``--steps``; SAMPLING_DEFAULT (0) passes nothing: the
      model's config.json ``sampling`` decides.
    outputFolder - an existing folder that receives the pairs and ``manifest.json``; "" keeps them
      in the scene only (the files are temporary).
    keepOnCancel - a cancel keeps (loads, and writes to ``outputFolder``) the pairs finished so
      far; they are then made :data:`KEEP_PAIRS_PER_RUN` per backend run.
    pairsPerRun - pairs per backend run; 0: all in one run, or KEEP_PAIRS_PER_RUN with keepOnCancel.
    """

    subcommand: ClassVar[tuple[str, ...]] = ("synth",)
    stageWeights: ClassVar[Mapping[str, float]] = STAGE_WEIGHTS

    count: int = 4
    seed: int = 0
    model: str = ""
    temperature: float = SAMPLING_DEFAULT
    steps: int = SAMPLING_DEFAULT
    outputFolder: str = ""
    keepOnCancel: bool = False
    pairsPerRun: int = 0
    firstIndex: int = 0
    device: str = "auto"

    def isValid(self) -> tuple[bool, str]:
        reason = self._reason()
        return (not reason, reason)

    def _reason(self) -> str:
        if not 1 <= int(self.count) <= MAX_PAIRS:
            return f"The number of pairs must be within 1..{MAX_PAIRS}"
        if not 0 <= int(self.firstIndex) <= MAX_PAIRS - int(self.count):
            return f"The first pair index must be within 0..{MAX_PAIRS - int(self.count)} for {int(self.count)} pairs"
        if int(self.seed) < 0:
            return "The seed must be 0 or more"
        if float(self.temperature) < 0:
            return "The temperature must be more than 0 (or the model's default)"
        if int(self.steps) < 0:
            return "The number of steps must be 1 or more (or the model's default)"
        if int(self.pairsPerRun) < 0:
            return "Pairs per run must be 1 or more (or 0: automatic)"
        if self.outputFolder:
            reason = outputFolderReason(Path(self.outputFolder), self.indices())
            if reason:
                return reason
        try:
            command.checkDevice(self.device)
        except ValueError as error:
            return str(error)
        return ""

    def indices(self) -> range:
        return range(int(self.firstIndex), int(self.firstIndex) + int(self.count))

    def chunks(self) -> list[tuple[int, int]]:
        """``(first index, count)`` of each backend run, in order."""
        size = int(self.pairsPerRun) or (KEEP_PAIRS_PER_RUN if self.keepOnCancel else int(self.count))
        return [
            (first, min(size, self.indices().stop - first)) for first in range(self.indices().start, self.indices().stop, size)
        ]

    def asArgList(self, files: Mapping[str, Path], first: int | None = None, count: int | None = None) -> list[str]:
        """Arguments of ``diffusionreg synth`` writing into ``files["output"]``: pairs ``first ..
        first + count - 1`` (default: all of them in one run)."""
        ok, reason = self.isValid()
        if not ok:
            raise ValueError(reason)
        first = int(self.firstIndex) if first is None else int(first)
        count = int(self.count) if count is None else int(count)
        arguments = ["--output", str(files["output"]), "--count", str(count), "--seed", str(int(self.seed))]
        if first:
            arguments += ["--first-index", str(first)]
        if self.model:
            arguments += ["--model", str(self.model)]
        if float(self.temperature) != SAMPLING_DEFAULT:
            arguments += ["--temperature", repr(float(self.temperature))]
        if int(self.steps) != SAMPLING_DEFAULT:
            arguments += ["--steps", str(int(self.steps))]
        arguments += ["--device", command.checkDevice(self.device)]
        return arguments


def outputFolderReason(folder: Path, indices: Sequence[int]) -> str:
    """Why ``folder`` cannot receive these pairs ("" when it can): it must exist, and no file of
    the run may be there already (nothing is overwritten)."""
    if not folder.is_dir():
        return f"The output folder {folder} does not exist"
    names = [MANIFEST] + [name for i in indices for name in pairFileNames(i)]
    taken = next((name for name in names if (folder / name).exists()), None)
    if taken:
        return f"The output folder already holds {taken}: choose an empty folder (nothing is overwritten)"
    return ""


# --- manifests -------------------------------------------------------------------------------
def mergeManifests(parts: Sequence[Mapping]) -> dict:
    """One manifest for the pairs of several backend runs of one generation (same model, seed and
    sampling), with the backend's own definitions (``diffusionreg/synth/manifest.py``)."""
    from DiffusionRegCoreLib.paths import backendModule

    return backendModule("synth.manifest").merge(parts)


# --- the result ------------------------------------------------------------------------------
@dataclass
class GeneratedPair:
    """One pair in the scene."""

    index: int
    fixedNode: Any
    movingNode: Any
    folderItem: int = 0  # its subject-hierarchy folder


@dataclass
class GeneratedPairs:
    """What a generation put into the scene, and its manifest.

    ``complete`` is False when a cancel kept only the finished pairs (``requested`` were asked for).
    ``outputFolder``: where the files and ``manifest.json`` are (None: scene only).
    """

    pairs: list
    tableNode: Any
    folderItem: int
    manifest: dict
    requested: int
    outputFolder: Path | None = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.pairs) == self.requested

    def summary(self) -> str:
        """One line: ``"3 pairs (seed 5, best), 0.9 s per pair; nearest training Dice max 1.000, 3 memorised"``."""
        m, s = self.manifest, self.manifest.get("summary", {})
        kept = "" if self.complete else f" of {self.requested} (cancelled: the finished ones kept)"
        text = f"{len(self.pairs)} pairs{kept} (seed {m.get('seed')}, {m.get('model')}), {s.get('seconds_per_pair', 0.0):.1f} s per pair"
        if s.get("nearest_dice_max") is not None:
            text += f"; nearest training Dice max {s['nearest_dice_max']:.3f}, {s.get('memorised', 0)} memorised"
        return text


def probabilityColorNode(scene, name: str, rgb: tuple[float, float, float]):
    """The scene's colour node ``name``: black at probability 0 to ``rgb`` at 1 (created once)."""
    low, high = PROBABILITY_RANGE
    return results.proceduralColorNode(scene, name, [(low, (0.0, 0.0, 0.0)), (high, rgb)])


def _showAsProbability(scene, node, colorName: str, rgb) -> None:
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(probabilityColorNode(scene, colorName, rgb).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*PROBABILITY_RANGE)


def figuresTable(scene, manifest: Mapping, name: str, pairs: Sequence[GeneratedPair]):
    """A table node: one row per pair (index, node names, the manifest's novelty and realism
    figures, memorised, seconds); the run's settings and the training pairs' reference figures
    as attributes ``SynthPairs.*``."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    records = list(manifest["pairs"])
    nodesOf = {p.index: p for p in pairs}

    def column(array, values, unit: str = "", description: str = "") -> None:
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
        if unit:
            table.SetColumnUnitLabel(array.GetName(), unit)
        if description:
            table.SetColumnDescription(array.GetName(), description)

    def named(array, title: str):
        array.SetName(title)
        return array

    column(
        named(vtk.vtkIntArray(), "pair"),
        [int(r["index"]) for r in records],
        "",
        "Pair index (pair i of a seed is always the same)",
    )
    for title, attribute in (("fixed", "fixedNode"), ("moving", "movingNode")):
        column(named(vtk.vtkStringArray(), title), [getattr(nodesOf[int(r["index"])], attribute).GetName() for r in records])
    for section, key, unit, description in FIGURE_COLUMNS:
        if all(key in r.get(section, {}) for r in records):
            column(named(vtk.vtkDoubleArray(), key), [float(r[section][key]) for r in records], unit, description)
    memorisedAbove = manifest.get("memorised_dice")
    column(
        named(vtk.vtkStringArray(), "memorised"),
        ["yes" if r["novelty"]["memorised"] else "no" for r in records],
        "",
        f"A scan's nearest training Dice is above {memorisedAbove}" if memorisedAbove is not None else "",
    )
    column(named(vtk.vtkDoubleArray(), "seconds"), [float(r["seconds"]) for r in records], "s", "Time to draw the pair")
    settings = {key: manifest.get(key) for key in ("model", "seed", "steps", "temperature", "memorised_dice")}
    reference = {f"training_{k}": v for k, v in (manifest.get("training_reference") or {}).items()}
    for key, value in {**settings, **reference}.items():
        if value is not None:
            table.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
    table.Modified()
    return table


def importPairs(
    scene, folder: Path, manifest: Mapping, name: str, requested: int, outputFolder: Path | None = None
) -> GeneratedPairs:
    """Load the pairs of ``manifest`` from ``folder`` into a subject-hierarchy folder ``name`` (a
    sub-folder per pair), in two colours, and their figures into a table."""
    sh = results.subjectHierarchy(scene)
    top = results.createFolder(scene, name)
    pairs = []
    for record in manifest["pairs"]:
        index = int(record["index"])
        fixed = mrml_io.importVolume(folder / record["fixed"], scene, None, f"{name} {index:03d} fixed")
        moving = mrml_io.importVolume(folder / record["moving"], scene, None, f"{name} {index:03d} moving")
        _showAsProbability(scene, fixed, FIXED_COLOR_NAME, FIXED_RGB)
        _showAsProbability(scene, moving, MOVING_COLOR_NAME, MOVING_RGB)
        item = sh.CreateFolderItem(top, f"pair {index:03d}")
        results.placeInFolder(scene, [fixed, moving], item)
        pairs.append(GeneratedPair(index, fixed, moving, item))
    table = figuresTable(scene, manifest, f"{name} figures", pairs)
    results.placeInFolder(scene, [table], top)
    if outputFolder is not None:
        table.SetAttribute(ATTRIBUTE_PREFIX + "outputFolder", str(outputFolder))
    seconds = sum(float(r["seconds"]) for r in manifest["pairs"])
    return GeneratedPairs(pairs, table, top, dict(manifest), requested, outputFolder, seconds)


def showPair(scene, generated: GeneratedPairs, position: int) -> GeneratedPair:
    """Show pair number ``position`` (0-based, in index order) in every slice view: fixed as the
    background (magenta), moving as the foreground (green) at :data:`OVERLAY_OPACITY`. Returns the
    pair shown."""
    pair = generated.pairs[position]
    for composite in mrml_io.nodesOfClass(scene, "vtkMRMLSliceCompositeNode"):
        composite.SetBackgroundVolumeID(pair.fixedNode.GetID())
        composite.SetForegroundVolumeID(pair.movingNode.GetID())
        composite.SetForegroundOpacity(OVERLAY_OPACITY)
    return pair


# --- the run ---------------------------------------------------------------------------------
def _move(source: Path, target: Path) -> None:
    """Move a file to ``target`` through a temporary name beside it (never a half-written target)."""
    temporary = target.with_name(f".{target.name}.part")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    source.unlink()


class GenerationRun:
    """One generation in backend runs of :meth:`GenerateOptions.chunks`, chained (``PreparedJob.then``).

    Each backend run writes into its own folder under a staging folder; the last one's import,
    or :meth:`conclude` after a cancel with ``keepOnCancel``, moves what is kept to the output
    folder and loads it (:func:`importPairs`). :meth:`conclude` decides from the chain's outcome.
    """

    def __init__(
        self,
        options: GenerateOptions,
        scene,
        createWorkFolder: Callable[[], WorkFolder],
        python: str,
        env: dict[str, str] | None = None,
        name: str = "Synthetic pairs",
        keepTemporaryFiles: bool = False,
    ) -> None:
        ok, reason = options.isValid()
        if not ok:
            raise ValueError(reason)
        self.options = options
        self.scene = scene
        self.createWorkFolder = createWorkFolder
        self.python = python
        self.env = env
        self.name = name
        self.keepTemporaryFiles = keepTemporaryFiles
        self.chunks = options.chunks()
        self.staging = createWorkFolder()
        self.finished: list[dict] = []  # manifests of the finished backend runs
        self.result: GeneratedPairs | None = None

    def _prefix(self, number: int) -> str:
        if len(self.chunks) == 1:
            return ""
        first, count = self.chunks[number]
        return f"pair {first}: " if count == 1 else f"pairs {first}-{first + count - 1}: "

    def firstJob(self) -> PreparedJob:
        """The first backend run; it carries the progress weights of all of them (one bar)."""
        job = self.job(0)
        if len(self.chunks) > 1:
            weights: dict[str, float] = {}
            for number, (_, count) in enumerate(self.chunks):
                weights.update(stageWeightsOfStep(STAGE_WEIGHTS, self._prefix(number), count / self.options.count))
            job.stageWeights = weights
        return job

    def job(self, number: int) -> PreparedJob:
        """Backend run ``number``: its pairs into ``staging/run_NNN``; the next run is chained after it."""
        first, count = self.chunks[number]
        output = self.staging.path / f"run_{number:03d}"
        output.mkdir()
        commandLine = command.backendCommand(
            self.python, self.options.subcommand, self.options.asArgList({"output": output}, first, count)
        )

        def importResults(processResult):
            self.finished.append(json.loads((output / MANIFEST).read_text(encoding="utf-8")))
            if number + 1 < len(self.chunks):
                return self
            return self.load()

        return PreparedJob(
            "SynthPairs generate",
            commandLine,
            self.createWorkFolder(),
            importResults,
            STAGE_WEIGHTS,
            env=self.env,
            stagePrefix=self._prefix(number),
            then=(lambda outputs: self.job(number + 1)) if number + 1 < len(self.chunks) else None,
        )

    def load(self) -> GeneratedPairs:
        """Move the finished pairs to the output folder (when given) and load them into the scene."""
        manifest = mergeManifests(self.finished)
        runs = [self.staging.path / f"run_{n:03d}" for n in range(len(self.finished))]
        folder = Path(self.options.outputFolder) if self.options.outputFolder else None
        written: list[Path] = []
        try:
            if folder is not None:
                reason = outputFolderReason(folder, [p["index"] for p in manifest["pairs"]])
                if reason:  # something appeared there while the backend ran
                    raise OSError(reason)
                try:
                    for record in manifest["pairs"]:
                        run = next(r for r in runs if (r / record["fixed"]).exists())
                        for key in ("fixed", "moving"):
                            _move(run / record[key], folder / record[key])
                            written.append(folder / record[key])
                    temporary = folder / f".{MANIFEST}.part"
                    temporary.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
                    os.replace(temporary, folder / MANIFEST)
                except Exception:
                    for path in written:  # all or none: the folder as it was
                        path.unlink(missing_ok=True)
                    raise
                source = folder
            else:
                source = self.staging.path / "pairs"
                source.mkdir(exist_ok=True)
                for run in runs:
                    for path in run.glob("pair_*.nii.gz"):
                        os.replace(path, source / path.name)
            self.result = importPairs(self.scene, source, manifest, self.name, self.options.count, folder)
        finally:
            self.staging.cleanup(self.keepTemporaryFiles)
        return self.result

    def discard(self) -> None:
        """Nothing is kept: the staging folder goes (the output folder was never touched)."""
        self.staging.cleanup(self.keepTemporaryFiles)

    def conclude(self, outcome: JobOutcome) -> GeneratedPairs | None:
        """The result of the chain's ``outcome``: the loaded pairs when it completed; after a
        cancel with ``keepOnCancel``, the finished pairs loaded (None when none had finished);
        otherwise None, and nothing is kept."""
        if outcome.state == "completed":
            return outcome.outputs
        if outcome.state == "cancelled" and self.options.keepOnCancel and self.finished:
            result = self.load()
            result.notes.append(f"Cancelled: kept the {len(result.pairs)} pairs finished of {self.options.count}")
            return result
        self.discard()
        return None


def prepareGeneration(
    options: GenerateOptions,
    scene,
    createWorkFolder: Callable[[], WorkFolder],
    python: str,
    env: dict[str, str] | None = None,
    name: str | None = None,
    keepTemporaryFiles: bool = False,
) -> GenerationRun:
    """The run for ``options`` (``options.model`` already resolved by :func:`generatorToRun`)."""
    label = name or f"Synthetic pairs ({Path(options.model).name or 'generator'}, seed {int(options.seed)})"
    return GenerationRun(replace(options), scene, createWorkFolder, python, env, label, keepTemporaryFiles)
