"""Shared pytest fixtures: where the real data lives, small synthetic images, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIFFUSIONREG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (or $DIFFUSIONREG_SHARED_DATA).

    Tests that need it skip with a reason when it is absent; CI has it, and there
    DIFFUSIONREG_REQUIRE_DATA=1 turns the skip into a failure.
    """
    if not SHARED_DATA.is_dir():
        if os.environ.get("DIFFUSIONREG_REQUIRE_DATA"):
            pytest.fail(f"shared data folder {SHARED_DATA} is missing but DIFFUSIONREG_REQUIRE_DATA is set")
        pytest.skip(f"real data not found at {SHARED_DATA} (set DIFFUSIONREG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(autouse=True, scope="session")
def _limit_threads() -> None:
    """Two cores are shared with other work; keep torch from oversubscribing them."""
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass


def run_cli(*args: str, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m diffusionreg ARGS`` in a subprocess and capture its output."""
    completed = subprocess.run(
        [sys.executable, "-m", "diffusionreg", *args],
        capture_output=True,
        encoding="utf-8",  # the CLI writes UTF-8 whatever the test machine's locale
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"diffusionreg {' '.join(args)} failed ({completed.returncode}):\n{completed.stderr}")
    return completed


@pytest.fixture
def cli():
    return run_cli


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A rotation matrix about a random axis by up to ``max_degrees``."""
    from diffusionreg.spaces import rotation_about_axis

    return rotation_about_axis(rng.normal(size=3), rng.uniform(-max_degrees, max_degrees))


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """A Models.json (pass it as $DIFFUSIONREG_MODELS) registering two tiny random models with
    their sha256: ``tiny-affine`` (affine, mri) and ``tiny-sitreg`` (deformable, any). For tests
    of files, errors and cancellation, not accuracy; they load by name like shipped models."""
    torch = pytest.importorskip("torch")
    from tiny_models import tiny_affine_config, write_affine_model

    from diffusionreg.deformable.config import DeformableConfig, SITRegConfig
    from diffusionreg.deformable.register import build_network, export_model
    from diffusionreg.registry import sha256_file

    root = tmp_path_factory.mktemp("tiny_models")
    write_affine_model(tiny_affine_config("tiny-affine"), root / "affine")
    sitreg = DeformableConfig(
        name="tiny-sitreg",
        method="sitreg",
        grid_shape=(16, 16, 16),
        spacing_mm=12.0,
        sitreg=SITRegConfig(feature_channels=(4, 8, 8), head_channels=(4, 8, 8)),
    )
    torch.manual_seed(0)
    export_model(build_network(sitreg), sitreg, root / "sitreg")
    entries = [
        {
            "name": "tiny-affine",
            "task": "affine",
            "modality": "mri",
            "file": "affine/model.safetensors",
            "sha256": sha256_file(root / "affine" / "model.safetensors"),
            "config": "affine/config.json",
        },
        {
            "name": "tiny-sitreg",
            "task": "deformable",
            "modality": "any",
            "file": "sitreg/model.safetensors",
            "sha256": sha256_file(root / "sitreg" / "model.safetensors"),
            "config": "sitreg/config.json",
        },
    ]
    (root / "Models.json").write_text(json.dumps({"models": entries}, indent=2), encoding="utf-8")
    return root / "Models.json"
