"""Volumes and transforms between MRML nodes and the backend's files.

Slicer works in RAS; the backend and its files work in LPS (ITK). The conversion is done by
Slicer's own storage nodes (``vtkMRMLVolumeArchetypeStorageNode``,
``vtkMRMLTransformStorageNode``), never by hand, except where a matrix has to be compared or
built from numpy; there the one formula is ``RAS = F @ LPS`` with ``F = diag(-1, -1, 1, 1)``.

Transforms: an ITK transform file maps a **fixed** point to a **moving** point (resampling
convention). Slicer reads such a file as the node's "transform from parent", so a node
loaded here maps fixed-RAS to moving-RAS through ``GetTransformFromParent()``, and a moving
volume placed under the node is displayed aligned with the fixed volume. Displacement fields
become ``vtkOrientedGridTransform`` objects, stored "from parent" as well, with trilinear
interpolation (the interpolation ITK and the backend use, so points map identically).

Only ``vtk``, numpy and MRML classes are used here: the same functions run in Slicer and in
the ``slicer-core`` test tier, with the scene passed in explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import vtk
from slicer import (
    vtkMRMLTransformNode,
    vtkMRMLTransformStorageNode,
    vtkMRMLVolumeArchetypeStorageNode,
    vtkOrientedGridTransform,
)

#: ``RAS = LPS_FROM_RAS @ LPS`` and back (the matrix is its own inverse).
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

MOVING_ROLE = "spatialRegistrationMoving"
FIXED_ROLE = "spatialRegistrationFixed"

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
LINEAR_TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
FIELD_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".h5", ".hdf5")


class GeometryError(ValueError):
    """A node's geometry cannot be exported as requested (e.g. a non-linear parent transform)."""


# --- matrices ------------------------------------------------------------------------------
def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    values = np.asarray(array, dtype=np.float64)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(values[r, c]))
    return matrix


def arrayFromVtkMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def ijkToRasFromLpsAffine(affine: np.ndarray) -> np.ndarray:
    """Slicer's IJKToRAS of a backend ``Image.affine`` (voxel -> LPS); same voxel indices."""
    return LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)


def lpsAffineFromIjkToRas(ijkToRas: np.ndarray) -> np.ndarray:
    """The backend ``Image.affine`` (voxel -> LPS) of a Slicer IJKToRAS matrix."""
    return LPS_FROM_RAS @ np.asarray(ijkToRas, dtype=np.float64)


def rasMatrixFromLps(matrixLps: np.ndarray) -> np.ndarray:
    """Conjugate a 4x4 point map from LPS to RAS (``F A F``)."""
    return LPS_FROM_RAS @ np.asarray(matrixLps, dtype=np.float64) @ LPS_FROM_RAS


lpsMatrixFromRas = rasMatrixFromLps  # the same conjugation, F being its own inverse


# --- transform chains ------------------------------------------------------------------------
def sameNode(a, b) -> bool:
    """True when ``a`` and ``b`` are the same MRML node (by object, else by scene ID)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    return a.GetID() is not None and a.GetID() == b.GetID() and a.GetScene() is b.GetScene()


def transformChain(node, stopAt=None) -> list:
    """Parent transform nodes of ``node`` from the nearest to the top (stops before ``stopAt``)."""
    chain: list = []
    parent = node.GetParentTransformNode()
    while parent is not None and not sameNode(parent, stopAt) and not any(sameNode(parent, t) for t in chain):
        chain.append(parent)
        parent = parent.GetParentTransformNode()
    return chain


def chainIncludes(node, transformNode) -> bool:
    """True when ``transformNode`` is ``node``'s parent transform or one of its ancestors."""
    if node is None or transformNode is None:
        return False
    return any(sameNode(t, transformNode) for t in transformChain(node))


def linearChainToWorld(node, stopAt=None) -> np.ndarray:
    """4x4 RAS matrix of the parent transforms of ``node`` (up to, not including, ``stopAt``).

    Raises :class:`GeometryError` when one of them is not linear.
    """
    result = np.eye(4)
    for transformNode in transformChain(node, stopAt):
        if not transformNode.IsLinear():
            raise GeometryError(
                f"'{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'; "
                "harden it first (Data module: right-click > Harden transform)"
            )
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToParent(matrix)
        result = arrayFromVtkMatrix(matrix) @ result
    return result


