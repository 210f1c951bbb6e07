"""Shared pytest fixtures: where the real data lives, small synthetic images, a CLI runner."""

from __future__ import annotations

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
