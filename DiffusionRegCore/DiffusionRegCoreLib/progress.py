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
        return text[len("error:") :].strip()
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


@dataclass(frozen=True)
class OverallStatus:
    """Where a whole run stands: ``fraction`` 0..1 over all stages, times in seconds."""

    fraction: float
    stage: str
    message: str
    elapsedSeconds: float
    remainingSeconds: float | None  # None until enough of the run is done to estimate

    def text(self) -> str:
        """One progress-bar label, e.g. ``"affine: step 4/16 - 0:12 elapsed, about 0:30 left"``."""
        label = f"{self.stage}: {self.message}" if self.message and self.message not in ("started", "done") else self.stage
        timing = f"{formatSeconds(self.elapsedSeconds)} elapsed"
        if self.remainingSeconds is not None:
            timing += f", about {formatSeconds(self.remainingSeconds)} left"
        return f"{label} - {timing}"


def formatSeconds(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour)."""
    whole = max(int(round(seconds)), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class OverallProgress:
    """One bar over all the stages of a run instead of one that restarts per stage.

    ``weights`` lists the backend's stages in the order they run, with the share of the run's
    time each usually takes (normalised here). Reaching a stage counts every earlier one as
    done (optional stages that were skipped included); a stage that is not listed moves the
    text, not the bar. The remaining time is extrapolated from the elapsed time once
    :data:`MIN_FRACTION_FOR_ESTIMATE` of the run is done.
    """

    MIN_FRACTION_FOR_ESTIMATE = 0.05

    def __init__(self, weights: dict[str, float], clock=None) -> None:
        import time

        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError("stage weights must add up to more than 0")
        self._order = list(weights)
        self._weights = {stage: float(w) / total for stage, w in weights.items()}
        self._clock = clock or time.monotonic
        self._start = self._clock()
        self._done = 0.0  # share of the stages before the current one
        self._index = -1
        self.fraction = 0.0

    def update(self, event: ProgressEvent) -> OverallStatus:
        if event.stage in self._weights:
            index = self._order.index(event.stage)
            if index > self._index:
                self._index = index
                self._done = sum(self._weights[s] for s in self._order[:index])
            if index == self._index:
                # Never go backwards (a stage may be reported again, e.g. by a second direction).
                self.fraction = max(self.fraction, min(self._done + self._weights[event.stage] * event.fraction, 1.0))
        elapsed = self._clock() - self._start
        remaining = None
        if self.fraction >= self.MIN_FRACTION_FOR_ESTIMATE:
            remaining = elapsed * (1.0 - self.fraction) / self.fraction
        return OverallStatus(self.fraction, event.stage, event.message, elapsed, remaining)
