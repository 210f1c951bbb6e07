"""Event handlers of the training engine (MONAI's handler pattern, without ignite).

The engine calls every handler at four events: ``started`` (after a resume, before the first
step), ``iteration_completed`` (after each optimisation step), ``validated`` (with the metrics) and
``completed`` (the run ends: all steps done or time up). Handlers run on rank 0 only and must not
enter collectives. A training can pass its own (e.g. sample images every N steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffusionreg.progress import Progress

from .checkpoint import TrainingState

HISTORY_NAME = "history.jsonl"


class Handler:
    """Base: every event does nothing."""

    def started(self, state: TrainingState) -> None:
        pass

    def iteration_completed(self, state: TrainingState, lr: float) -> None:
        pass

    def validated(self, state: TrainingState, metrics: dict) -> None:
        pass

    def completed(self, state: TrainingState) -> None:
        pass


class HistoryWriter(Handler):
    """Appends JSON lines to ``history.jsonl``: the loss every ``every`` steps (and the first), and
    ``{"validation": metrics}`` after each validation. A resumed run appends to the same file."""

    def __init__(self, out_dir: Path, every: int) -> None:
        self.path = Path(out_dir) / HISTORY_NAME
        self.every = every

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def iteration_completed(self, state: TrainingState, lr: float) -> None:
        if state.step == 1 or (self.every and state.step % self.every == 0):
            self._write(
                {
                    "step": state.step,
                    "loss": state.loss,
                    "loss_avg": state.loss_avg,
                    "lr": lr,
                    **state.stats,
                    "elapsed_s": round(state.elapsed_s, 1),
                }
            )

    def validated(self, state: TrainingState, metrics: dict) -> None:
        self._write({"validation": metrics})


class ProgressReporter(Handler):
    """One :class:`~diffusionreg.progress.Progress` stage over the run's steps (tqdm bar, JSON lines
    for Slicer, or nothing); JSON lines at most every ``json_seconds`` so fast steps do not flood
    Slicer's log (tqdm throttles itself). Validation results go to the log."""

    def __init__(self, progress: Progress, stage_name: str, total_steps: int, json_seconds: float = 1.0) -> None:
        self.progress = progress
        self.stage_name = stage_name
        self.total = total_steps
        self.min_seconds = json_seconds if progress.mode == "json" else 0.0
        self._stage = None
        self._reported = 0
        self._last = 0.0

    def started(self, state: TrainingState) -> None:
        self._stage = self.progress.stage(self.stage_name, total=self.total).__enter__()
        self._reported = 0
        if state.step:
            self._report(state, f"resumed at step {state.step}")

    def _report(self, state: TrainingState, message: str) -> None:
        self._stage.update(state.step - self._reported, message)
        self._reported = state.step
        self._last = time.monotonic()

    def iteration_completed(self, state: TrainingState, lr: float) -> None:
        if state.step >= self.total or time.monotonic() - self._last >= self.min_seconds:
            self._report(state, f"step {state.step}/{self.total} loss {state.loss_avg:.4g} lr {lr:.3g}")

    def validated(self, state: TrainingState, metrics: dict) -> None:
        self.progress.log("validation " + json.dumps(metrics))

    def completed(self, state: TrainingState) -> None:
        if state.step > self._reported:
            self._report(state, f"step {state.step}/{self.total}")
        self._stage.__exit__(None, None, None)
        self._stage = None
