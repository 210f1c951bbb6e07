"""Loading what a backend run wrote into the scene: the result kinds the DiffusionReg modules need.

One function per kind, each reading the file with Slicer's own storage node (so LPS on disk
becomes RAS in the scene without hand-written conversions) and returning the node(s):

- :func:`importDisplacementFields`: a forward field (fixed -> moving) and optionally its
  inverse (moving -> fixed), both as grid transforms stored "from parent" (resampling
  convention), with registration references;
- :func:`importScalarMap`: a scalar volume with a colour table, e.g. the Jacobian determinant
  with a blue-white-red map centred at 1 (no volume change);
- :func:`importVolumesIntoFolder`: several volumes under one subject-hierarchy folder;
- :func:`importMarkups`: markups (points, lines, planes...) from a ``.mrk.json`` file;
- :func:`importTable`: a table node from a CSV file.

Linear and single grid transforms go through :func:`mrml_io.importTransform`. Nothing here
imports Qt or ``slicer.util``: the same code runs in Slicer and in the ``slicer-core`` tier.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from slicer import (
    vtkMRMLMarkupsJsonStorageNode,
    vtkMRMLProceduralColorNode,
    vtkMRMLSubjectHierarchyNode,
    vtkMRMLTableStorageNode,
)

from . import mrml_io

#: Jacobian determinant display: values mapped over this range, 1 (no volume change) white in
#: the middle, shrinking (< 1) blue, growing (> 1) red; 0 and below (folding) in FOLDING_RGB.
JACOBIAN_RANGE = (0.0, 2.0)
#: Name of the shared colour node (one per scene, reused by every Jacobian map).
JACOBIAN_COLOR_NAME = "DiffusionReg Jacobian (blue < 1 < red, folding yellow)"
#: RGB control points of the diverging map at the low end, the centre and the high end.
DIVERGING_RGB = ((0.23, 0.30, 0.75), (1.0, 1.0, 1.0), (0.71, 0.02, 0.15))
#: Folding (determinant <= 0: the map turns space inside out) in a colour the diverging map never
#: takes; the blue end starts one step of Slicer's 256-entry colour table above 0.
FOLDING_RGB = (1.0, 0.85, 0.0)
FOLDING_EDGE = (JACOBIAN_RANGE[1] - JACOBIAN_RANGE[0]) / 255.0


# --- transforms ------------------------------------------------------------------------------
def importDisplacementFields(
    scene,
    forwardPath: str | os.PathLike,
    inversePath: str | os.PathLike | None = None,
    forwardNode=None,
    inverseNode=None,
    movingNode=None,
    fixedNode=None,
    name: str | None = None,
) -> tuple:
    """Load a displacement field (and its inverse) as grid transforms; returns ``(forward, inverse)``.

    ``forwardPath`` maps fixed points to moving points (ITK/backend convention); the node
    stores it "from parent", so the moving volume placed under it is shown aligned with the
    fixed volume. ``inversePath`` maps moving to fixed (the network's own inverse of an
    inverse-consistent model); its node records the roles swapped. ``inverse`` is None
    without ``inversePath``.
    """
    forward = mrml_io.importTransform(forwardPath, scene, forwardNode, name, movingNode, fixedNode)
    inverse = None
    if inversePath is not None:
        inverseName = f"{name} (inverse)" if name else None
        inverse = mrml_io.importTransform(inversePath, scene, inverseNode, inverseName, fixedNode, movingNode)
    return forward, inverse


# --- scalar maps -----------------------------------------------------------------------------
def proceduralColorNode(scene, name: str, points: Sequence[tuple[float, tuple[float, float, float]]]):
    """The scene's colour node ``name`` (created once, then reused): ``(value, RGB)`` control points."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None:
        return existing
    node = vtkMRMLProceduralColorNode()
    node.SetName(name)
    node.SetAttribute("Category", "DiffusionReg")
    function = node.GetColorTransferFunction()
    function.RemoveAllPoints()
    for value, rgb in points:
        function.AddRGBPoint(float(value), *rgb)
    node.SetSaveWithScene(True)
    scene.AddNode(node)
    return node


def jacobianColorNode(scene):
    """The scene's diverging colour node for Jacobian maps (created once, then reused)."""
    low, high = JACOBIAN_RANGE
    values = (low, low + FOLDING_EDGE, (low + high) / 2.0, high)
    return proceduralColorNode(scene, JACOBIAN_COLOR_NAME, list(zip(values, (FOLDING_RGB, *DIVERGING_RGB))))


