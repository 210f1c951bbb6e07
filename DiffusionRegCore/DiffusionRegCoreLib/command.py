"""Command lines and environment for the backend worker (``PythonSlicer -m diffusionreg ...``).

The worker is always a separate process: torch is never imported into Slicer's GUI process,
GPU memory is returned when it exits, Cancel can kill it, and a crash cannot take Slicer down.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .paths import backendModule

_vocabulary = backendModule("vocabulary")
MODALITIES = _vocabulary.MODALITIES
INITIALIZATIONS = _vocabulary.INITIALIZATIONS


class PythonSlicerNotFound(FileNotFoundError):
    """Slicer's ``PythonSlicer`` launcher is missing: the worker cannot be started."""


def pythonExecutable(slicerHome: str | os.PathLike | None = None, inSlicer: bool = False) -> str:
    """The Python that runs the worker.

    In Slicer (``inSlicer``) this is the ``PythonSlicer`` launcher next to the application
    (``<slicerHome>/bin``) or on PATH; it sets up Slicer's Python environment. When it is not
    found, :class:`PythonSlicerNotFound` says so: ``sys.executable`` is the Slicer application
    itself there, and running it with ``-m diffusionreg`` would start a second Slicer.
    Outside Slicer (tests, scripts) it is the current interpreter.
    """
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    if slicerHome:
        for name in names:
            candidate = Path(slicerHome) / "bin" / name
            if candidate.is_file():
                return str(candidate)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if inSlicer:
        where = f"{Path(slicerHome) / 'bin'} or on PATH" if slicerHome else "on PATH"
        raise PythonSlicerNotFound(
            f"PythonSlicer was not found ({where}); the DiffusionReg backend runs in it. "
            "Reinstall 3D Slicer or repair its installation."
        )
    return sys.executable


def backendEnvironment(
    backendRoot: str | os.PathLike,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for the worker: ``backendRoot`` first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ if base is None else base)
    root = str(Path(backendRoot))
    existing = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root] + existing)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    # Keep tqdm and friends quiet; progress comes as JSON lines.
    env.setdefault("TQDM_DISABLE", "1")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def backendCommand(python: str, subcommand: Sequence[str], arguments: Sequence[str] = ()) -> list[str]:
    """``python -m diffusionreg <subcommand...> <arguments...> --progress json``."""
    return [str(python), "-m", "diffusionreg", *[str(s) for s in subcommand], *[str(a) for a in arguments], "--progress", "json"]


def checkDevice(device: str) -> str:
    """Validate a device name the backend accepts: auto, cpu, cuda, cuda:N, mps."""
    text = str(device).strip()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def quoteCommand(command: Sequence[str]) -> str:
    """A copy-pasteable rendering of ``command`` for the log."""
    if os.name == "nt":
        import subprocess

        return subprocess.list2cmdline([str(c) for c in command])
    import shlex

    return " ".join(shlex.quote(str(c)) for c in command)
