"""The midline-shift job: :class:`MidlineOptions` -> :func:`prepareMidlineJob` -> :class:`MidlineShiftResult`.

The CT is exported **as displayed** (through its linear parent transforms), so everything the
backend writes is in the scene's world: nothing is placed under a transform afterwards.

What a run puts into the scene (all read with Slicer's own storage nodes, LPS on disk -> RAS):

- **Landmarks**: the backend's ``.mrk.json`` (four points per measured slice, labelled
  ``<name> s<index>``) becomes, per slice, a *falx* line (anterior -> posterior falx point: the
  ideal midline) and a *shift* line (shifted structure -> its normal position; its length is the
  automatic shift). The lines are editable.
- **Table** (``vtkMRMLTableNode``, exportable as CSV): the backend's CSV, one row per measured
  slice, with ``automatic_mls_mm``, ``side``, ``manual_mls_mm`` (empty until a point is moved)
  and ``flag``. Moving a point of a slice's falx line or its shifted-structure point sets that
  slice's manual MLS: the perpendicular distance of the shifted structure from the falx line
  (mm, :func:`perpendicularDistanceMm`), kept beside the automatic value.
- **Displacement field** as a grid transform whose *to parent* maps a CT point to its
  normal-anatomy position (``phi``: shifted -> normal): the CT put under it shows the "normal"
  anatomy. The file's ITK meaning is the node's *from parent* before it is inverted
  (:func:`importNormalizingTransform`).
- **Magnitude** ``|u|`` (mm) on the CT grid with a colour table (0 .. :data:`MAGNITUDE_RANGE_MM`).

The case result (MLS mm, side, 5 mm flag, slice of the maximum) is in :class:`MidlineShiftResult`
and as attributes ``MidlineShift.*`` of the table node. No Qt and no ``slicer.util`` here: the
MRML tier calls these functions as the module does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import vtk
from slicer import (
    vtkMRMLMarkupsNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSliceNode,
    vtkMRMLTableStorageNode,
)

from DiffusionRegCoreLib import command, model_choice, mrml_io, results
from DiffusionRegCoreLib.job import JobOptions, PreparedJob
from DiffusionRegCoreLib.process import WorkFolder

TASK = "midline"
#: The only modality the midline models measure (``diffusionreg/midline/model_loading.py``).
MODALITY = "ct"
#: Share of the time each stage of ``diffusionreg midline`` takes (CPU runs of the compact
#: preset: the pose search and the networks dominate "measure").
STAGE_WEIGHTS = {"read": 0.1, "measure": 0.8, "write": 0.1}

#: Point labels of the backend's landmarks file (``diffusionreg/midline/measure_command.py``):
#: ``"<name> s<slice index>"``; the falx pair is the ideal midline, the shift pair the shifted
#: structure and its normal position.
FALX_POINTS = ("anterior_falx", "posterior_falx")
SHIFT_POINTS = ("shifted", "normal")
LABEL_PATTERN = re.compile(r"^(?P<name>[a-z_]+) s(?P<slice>\d+)$")

#: Table columns the module adds or renames (the backend's ``mls_mm`` is the automatic value).
AUTOMATIC_COLUMN = "automatic_mls_mm"
MANUAL_COLUMN = "manual_mls_mm"
FLAG_COLUMN = "flag"
FLAG_TEXT = "FLAG"
#: Flag threshold (mm) of a table saved without its ``MidlineShift.flagMm`` attribute (the
#: backend's default, ``MidlineInference.flag_mm``; a run always records its model's value).
DEFAULT_FLAG_MM = 5.0
#: Backend CSV columns kept in the table (the landmark coordinates are in the markups instead).
KEPT_COLUMNS = ("slice", "z_template_mm", "mls_mm", "side")
ATTRIBUTE_PREFIX = "MidlineShift."
#: Reference from each landmark line to its table (kept in a saved scene: see :func:`reconnectCorrections`).
TABLE_REFERENCE_ROLE = "MidlineShiftTable"

#: Magnitude map display: ``|u|`` in mm mapped over this range (0 dark, 10 mm and more bright):
#: twice the usual 5 mm flag, so a flagged shift sits in the upper half of the colour bar.
MAGNITUDE_RANGE_MM = (0.0, 10.0)
MAGNITUDE_COLOR_NAME = "DiffusionReg displacement (mm)"
#: RGB control points of the magnitude map (dark blue, teal, yellow): readable over a CT.
MAGNITUDE_RGB = ((0.05, 0.03, 0.35), (0.13, 0.57, 0.55), (0.99, 0.91, 0.14))
#: Line colours: the ideal midline (falx) and the shift, distinct from each other and from the map.
FALX_RGB = (0.2, 0.8, 1.0)
SHIFT_RGB = (1.0, 0.35, 0.1)


@dataclass
class MidlineOptions(JobOptions):
    """One measurement: the CT node and the backend options (defaults from the model's config).

    modality - ``ct`` (or ``any`` for a model imported without one): the kit's model selectors.
    model - ``--model``: "" for the default registered midline model, else a registered model's
      name or an imported model's path (imported models run only when chosen, as in the backend).
    """

    subcommand: ClassVar[tuple[str, ...]] = ("midline",)
    stageWeights: ClassVar[Mapping[str, float]] = STAGE_WEIGHTS

    inputVolume: Any = None
    modality: str = MODALITY
    model: str = ""
    device: str = "auto"

    def isValid(self) -> tuple[bool, str]:
        reason = self._reason()
        return (not reason, reason)

    def _reason(self) -> str:
        volume = self.inputVolume
        if volume is None:
            return "Select the CT volume"
        image = volume.GetImageData()
        if image is None:
            return "The CT volume has no image data"
        dims = image.GetDimensions()
        if min(dims) < 2:
            return f"The CT volume is not 3D (size {'x'.join(map(str, dims))})"
        if image.GetNumberOfScalarComponents() != 1:
            return "The CT volume must have one component per voxel"
        try:
            mrml_io.exportableIjkToRas(volume)
        except mrml_io.GeometryError as error:
            return f"The CT volume cannot be used as it is: {error}"
        if self.modality not in (MODALITY, model_choice.ANY):  # "any": a model imported without a modality
            return f"Midline shift is measured on CT, not '{self.modality}'"
        try:
            command.checkDevice(self.device)
        except ValueError as error:
            return str(error)
        return ""

    def asArgList(self, files: Mapping[str, Path]) -> list[str]:
        """Arguments of ``diffusionreg midline`` for ``files`` (the names of :func:`prepareMidlineJob`)."""
        ok, reason = self.isValid()
        if not ok:
            raise ValueError(reason)
        flags = {
            "input": "--input",
            "report": "--output-json",
            "landmarks": "--output-landmarks",
            "field": "--output-field",
            "table": "--output-table",
        }
        arguments: list[str] = []
        for name, flag in flags.items():
            arguments += [flag, str(files[name])]
        if self.model:
            arguments += ["--model", str(self.model)]
        arguments += ["--device", command.checkDevice(self.device)]
        return arguments


@dataclass
class SliceLines:
    """The editable landmarks of one measured slice."""

    index: int
    falxNode: Any  # line: anterior falx -> posterior falx (the ideal midline)
    shiftNode: Any  # line: shifted structure -> its normal position (length = automatic shift)


@dataclass
class MidlineShiftResult:
    """What a midline measurement put into the scene, and the backend's report."""

    caseMlsMm: float
    side: str  # "left", "right" (patient; the direction the midline moved) or "none"
    flag: bool  # caseMlsMm >= flagMm
    flagMm: float
    sliceOfMaximum: int | None
    tableNode: Any
    markupsNodes: list  # falx and shift lines, slice by slice
    transformNode: Any = None
    magnitudeNode: Any = None
    slices: list = field(default_factory=list)  # SliceLines
    corrections: Any = None  # ManualCorrections keeping the table up to date
    report: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``"MLS 7.9 mm (patient left), >= 5 mm: FLAG, slice 4"``."""
        side = f"patient {self.side}" if self.side in ("left", "right") else "no side"
        flag = f">= {self.flagMm:g} mm: FLAG" if self.flag else f"below {self.flagMm:g} mm"
        where = f", slice {self.sliceOfMaximum}" if self.sliceOfMaximum is not None else ", no slice measured"
        return f"MLS {self.caseMlsMm:.1f} mm ({side}), {flag}{where}"

    def maximumPointRas(self) -> list[float] | None:
        """The shifted structure of the slice of the maximum (RAS), where the views jump to."""
        for lines in self.slices:
            if lines.index == self.sliceOfMaximum:
                point = [0.0, 0.0, 0.0]
                lines.shiftNode.GetNthControlPointPositionWorld(0, point)
                return point
        return None


# --- geometry of the manual measurement ------------------------------------------------------
def perpendicularDistanceMm(point, lineStart, lineEnd) -> float:
    """Distance (mm) of ``point`` from the infinite line through ``lineStart`` and ``lineEnd``
    (3D, any one frame: RAS or LPS give the same distance)."""
    p, a, b = (np.asarray(v, dtype=np.float64) for v in (point, lineStart, lineEnd))
    direction = b - a
    length = float(np.linalg.norm(direction))
    if length == 0.0:
        raise ValueError("the falx line has no length (both points coincide)")
    return float(np.linalg.norm(np.cross(p - a, direction)) / length)


def _worldPoint(node, index: int) -> list[float]:
    point = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, point)
    return point


def manualShiftMm(lines: SliceLines) -> float:
    """The manual MLS of a slice: its shifted structure's distance from its falx line (mm)."""
    falx = lines.falxNode
    return perpendicularDistanceMm(_worldPoint(lines.shiftNode, 0), _worldPoint(falx, 0), _worldPoint(falx, 1))


# --- landmarks -------------------------------------------------------------------------------
def landmarksBySlice(fiducialNode) -> dict[int, dict[str, list[float]]]:
    """``{slice: {name: RAS}}`` from the loaded landmarks file (labels ``<name> s<slice>``)."""
    found: dict[int, dict[str, list[float]]] = {}
    for n in range(fiducialNode.GetNumberOfControlPoints()):
        match = LABEL_PATTERN.match(fiducialNode.GetNthControlPointLabel(n))
        if match is None:
            raise ValueError(f"unexpected landmark label {fiducialNode.GetNthControlPointLabel(n)!r}")
        found.setdefault(int(match["slice"]), {})[match["name"]] = _worldPoint(fiducialNode, n)
    for index, points in found.items():
        missing = set(FALX_POINTS + SHIFT_POINTS) - set(points)
        if missing:
            raise ValueError(f"slice {index}: landmarks {sorted(missing)} missing from the landmarks file")
    return dict(sorted(found.items()))


def _line(scene, name: str, points, labels, rgb) -> Any:
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", scene.GenerateUniqueName(name))
    for point, label in zip(points, labels):
        node.AddControlPointWorld(vtk.vtkVector3d(*point), label)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*rgb)
        display.SetColor(*rgb)
    return node