# --- volumes ---------------------------------------------------------------------------------
def volumeIjkToRas(volumeNode, world: bool = True, stopAt=None) -> np.ndarray:
    """IJKToRAS of ``volumeNode``; with ``world``, through its linear parent transforms.

    ``stopAt`` leaves out that transform node and everything above it (used for the moving
    volume when it already hangs under the output transform of an earlier run).
    """
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = arrayFromVtkMatrix(matrix)
    if world:
        ijkToRas = linearChainToWorld(volumeNode, stopAt) @ ijkToRas
    return ijkToRas


def volumeLpsAffine(volumeNode, world: bool = True, stopAt=None) -> np.ndarray:
    """The backend ``Image.affine`` (voxel -> LPS) that ``volumeNode`` has in a file."""
    return lpsAffineFromIjkToRas(volumeIjkToRas(volumeNode, world, stopAt))


def exportableIjkToRas(volumeNode, world: bool = True, stopAt=None) -> np.ndarray:
    """The IJKToRAS a file of ``volumeNode`` gets, or :class:`GeometryError` when none can.

    Image files store spacing and orthonormal axis directions: a parent transform that shears
    the volume (or a non-linear one) cannot be written as geometry and has to be hardened.
    """
    ijkToRas = volumeIjkToRas(volumeNode, world, stopAt)
    linear = ijkToRas[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(linear)) < 1e-12:
        raise GeometryError(f"'{volumeNode.GetName()}' has a degenerate geometry (spacing {spacing.tolist()})")
    directions = linear / spacing
    if np.abs(directions.T @ directions - np.eye(3)).max() > 1e-5:
        raise GeometryError(
            f"'{volumeNode.GetName()}' is under a transform that shears it; harden the transform first "
            "(Data module: right-click > Harden transform)"
        )
    return ijkToRas


def movingVolumeFrame(volumeNode, stopAt=None) -> tuple[bool, str]:
    """How to export a moving volume: ``(world, note)``.

    ``world`` True: with its linear parent transforms (up to ``stopAt``, the output transform),
    so a pre-alignment the user made is where the registration starts. When those transforms
    cannot be written as image geometry (non-linear, or shearing like an earlier affine result),
    ``world`` is False: the volume is registered in its own coordinates, and ``note`` says so;
    the result is then applied without those transforms (:func:`placeMovingUnderResult`).
    """
    try:
        exportableIjkToRas(volumeNode, True, stopAt)
        return True, ""
    except GeometryError:
        chain = transformChain(volumeNode, stopAt)
        parent = f"'{chain[0].GetName()}'" if chain else "its parent transform"
        return False, (
            f"'{volumeNode.GetName()}' is under {parent}, which warps or shears it and cannot be written as "
            f"image geometry: registering '{volumeNode.GetName()}' in its own coordinates (without its parent "
            "transforms); it is put directly under the result."
        )


def volumeSequenceReason(sequence) -> str:
    """Why ``sequence`` cannot be registered frame by frame, for the user; "" when it can: a
    sequence node (not its browser or proxy) holding at least one scalar volume."""
    if sequence is None:
        return "Select the sequence of moving volumes"
    if not sequence.IsA("vtkMRMLSequenceNode"):
        return f"'{sequence.GetName()}' is not a sequence (pick the sequence node, not its browser or proxy)"
    if sequence.GetNumberOfDataNodes() == 0:
        return f"The sequence '{sequence.GetName()}' has no frames"
    kind = sequence.GetDataNodeClassName()
    if kind != "vtkMRMLScalarVolumeNode":
        return f"The sequence '{sequence.GetName()}' holds {kind or 'mixed'} frames, not scalar volumes"
    return ""


