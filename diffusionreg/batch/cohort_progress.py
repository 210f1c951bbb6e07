"""Rank 0's progress over the whole cohort, counted from every rank's results file.

Ranks append one line per finished case to their own file in the shared output folder; a thread
on rank 0 counts the complete lines written since the run started, so the bar moves whichever
rank finished the case, without any collective call between cases.
"""

from __future__ import annotations

import threading
from pathlib import Path

from diffusionreg.progress import Stage

#: Seconds between two looks at the results files.
POLL_SECONDS = 0.5


class CohortProgress:
    """Counts new lines of ``files`` (from their sizes now) into ``stage`` until :meth:`stop`."""

    def __init__(self, stage: Stage, files: list[Path]) -> None:
        self._stage = stage
        self._offsets = {path: (path.stat().st_size if path.exists() else 0) for path in files}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="batch-progress", daemon=True)
        self.finished = 0

    def start(self) -> CohortProgress:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching after one last count."""
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            stopping = self._stop.wait(POLL_SECONDS)
            new = sum(self._count(path) for path in self._offsets)
            if new:
                self.finished += new
                self._stage.update(new, message=f"{self.finished} finished in this run")
            if stopping:
                return

    def _count(self, path: Path) -> int:
        """Complete lines appended to ``path`` since the last look."""
        if not path.exists():
            return 0
        with path.open("rb") as handle:
            handle.seek(self._offsets[path])
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offsets[path] += len(complete)
        return complete.count(b"\n")
