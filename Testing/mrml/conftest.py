"""MRML tier: real Slicer MRML (storage nodes, transform and volume nodes) from ``slicer-core``.

These tests load what the backend writes through Slicer's own readers and writers, using the
same ``DiffusionRegCoreLib`` functions the Slicer modules call. They need the PyPI wheel
``slicer-core`` (Python 3.10-3.13, pins ``vtk==9.6.0``). Without it they skip with a reason,
except where ``DIFFUSIONREG_REQUIRE_MRML=1`` (CI) or ``CI`` is set: there a missing
slicer-core is a failure, so the tier can never be skipped silently.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CORE_MODULE_DIR = REPO / "DiffusionRegCore"


def _require_mrml() -> bool:
    return bool(os.environ.get("DIFFUSIONREG_REQUIRE_MRML") or os.environ.get("CI"))


def _import_slicer_core():
    try:
        import slicer

        if not hasattr(slicer, "vtkMRMLScene") or not hasattr(slicer, "vtkMRMLTransformStorageNode"):
            raise ImportError("the installed 'slicer' package has no MRML classes (is it PyPI 'slicer', not 'slicer-core'?)")
        return slicer
    except ImportError as error:
        message = f"slicer-core (real Slicer MRML) is not importable: {error}; pip install slicer-core vtk==9.6.0"
        if _require_mrml():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def slicer_core():
    """The ``slicer`` namespace of slicer-core (vtkMRMLScene and friends)."""
    return _import_slicer_core()


@pytest.fixture(scope="session")
def mrml_io(slicer_core):
    """``DiffusionRegCoreLib.mrml_io``: the node import/export code the modules use."""
    if str(CORE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(CORE_MODULE_DIR))
    return importlib.import_module("DiffusionRegCoreLib.mrml_io")


@pytest.fixture
def scene(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="session")
def oblique_affine() -> np.ndarray:
    """A voxel -> LPS matrix with rotation about all axes, anisotropic spacing and an offset."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", [17.0, -23.0, 31.0], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 0.9, 2.5])
    affine[:3, 3] = [-31.5, 12.25, 48.0]
    return affine


def points_inside(affine: np.ndarray, shape, count: int, seed: int, margin: float = 1.0) -> np.ndarray:
    """Random LPS points inside a grid (``margin`` voxels away from the border)."""
    rng = np.random.default_rng(seed)
    index = rng.uniform(margin, np.asarray(shape, dtype=float) - 1 - margin, (count, 3))
    return index @ affine[:3, :3].T + affine[:3, 3]


def sitk_map_points(path: Path, points: np.ndarray) -> np.ndarray:
    """Map LPS points with SimpleITK reading ``path`` (ITK transform file or field image)."""
    import SimpleITK as sitk

    name = path.name.lower()
    if name.endswith((".h5", ".hdf5", ".tfm", ".txt", ".mat")):
        transform = sitk.ReadTransform(str(path))
    else:
        field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
        transform = sitk.DisplacementFieldTransform(field)
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


MODULE_DIRS = (CORE_MODULE_DIR, REPO / "SpatialDiffusionReg")


@pytest.fixture(scope="session")
def corelib(mrml_io):
    """The DiffusionRegCoreLib modules the Slicer modules use (job, results, process, ...)."""
    for folder in MODULE_DIRS:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    names = ("command", "job", "model_choice", "models", "paths", "process", "progress", "results")
    return type("CoreLib", (), {n: importlib.import_module(f"DiffusionRegCoreLib.{n}") for n in names})


@pytest.fixture(scope="session")
def affine_job(corelib):
    """``SpatialDiffusionRegLib.affine_job``: the job preparation and result import the module runs."""
    return importlib.import_module("SpatialDiffusionRegLib.affine_job")


def world_points_of_voxels(slicer_core, volumeNode, ijk: np.ndarray) -> np.ndarray:
    """Where voxels of ``volumeNode`` are displayed, in LPS mm (through all its parent transforms)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    local = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    toWorld = vtk.vtkGeneralTransform()
    slicer_core.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeNode.GetParentTransformNode(), None, toWorld)
    flip = np.diag([-1.0, -1.0, 1.0])
    out = []
    for point in np.asarray(ijk, dtype=float):
        ras = local[:3, :3] @ point + local[:3, 3]
        out.append(flip @ np.array(toWorld.TransformPoint(ras.tolist())))
    return np.array(out)