def registrationInputsReason(fixed, moving, outputVolume=None, outputTransform=None) -> str:
    """Why a fixed/moving pair (and its outputs) cannot be registered, for the user; "" when it can.

    Checks what every registration module needs: both volumes chosen, different, 3D with one
    component; the output volume is neither input; the fixed volume is not under the output
    transform (it never moves) and can be written with the geometry it is displayed with.
    """
    if fixed is None and moving is None:
        return "Select the fixed and moving volumes"
    if fixed is None:
        return "Select the fixed volume"
    if moving is None:
        return "Select the moving volume"
    if sameNode(fixed, moving):
        return "Fixed and moving volumes must be different volumes"
    for node, what in ((fixed, "fixed"), (moving, "moving")):
        image = node.GetImageData()
        if image is None:
            return f"The {what} volume has no image data"
        dims = image.GetDimensions()
        if min(dims) < 2:
            return f"The {what} volume is not 3D (size {'x'.join(map(str, dims))})"
        if image.GetNumberOfScalarComponents() != 1:
            return f"The {what} volume must have one component per voxel"
    if outputVolume is not None and (sameNode(outputVolume, fixed) or sameNode(outputVolume, moving)):
        return "The output volume must not be the fixed or moving volume"
    if outputTransform is not None and chainIncludes(fixed, outputTransform):
        return "The fixed volume must not be under the output transform"
    try:
        exportableIjkToRas(fixed)
    except GeometryError as error:
        return f"The fixed volume cannot be used as it is: {error}"
    return ""


def exportVolume(volumeNode, path: str | os.PathLike, world: bool = True, stopAt=None, compress: bool = False) -> Path:
    """Write ``volumeNode`` to ``path`` with Slicer's volume storage node (LPS on disk).

    With ``world`` (default) the file has the geometry the volume is shown with, i.e. its
    linear parent transforms applied (up to ``stopAt``); a non-linear or shearing parent raises
    :class:`GeometryError`. The node itself is not changed and gets no storage node.
    """
    path = Path(path)
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("the volume has no image data")
    ijkToRas = exportableIjkToRas(volumeNode, world, stopAt)
    # A detached shallow copy: same voxels, possibly a different matrix, no scene side effects.
    copy = volumeNode.__class__()
    copy.SetName(volumeNode.GetName())
    copy.SetAndObserveImageData(volumeNode.GetImageData())
    copy.SetIJKToRASMatrix(vtkMatrixFromArray(ijkToRas))
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not storage.WriteData(copy) or not path.exists():
        raise OSError(f"could not write volume '{volumeNode.GetName()}' to {path}")
    return path


def importVolume(
    path: str | os.PathLike,
    scene,
    volumeNode=None,
    name: str | None = None,
    nodeClass: str = "vtkMRMLScalarVolumeNode",
) -> object:
    """Read a volume file into ``volumeNode`` (or a new node of ``nodeClass`` added to ``scene``).

    The node keeps no storage node pointing at ``path`` (which is usually temporary): Slicer
    treats it as new, unsaved data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume file not found: {path}")
    created = volumeNode is None
    if created:
        volumeNode = scene.AddNewNodeByClass(nodeClass, scene.GenerateUniqueName(name or _nodeNameFromPath(path)))
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    if not storage.ReadData(volumeNode):
        if created:
            scene.RemoveNode(volumeNode)
        raise OSError(f"could not read volume {path}")
    if name and not created:
        volumeNode.SetName(name)
    return volumeNode


def _nodeNameFromPath(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".seg.nrrd") + VOLUME_SUFFIXES + FIELD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --- transforms ----------------------------------------------------------------------------
def readTransformFile(path: str | os.PathLike):
    """Read an ITK transform file or displacement-field image into a detached transform node."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"transform file not found: {path}")
    node = vtkMRMLTransformNode()
    storage = vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"could not read transform {path}")
    return node


def importTransform(
    path: str | os.PathLike,
    scene,
    transformNode=None,
    name: str | None = None,
    movingNode=None,
    fixedNode=None,
    gridInterpolation: str = "linear",
):
    """Load a backend transform file into ``transformNode`` (or a new node in ``scene``).

    Linear files (.h5/.tfm/.txt) become a linear transform node, displacement fields a grid
    transform node; both stored "from parent" (fixed RAS -> moving RAS). The node is put at
    world level (no parent transform) since the file maps world to world. ``movingNode`` and
    ``fixedNode`` are recorded as the node's registration references.

    ``gridInterpolation``: "linear" (as ITK and the backend; points map identically) or "cubic".
    """
    loaded = readTransformFile(path)
    linear = bool(loaded.IsLinear())
    if transformNode is None:
        # One current class for every kind (the Linear/Grid/BSpline subclasses are deprecated aliases).
        transformNode = scene.AddNewNodeByClass(
            "vtkMRMLTransformNode", scene.GenerateUniqueName(name or _nodeNameFromPath(Path(path)))
        )
    elif name:
        transformNode.SetName(name)
    if linear:
        matrix = vtk.vtkMatrix4x4()
        loaded.GetMatrixTransformFromParent(matrix)
        transformNode.SetMatrixTransformFromParent(matrix)
    else:
        fromParent = loaded.GetTransformFromParent()
        grid = _asGridTransform(fromParent)
        if grid is not None:
            copy = vtkOrientedGridTransform()
            copy.DeepCopy(grid)
            setGridInterpolation(copy, gridInterpolation)
            transformNode.SetAndObserveTransformFromParent(copy)
        else:  # composite or other kind: keep what Slicer read
            transformNode.SetAndObserveTransformFromParent(fromParent)
    if transformNode.GetParentTransformNode() is not None:
        transformNode.SetAndObserveTransformNodeID(None)
    setRegistrationReferences(transformNode, movingNode, fixedNode)
    return transformNode