def importScalarMap(
    scene,
    path: str | os.PathLike,
    volumeNode=None,
    name: str | None = None,
    colorNode=None,
    valueRange: tuple[float, float] = JACOBIAN_RANGE,
):
    """Load a scalar map (default: a Jacobian determinant) with a colour table and fixed window.

    ``colorNode`` defaults to :func:`jacobianColorNode`; the window spans ``valueRange`` so the
    colour of a value never depends on the rest of the image (1 stays white).
    """
    node = mrml_io.importVolume(path, scene, volumeNode, name)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    color = colorNode if colorNode is not None else jacobianColorNode(scene)
    display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(valueRange[0]), float(valueRange[1]))
    return node


# --- subject hierarchy -------------------------------------------------------------------------
def subjectHierarchy(scene):
    """The scene's subject hierarchy node (created when the scene has none yet)."""
    return vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)


def itemOf(scene, node) -> int:
    """The subject-hierarchy item of ``node``, created under the scene when it has none.

    In Slicer the subject-hierarchy plugins give every new node an item; the MRML library
    alone (slicer-core) does not, so the item is made here when missing.
    """
    sh = subjectHierarchy(scene)
    item = sh.GetItemByDataNode(node)
    return item or sh.CreateItem(sh.GetSceneItemID(), node)


def createFolder(scene, name: str, besideNode=None) -> int:
    """A subject-hierarchy folder item; next to ``besideNode`` (same parent, e.g. its study) when given."""
    sh = subjectHierarchy(scene)
    parent = sh.GetSceneItemID()
    if besideNode is not None:
        parent = sh.GetItemParent(itemOf(scene, besideNode)) or parent
    return sh.CreateFolderItem(parent, name)


def placeInFolder(scene, nodes: Sequence, folderItem: int) -> None:
    sh = subjectHierarchy(scene)
    for node in nodes:
        if node is not None:
            sh.SetItemParent(itemOf(scene, node), folderItem)


def placeBeside(scene, nodes: Sequence, referenceNode) -> None:
    """Put ``nodes`` under the subject-hierarchy parent of ``referenceNode`` (its study, usually)."""
    if referenceNode is None:
        return
    sh = subjectHierarchy(scene)
    parent = sh.GetItemParent(itemOf(scene, referenceNode))
    if parent and parent != sh.GetSceneItemID():
        placeInFolder(scene, nodes, parent)


def importVolumesIntoFolder(
    scene, paths: Sequence[str | os.PathLike], folderName: str, names: Sequence[str] | None = None, besideNode=None
) -> tuple[int, list]:
    """Load several volumes under a new subject-hierarchy folder; returns ``(folderItem, nodes)``."""
    names = list(names) if names is not None else [None] * len(paths)
    if len(names) != len(paths):
        raise ValueError(f"{len(paths)} volume files but {len(names)} names")
    nodes = [mrml_io.importVolume(path, scene, None, name) for path, name in zip(paths, names)]
    folder = createFolder(scene, folderName, besideNode)
    placeInFolder(scene, nodes, folder)
    return folder, nodes


# --- markups and tables ----------------------------------------------------------------------
def importMarkups(scene, path: str | os.PathLike, name: str | None = None):
    """Load the first markups node of a ``.mrk.json`` file (its type decides the node class)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"markups file not found: {path}")
    storage = vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    try:
        node = storage.AddNewMarkupsNodeFromFile(str(path), name or path.name.split(".")[0])
    finally:
        scene.RemoveNode(storage)
    if node is None:
        raise OSError(f"could not read markups from {path}")
    # The node keeps no storage node pointing at the (temporary) file: it is new, unsaved data.
    node.SetAndObserveStorageNodeID(None)
    return node


def importTable(scene, path: str | os.PathLike, tableNode=None, name: str | None = None):
    """Load a CSV (or TSV) file into a table node (new when ``tableNode`` is None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file not found: {path}")
    created = tableNode is None
    if created:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name or path.stem))
    storage = vtkMRMLTableStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(tableNode):
        if created:
            scene.RemoveNode(tableNode)
        raise OSError(f"could not read table {path}")
    if name and not created:
        tableNode.SetName(name)
    return tableNode
