"""The backend's machine-readable output, parsed without Qt.

With ``--progress json`` the backend prints one JSON object per line on stdout,
``{"stage": str, "fraction": float 0..1, "message": str}``. Every other stdout line is
human-readable log text. On failure it prints one line ``error: ...`` on stderr and exits with
2 (bad input), 1 (other failure) or 130 (cancelled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .paths import backendModule

_vocabulary = backendModule("vocabulary")
EXIT_OK, EXIT_FAILURE = _vocabulary.EXIT_OK, _vocabulary.EXIT_FAILURE
EXIT_BAD_INPUT, EXIT_CANCELLED = _vocabulary.EXIT_BAD_INPUT, _vocabulary.EXIT_CANCELLED


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: ``fraction`` of ``stage`` is done (0..1)."""

    stage: str
    fraction: float
    message: str = ""

    def text(self) -> str:
        """Short label for a progress bar, e.g. ``"reverse diffusion 40%: step 4/10"``."""
        label = f"{self.stage} {int(round(self.fraction * 100))}%"
        return f"{label}: {self.message}" if self.message else label


def parseProgressLine(line: str) -> ProgressEvent | None:
    """Return the progress event in ``line``, or None when the line is ordinary log text.

    A progress line is a JSON object with a string ``stage`` and a numeric ``fraction``
    (clamped to 0..1); ``message`` is optional.
    """
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    stage = record.get("stage")
    fraction = record.get("fraction")
    if not isinstance(stage, str) or isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return None
    fraction = min(max(float(fraction), 0.0), 1.0)
    if fraction != fraction:  # NaN
        fraction = 0.0
    message = record.get("message", "")
    return ProgressEvent(stage, fraction, message if isinstance(message, str) else str(message))


def parseErrorLine(line: str) -> str | None:
    """The message of a backend ``error: ...`` line, or None for any other line."""
    text = line.strip()
    if text.lower().startswith("error:"):
        return text[len("error:"):].strip()
    return None


def describeExitCode(returncode: int | None) -> str:
    """A short human explanation of the backend's exit code."""
    if returncode is None:
        return "still running"
    if returncode == EXIT_OK:
        return "finished"
    if returncode == EXIT_BAD_INPUT:
        return "bad input"
    if returncode == EXIT_CANCELLED:
        return "cancelled"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"failed (exit code {returncode})"