def _asGridTransform(transform):
    if isinstance(transform, vtkOrientedGridTransform) and not transform.GetInverseFlag():
        return transform
    return None


def setGridInterpolation(gridTransform, mode: str = "linear") -> None:
    if mode == "linear":
        gridTransform.SetInterpolationModeToLinear()
    elif mode == "cubic":
        gridTransform.SetInterpolationModeToCubic()
    else:
        raise ValueError(f"unknown grid interpolation {mode!r}; use linear or cubic")
    gridTransform.Modified()


def exportTransform(transformNode, path: str | os.PathLike) -> Path:
    """Write a transform node with Slicer's transform storage node (ITK file, LPS on disk)."""
    path = Path(path)
    storage = vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not storage.WriteData(transformNode) or not path.exists():
        raise OSError(f"could not write transform '{transformNode.GetName()}' to {path}")
    return path


def setRegistrationReferences(transformNode, movingNode=None, fixedNode=None) -> None:
    """Record which volumes a registration transform was computed for (Slicer's roles)."""
    movingRole = _role("GetMovingNodeReferenceRole", MOVING_ROLE)
    fixedRole = _role("GetFixedNodeReferenceRole", FIXED_ROLE)
    if movingNode is not None:
        transformNode.SetNodeReferenceID(movingRole, movingNode.GetID())
    if fixedNode is not None:
        transformNode.SetNodeReferenceID(fixedRole, fixedNode.GetID())


def _role(method: str, default: str) -> str:
    getter = getattr(vtkMRMLTransformNode, method, None)
    try:
        return getter() if getter is not None else default
    except TypeError:
        return default


def registrationReferences(transformNode) -> tuple:
    """``(moving, fixed)`` nodes recorded on a registration transform (None when absent)."""
    movingRole = _role("GetMovingNodeReferenceRole", MOVING_ROLE)
    fixedRole = _role("GetFixedNodeReferenceRole", FIXED_ROLE)
    return transformNode.GetNodeReference(movingRole), transformNode.GetNodeReference(fixedRole)


def lpsMatrixFromTransformNode(transformNode) -> np.ndarray:
    """The ITK (fixed -> moving, LPS) 4x4 matrix of a linear registration transform node."""
    if not transformNode.IsLinear():
        raise GeometryError(f"'{transformNode.GetName()}' is not linear")
    matrix = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformFromParent(matrix)
    return lpsMatrixFromRas(arrayFromVtkMatrix(matrix))


def mapPointsLps(transformNode, pointsLps: np.ndarray) -> np.ndarray:
    """Map LPS points ``(N, 3)`` through the node's from-parent transform (fixed -> moving)."""
    points = np.atleast_2d(np.asarray(pointsLps, dtype=np.float64))
    transform = transformNode.GetTransformFromParent()
    flip = LPS_FROM_RAS[:3, :3]
    out = np.empty_like(points)
    for n, point in enumerate(points):
        ras = flip @ point
        out[n] = flip @ np.asarray(transform.TransformPoint(ras.tolist()), dtype=np.float64)
    return out


