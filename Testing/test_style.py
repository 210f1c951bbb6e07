"""Style gate: one format and one lint configuration (``[tool.ruff]`` in pyproject.toml) for the tree.

Fix a failure with ``.venv/bin/ruff format . && .venv/bin/ruff check --fix .`` from the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; it is part of the test extra (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize(
    "arguments",
    [["check", "--output-format", "concise", "."], ["format", "--check", "."]],
    ids=["lint", "format"],
)
def test_ruff(arguments: list[str]) -> None:
    result = subprocess.run([*_ruff(), *arguments], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"ruff {' '.join(arguments)} found problems:\n{result.stdout}{result.stderr}"