def importLandmarkLines(scene, path, prefix: str) -> list[SliceLines]:
    """Load the backend's ``.mrk.json`` with Slicer's markups reader and make each slice's two lines.

    The loaded point list is only the carrier (removed afterwards): the lines hold the same
    world positions, labelled as in the file.
    """
    fiducials = results.importMarkups(scene, path, f"{prefix} landmarks")
    try:
        bySlice = landmarksBySlice(fiducials)
    finally:
        scene.RemoveNode(fiducials)
    slices = []
    for index, points in bySlice.items():
        made = {}
        for role, names, rgb in (("falx", FALX_POINTS, FALX_RGB), ("shift", SHIFT_POINTS, SHIFT_RGB)):
            node = _line(scene, f"{prefix} {role} s{index}", [points[n] for n in names], [f"{n} s{index}" for n in names], rgb)
            node.SetAttribute(ATTRIBUTE_PREFIX + "slice", str(index))
            node.SetAttribute(ATTRIBUTE_PREFIX + "role", role)
            made[role] = node
        slices.append(SliceLines(index, made["falx"], made["shift"]))
    return slices


# --- table -----------------------------------------------------------------------------------
def _column(tableNode, name: str) -> int:
    index = tableNode.GetColumnIndex(name)
    if index < 0:
        raise ValueError(f"the midline table has no column '{name}'")
    return index


