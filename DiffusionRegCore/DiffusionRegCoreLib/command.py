"""Command lines and environment for the backend worker (``PythonSlicer -m diffusionreg ...``).

The worker is always a separate process: torch is never imported into Slicer's GUI process,
GPU memory is returned when it exits, Cancel can kill it, and a crash cannot take Slicer down.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .paths import backendModule

_vocabulary = backendModule("vocabulary")
MODALITIES = _vocabulary.MODALITIES
INITIALIZATIONS = _vocabulary.INITIALIZATIONS


def pythonExecutable(slicerHome: str | os.PathLike | None = None) -> str:
    """The Python that runs the worker.

    In Slicer this is the ``PythonSlicer`` launcher (it sets up Slicer's Python environment);
    outside Slicer (tests, scripts) it is the current interpreter.
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
    return [str(python), "-m", "diffusionreg", *[str(s) for s in subcommand], *[str(a) for a in arguments],
            "--progress", "json"]


def affineCommand(
    python: str,
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    outputTransform: str | os.PathLike,
    outputVolume: str | os.PathLike | None = None,
    model: str | None = None,
    modality: str | None = None,
    steps: int | None = None,
    bidirectional: bool = False,
    initialize: str | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> list[str]:
    """The ``diffusionreg affine`` command line (spatial-diffusion affine registration).

    ``steps`` of None or 0 and ``model`` of None or "" keep the backend's defaults.
    Raises ValueError for an unknown modality, initialisation or device.
    """
    arguments: list[str] = ["--fixed", str(fixed), "--moving", str(moving), "--output-transform", str(outputTransform)]
    if outputVolume:
        arguments += ["--output-volume", str(outputVolume)]
    if model:
        arguments += ["--model", str(model)]
    if modality:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
        arguments += ["--modality", modality]
    if steps:
        if int(steps) < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        arguments += ["--steps", str(int(steps))]
    if bidirectional:
        arguments.append("--bidirectional")
    if initialize:
        if initialize not in INITIALIZATIONS:
            raise ValueError(f"unknown initialization {initialize!r}; use one of {', '.join(INITIALIZATIONS)}")
        arguments += ["--initialize", initialize]
    if seed is not None:
        arguments += ["--seed", str(int(seed))]
    if device:
        arguments += ["--device", checkDevice(device)]
    return backendCommand(python, ["affine"], arguments)


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
