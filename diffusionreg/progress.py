"""Progress for long work: tqdm on a terminal, JSON lines for Slicer, or nothing.

JSON mode prints one object per line on stdout, ``{"stage": str, "fraction": float,
"message": str}``, flushed at once; the Slicer process runner turns these into a progress bar
and sends every other line to its log. Cancellation (Ctrl-C or SIGTERM) is
:mod:`diffusionreg.cancellation`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Literal, TextIO

ProgressMode = Literal["tqdm", "json", "none"]


class Stage:
    """One named stage of ``total`` units of work."""

    def __init__(self, progress: Progress, name: str, total: int | None) -> None:
        self._progress = progress
        self.name = name
        self.total = total
        self.done = 0
        self._bar = None
        if progress.mode == "tqdm" and not progress.quiet:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, file=sys.stderr, leave=False, dynamic_ncols=True)
        self._progress._emit(name, 0.0, "started")

    def update(self, units: int = 1, message: str = "") -> None:
        """Advance by ``units``; ``message`` is shown beside the bar or sent in the JSON line."""
        self.done += units
        fraction = min(self.done / self.total, 1.0) if self.total else 0.0
        if self._bar is not None:
            self._bar.update(units)
            if message:
                self._bar.set_postfix_str(message, refresh=False)
        self._progress._emit(self.name, fraction, message)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()
        if exc_info[0] is None:
            self._progress._emit(self.name, 1.0, "done")


class Progress:
    """Reports stages of long work in the chosen ``mode``."""

    def __init__(self, mode: ProgressMode = "tqdm", quiet: bool = False, stream: TextIO | None = None) -> None:
        if mode not in ("tqdm", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._last_emit = 0.0

    def stage(self, name: str, total: int | None = None) -> Stage:
        return Stage(self, name, total)

    def log(self, text: str) -> None:
        """A human-readable line (tables, results); suppressed by ``--quiet``."""
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def _emit(self, stage: str, fraction: float, message: str) -> None:
        if self.mode != "json":
            return
        record = {"stage": stage, "fraction": round(float(fraction), 4), "message": message}
        print(json.dumps(record), file=self.stream, flush=True)
        self._last_emit = time.monotonic()