def importMeasurementTable(scene, path, name: str, flagMm: float):
    """The backend's CSV as a table node: slice, z, automatic MLS, side, manual MLS, flag."""
    table = results.importTable(scene, path, name=name)
    for column in reversed(range(table.GetNumberOfColumns())):
        if table.GetColumnName(column) not in KEPT_COLUMNS:
            table.RemoveColumn(column)
    table.RenameColumn(_column(table, "mls_mm"), AUTOMATIC_COLUMN)
    for added in (MANUAL_COLUMN, FLAG_COLUMN):
        array = vtk.vtkStringArray()
        array.SetName(added)
        table.AddColumn(array)
    for column, unit in ((AUTOMATIC_COLUMN, "mm"), (MANUAL_COLUMN, "mm"), ("z_template_mm", "mm")):
        table.SetColumnUnitLabel(column, unit)
    table.SetColumnDescription(AUTOMATIC_COLUMN, "Midline shift measured by the model")
    table.SetColumnDescription(MANUAL_COLUMN, "Perpendicular distance of the shifted structure from the falx line, once edited")
    table.SetColumnDescription(FLAG_COLUMN, f"Shift (manual when edited, else automatic) >= {flagMm:g} mm")
    for row in range(table.GetNumberOfRows()):
        updateFlag(table, row, flagMm)
    return table


