"""The module's whole path without Qt: MRML nodes -> files -> ``diffusionreg affine`` -> nodes.

The volumes are exported from MRML nodes with ``mrml_io.exportVolume``, the command is built
by ``command.affineCommand`` and run by ``process.BackendProcess`` (JSON progress parsed),
and the transform it writes is loaded by Slicer's transform storage node through
``mrml_io.importTransform``, exactly as SpatialDiffusionReg does. The loaded node must map
points as SimpleITK maps them with the same file (within 1e-4 mm).

The network is a tiny randomly initialised model written to a temporary folder (the test is
about files and geometry, not accuracy), so no trained weights are needed and nothing skips.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import CORE_MODULE_DIR, REPO, sitk_map_points

pytestmark = pytest.mark.mrml

SAMPLE = REPO / "Resources" / "Sample"
TOLERANCE_MM = 1e-4


@pytest.fixture(scope="module")
def corelib(mrml_io):
    """The DiffusionRegCoreLib modules the Slicer modules use."""
    if str(CORE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(CORE_MODULE_DIR))
    names = ("command", "process", "progress", "paths")
    return type("CoreLib", (), {n: importlib.import_module(f"DiffusionRegCoreLib.{n}") for n in names})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """``model.safetensors`` + ``config.json`` of a tiny random affine network (--model PATH)."""
    torch = pytest.importorskip("torch", reason="the affine command needs torch (installed with the backend)")
    from safetensors.torch import save_file

    from diffusionreg.affine.config import AffineConfig
    from diffusionreg.affine.register import build_model

    torch.manual_seed(0)
    config = AffineConfig(name="tiny-test", grid_size=16, spacing_mm=12.0, widths=(2, 4, 4, 8), norm_groups=2,
                          time_dim=8, time_hidden=16, timesteps=4, zero_init_head=False)
    model = build_model(config)
    folder = tmp_path_factory.mktemp("tiny_model")
    state = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(config.to_json(), encoding="utf-8")
    return folder / "model.safetensors"


def _run(corelib, command, cwd):
    events = []
    process = corelib.process.BackendProcess(
        command, env=corelib.command.backendEnvironment(REPO), cwd=cwd, onProgress=events.append
    ).start()
    result = process.wait(timeout=300)
    return result, events


def test_affine_cli_transform_loads_in_slicer_as_simpleitk_maps_it(tmp_path: Path, scene, mrml_io, corelib, tiny_model) -> None:
    # Inputs as the module has them: volume nodes (loaded by Slicer's reader), one under a transform.
    fixed = mrml_io.importVolume(SAMPLE / "sample_fixed.nii.gz", scene, name="fixed")
    moving = mrml_io.importVolume(SAMPLE / "sample_moving.nii.gz", scene, name="moving")
    earlier = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "earlier result")
    moving.SetAndObserveTransformNodeID(earlier.GetID())
    fixedPath = mrml_io.exportVolume(fixed, tmp_path / "fixed.nrrd")
    movingPath = mrml_io.exportVolume(moving, tmp_path / "moving.nrrd", stopAt=earlier)
    transformPath, volumePath = tmp_path / "transform.h5", tmp_path / "resampled.nrrd"
    command = corelib.command.affineCommand(
        sys.executable, fixedPath, movingPath, transformPath, volumePath, model=str(tiny_model), modality="mri",
        steps=2, initialize="moments", seed=0, device="cpu",
    )

    result, events = _run(corelib, command, tmp_path)

    assert result.succeeded, result.summary() + "\n" + "\n".join(result.log)
    assert events and all(0.0 <= e.fraction <= 1.0 for e in events)
    assert {"read"} <= {e.stage for e in events}
    assert not any(line.lstrip().startswith('{"stage"') for line in result.log), "progress lines leaked into the log"

    node = mrml_io.importTransform(transformPath, scene, earlier, movingNode=moving, fixedNode=fixed)
    assert node is earlier and node.IsLinear()
    fixedGrid = mrml_io.volumeLpsAffine(fixed)
    dims = np.array(fixed.GetImageData().GetDimensions(), dtype=float)
    rng = np.random.default_rng(0)
    points = rng.uniform(0, dims - 1, (50, 3)) @ fixedGrid[:3, :3].T + fixedGrid[:3, 3]
    expected = sitk_map_points(transformPath, points)
    np.testing.assert_allclose(mrml_io.mapPointsLps(node, points), expected, atol=TOLERANCE_MM, rtol=0)

    # The resampled output lands on the fixed grid.
    resampled = mrml_io.importVolume(volumePath, scene, name="resampled")
    np.testing.assert_allclose(mrml_io.volumeIjkToRas(resampled), mrml_io.volumeIjkToRas(fixed), atol=1e-4)
    assert resampled.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()

    # The moving volume was already under the output transform: it stays there (no double application).
    assert mrml_io.placeUnderTransform(moving, node) == []
    assert moving.GetParentTransformNode().GetID() == node.GetID()


def test_affine_cli_bad_input_gives_one_error_line(tmp_path: Path, mrml_io, corelib) -> None:
    command = corelib.command.affineCommand(
        sys.executable, tmp_path / "missing_fixed.nrrd", tmp_path / "missing_moving.nrrd", tmp_path / "t.h5",
        device="cpu",
    )
    result, events = _run(corelib, command, tmp_path)
    assert result.returncode == corelib.progress.EXIT_BAD_INPUT
    assert not result.succeeded and not result.cancelled
    assert result.error and "fixed image not found" in result.error
    assert "bad input" in result.summary()
    assert not (tmp_path / "t.h5").exists()