def gridTransformFromDisplacement(displacementLps: np.ndarray, affineLps: np.ndarray, interpolation: str = "linear"):
    """A ``vtkOrientedGridTransform`` (set it "from parent") from a backend displacement field.

    ``displacementLps``: array ``(n_i, n_j, n_k, 3)`` of LPS mm displacements on the grid whose
    voxel -> LPS matrix is ``affineLps`` (``DisplacementFieldTransform.field``); the map is
    ``p -> p + u(p)`` from fixed to moving.
    """
    field = np.asarray(displacementLps, dtype=np.float64)
    if field.ndim != 4 or field.shape[3] != 3:
        raise ValueError(f"a displacement field needs shape (n_i, n_j, n_k, 3), got {field.shape}")
    ijkToRas = ijkToRasFromLpsAffine(affineLps)
    linear = ijkToRas[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = np.eye(4)
    direction[:3, :3] = linear / spacing
    vectorsRas = field @ LPS_FROM_RAS[:3, :3].T  # flip x and y of every vector
    image = vtk.vtkImageData()
    image.SetDimensions(*[int(s) for s in field.shape[:3]])
    image.SetSpacing(*spacing.tolist())
    image.SetOrigin(*ijkToRas[:3, 3].tolist())
    from vtk.util import numpy_support

    # VTK point order is i fastest: the (k, j, i, 3) C-order view of the array.
    flat = np.ascontiguousarray(vectorsRas.transpose(2, 1, 0, 3)).reshape(-1, 3)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_DOUBLE)
    scalars.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(scalars)
    grid = vtkOrientedGridTransform()
    grid.SetGridDirectionMatrix(vtkMatrixFromArray(direction))
    grid.SetDisplacementGridData(image)
    setGridInterpolation(grid, interpolation)
    return grid


def setDisplacementField(transformNode, displacementLps: np.ndarray, affineLps: np.ndarray) -> None:
    """Store a backend displacement field in ``transformNode`` "from parent"."""
    transformNode.SetAndObserveTransformFromParent(gridTransformFromDisplacement(displacementLps, affineLps))


def composeWithMovingFrame(transformNode, movingToWorldRas: np.ndarray) -> None:
    """Make a world-to-world result relative to the moving volume's own (file) coordinates.

    The backend's transform ``T`` maps fixed points (as displayed) to moving points *as
    displayed*, i.e. through the moving volume's linear parent transforms ``C`` (RAS 4x4,
    ``movingToWorldRas``). The stored "from parent" becomes ``C^-1 o T``, so with the moving
    volume placed **directly** under the node its displayed position is ``T^-1 o C``: the
    pre-alignment is kept and nothing else in the scene moves. Linear results stay linear;
    a non-linear result becomes a composite (``vtkGeneralTransform``).
    """
    inverse = np.linalg.inv(np.asarray(movingToWorldRas, dtype=np.float64))
    if np.allclose(inverse, np.eye(4), atol=1e-12):
        return
    if transformNode.IsLinear():
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromParent(matrix)
        transformNode.SetMatrixTransformFromParent(vtkMatrixFromArray(inverse @ arrayFromVtkMatrix(matrix)))
        return
    composite = vtk.vtkGeneralTransform()
    composite.PostMultiply()  # points go through T first, then C^-1
    composite.Concatenate(transformNode.GetTransformFromParent())
    composite.Concatenate(vtkMatrixFromArray(inverse))
    transformNode.SetAndObserveTransformFromParent(composite)


def placeMovingUnderResult(movingNode, resultNode) -> list[str]:
    """Put only the moving volume directly under the registration result (as SlicerElastix does).

    The fixed volume, the moving volume's former parent transforms and every other node stay
    where they are (a shared parent transform is never re-parented). ``resultNode`` must
    already include the moving volume's former parents (:func:`composeWithMovingFrame`).
    Returns notes for the log about what changed.
    """
    if movingNode is None or resultNode is None:
        return []
    parent = movingNode.GetParentTransformNode()
    if sameNode(parent, resultNode):
        return []
    movingNode.SetAndObserveTransformNodeID(resultNode.GetID())
    if parent is None:
        return []
    return [
        f"'{movingNode.GetName()}' was under '{parent.GetName()}'; it is now directly under "
        f"'{resultNode.GetName()}', which includes where '{parent.GetName()}' had put it"
    ]


def nodesOfClass(scene, className: str) -> Iterable:
    collection = scene.GetNodesByClass(className)
    for n in range(collection.GetNumberOfItems()):
        yield collection.GetItemAsObject(n)