def exportTable(tableNode, path) -> Path:
    """Write the table as CSV (and Slicer's ``.schema.csv`` beside it) with Slicer's table storage node."""
    path = Path(path)
    storage = vtkMRMLTableStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(tableNode) or not path.is_file():
        raise OSError(f"could not write the table '{tableNode.GetName()}' to {path}")
    return path


def rowOfSlice(tableNode, index: int) -> int:
    column = _column(tableNode, "slice")
    for row in range(tableNode.GetNumberOfRows()):
        if int(tableNode.GetCellText(row, column)) == index:
            return row
    raise ValueError(f"slice {index} is not in the midline table")


def updateFlag(tableNode, row: int, flagMm: float) -> None:
    """The row's flag: the manual MLS when there is one, else the automatic one, against ``flagMm``."""
    manual = tableNode.GetCellText(row, _column(tableNode, MANUAL_COLUMN))
    value = float(manual) if manual else float(tableNode.GetCellText(row, _column(tableNode, AUTOMATIC_COLUMN)))
    tableNode.SetCellText(row, _column(tableNode, FLAG_COLUMN), FLAG_TEXT if value >= flagMm else "")


#: The corrections observing the lines of each table (table node ID -> ManualCorrections): one per table.
_ACTIVE: dict = {}


class ManualCorrections:
    """Keeps each slice's manual MLS in the table up to date while its points are moved.

    Observes every line (``PointModifiedEvent``); a change of a slice's falx points or its
    shifted-structure point writes ``manual_mls_mm`` (3 decimals, mm) and the row's flag. A new
    one for a table replaces (stops) the previous one, so a table is never updated twice.
    """

    def __init__(self, tableNode, slices: list[SliceLines], flagMm: float) -> None:
        self.tableNode = tableNode
        self.flagMm = flagMm
        self.slices = {lines.index: lines for lines in slices}
        self._observations = []
        previous = _ACTIVE.pop(tableNode.GetID(), None)
        if previous is not None:
            previous.stop()
        for lines in slices:
            for node in (lines.falxNode, lines.shiftNode):
                tag = node.AddObserver(vtkMRMLMarkupsNode.PointModifiedEvent, self._callback(lines.index))
                self._observations.append((node, tag))
        _ACTIVE[tableNode.GetID()] = self

    def _callback(self, index: int):
        return lambda caller, event: self.update(index)

    def update(self, index: int) -> float:
        """Recompute slice ``index``'s manual MLS from its points; returns it (mm)."""
        lines = self.slices[index]
        if lines.falxNode.GetNumberOfControlPoints() < 2 or lines.shiftNode.GetNumberOfControlPoints() < 1:
            return float("nan")  # a point was deleted: nothing to measure until it is back
        value = manualShiftMm(lines)
        row = rowOfSlice(self.tableNode, index)
        self.tableNode.SetCellText(row, _column(self.tableNode, MANUAL_COLUMN), f"{value:.3f}")
        updateFlag(self.tableNode, row, self.flagMm)
        self.tableNode.Modified()
        return value

    def stop(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
        if _ACTIVE.get(self.tableNode.GetID()) is self:
            del _ACTIVE[self.tableNode.GetID()]


def reconnectCorrections(scene) -> list[ManualCorrections]:
    """Observe the landmark lines of every midline table in ``scene`` again (e.g. after loading a
    saved scene, where observers are not kept): lines are found by their table reference and
    their ``MidlineShift.slice`` / ``.role`` attributes."""
    linesOf: dict[str, dict[int, dict[str, Any]]] = {}
    for node in mrml_io.nodesOfClass(scene, "vtkMRMLMarkupsLineNode"):
        table = node.GetNodeReference(TABLE_REFERENCE_ROLE)
        index, role = node.GetAttribute(ATTRIBUTE_PREFIX + "slice"), node.GetAttribute(ATTRIBUTE_PREFIX + "role")
        if table is not None and index is not None and role in ("falx", "shift"):
            linesOf.setdefault(table.GetID(), {}).setdefault(int(index), {})[role] = node
    corrections = []
    for tableID, bySlice in linesOf.items():
        table = scene.GetNodeByID(tableID)
        slices = [SliceLines(i, r["falx"], r["shift"]) for i, r in sorted(bySlice.items()) if {"falx", "shift"} <= set(r)]
        flagMm = float(table.GetAttribute(ATTRIBUTE_PREFIX + "flagMm") or DEFAULT_FLAG_MM)
        corrections.append(ManualCorrections(table, slices, flagMm))
    return corrections


# --- field -------------------------------------------------------------------------------------
def importNormalizingTransform(scene, path, name: str, ctNode=None):
    """The backend's field as a grid transform whose *to parent* is ``phi`` (shifted -> normal).

    Slicer reads the ITK field as the node's *from parent* (``phi``, as SimpleITK maps points);
    inverting the node makes ``phi`` its *to parent*: the CT placed under it is displayed as the
    normal anatomy (a structure at ``p`` is shown at ``phi(p)``).
    """
    node = mrml_io.importTransform(path, scene, None, name, ctNode, None)
    node.Inverse()
    return node


def magnitudeColorNode(scene):
    """The scene's colour node of displacement magnitudes (created once, then reused)."""
    low, high = MAGNITUDE_RANGE_MM
    values = [low + fraction * (high - low) for fraction in (0.0, 0.5, 1.0)]
    return results.proceduralColorNode(scene, MAGNITUDE_COLOR_NAME, list(zip(values, MAGNITUDE_RGB)))


def magnitudeVolume(scene, transformNode, name: str):
    """``|u|`` (mm) of a grid transform's displacements, on its grid, as a scalar volume with the
    magnitude colour table and a fixed window (:data:`MAGNITUDE_RANGE_MM`)."""
    grid = transformNode.GetTransformToParent()  # phi's own grid (the node is inverted)
    if not isinstance(grid, vtk.vtkAbstractTransform) or not hasattr(grid, "GetDisplacementGrid"):
        raise ValueError(f"'{transformNode.GetName()}' is not a grid transform")
    displacements = grid.GetDisplacementGrid()
    magnitude = vtk.vtkImageMagnitude()
    magnitude.SetInputData(displacements)
    magnitude.Update()
    image = vtk.vtkImageData()
    image.DeepCopy(magnitude.GetOutput())
    image.SetOrigin(0.0, 0.0, 0.0)
    image.SetSpacing(1.0, 1.0, 1.0)
    node = vtkMRMLScalarVolumeNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.SetAndObserveImageData(image)
    node.SetOrigin(*displacements.GetOrigin())
    node.SetSpacing(*displacements.GetSpacing())
    node.SetIJKToRASDirectionMatrix(grid.GetGridDirectionMatrix())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(magnitudeColorNode(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*MAGNITUDE_RANGE_MM)
    return node


# --- the job -----------------------------------------------------------------------------------
def jumpSlicesToMaximum(scene, result: MidlineShiftResult) -> list[float] | None:
    """Centre every slice view on the shifted structure of the slice of the maximum (RAS point)."""
    point = result.maximumPointRas()
    if point is not None:
        vtkMRMLSliceNode.JumpAllSlices(scene, *point, vtkMRMLSliceNode.CenteredJumpSlice)
    return point


def prepareMidlineJob(
    options: MidlineOptions, scene, workFolder: WorkFolder, python: str, env: dict[str, str] | None = None
) -> PreparedJob:
    """Export the CT (as displayed) into ``workFolder`` and return the job (command + result import)."""
    ok, reason = options.isValid()
    if not ok:
        raise ValueError(reason)
    ct = options.inputVolume
    try:
        files = {
            "input": mrml_io.exportVolume(ct, workFolder.file("ct.nrrd")),
            "report": workFolder.file("report.json"),
            "landmarks": workFolder.file("landmarks.mrk.json"),
            "field": workFolder.file("field.nrrd"),
            "table": workFolder.file("slices.csv"),
        }
    except Exception:
        workFolder.cleanup()  # nothing runs: leave no half-exported input behind
        raise
    commandLine = command.backendCommand(python, options.subcommand, options.asArgList(files))
    prefix = f"{ct.GetName()} midline"

    def importResults(processResult) -> MidlineShiftResult:
        report = json.loads(Path(files["report"]).read_text(encoding="utf-8"))
        flagMm = float(report["flag_threshold_mm"])
        slices = importLandmarkLines(scene, files["landmarks"], prefix)
        table = importMeasurementTable(scene, files["table"], f"{prefix} shift table", flagMm)
        transform = importNormalizingTransform(scene, files["field"], f"{prefix} to normal anatomy", ct)
        magnitude = magnitudeVolume(scene, transform, f"{prefix} displacement (mm)")
        result = MidlineShiftResult(
            caseMlsMm=float(report["case_mls_mm"]),
            side=str(report["side"]),
            flag=bool(report["flag"]),
            flagMm=flagMm,
            sliceOfMaximum=report.get("slice_of_maximum"),
            tableNode=table,
            markupsNodes=[node for lines in slices for node in (lines.falxNode, lines.shiftNode)],
            transformNode=transform,
            magnitudeNode=magnitude,
            slices=slices,
            report=report,
            seconds=processResult.elapsedSeconds,
        )
        for key, value in (
            ("caseMlsMm", f"{result.caseMlsMm:.3f}"),
            ("side", result.side),
            ("flag", str(result.flag).lower()),
            ("flagMm", f"{flagMm:g}"),
            ("sliceOfMaximum", "" if result.sliceOfMaximum is None else str(result.sliceOfMaximum)),
            ("model", str(report.get("model", ""))),
        ):
            table.SetAttribute(ATTRIBUTE_PREFIX + key, value)
        for node in result.markupsNodes:
            node.SetNodeReferenceID(TABLE_REFERENCE_ROLE, table.GetID())
        result.corrections = ManualCorrections(table, slices, flagMm)
        result.notes.extend(f"'{ct.GetName()}': {note}" for note in report.get("notes", []))
        folder = results.createFolder(scene, f"{prefix} shift", ct)
        results.placeInFolder(scene, [table, transform, magnitude, *result.markupsNodes], folder)
        return result

    return PreparedJob("MidlineShift", commandLine, workFolder, importResults, options.stageWeights, [], env)
