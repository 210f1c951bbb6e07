"""One process's share of a cohort: cases streamed through loaded models, inputs read ahead.

Models are loaded once per process and kept by (task, model options): every case naming the same
model reuses it. While a case runs on the main thread, the inputs of the next
``READ_AHEAD_CASES`` cases are read on one worker thread (bounded, so memory stays a few cases).
A failing case -- bad input, out of memory, a bug -- is recorded with its error line and the
cohort goes on; a cancel (Ctrl-C, SIGTERM) stops the run, the case in flight writing nothing.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from diffusionreg import cancellation
from diffusionreg.errors import CancelledError, InputError, ParameterError
from diffusionreg.progress import Progress

from .jobs import Case
from .results import ResultLog, output_digests
from .tasks import STEPS

#: Cases whose inputs are read ahead of the one running (each holds its images in memory).
READ_AHEAD_CASES = 2


class ModelCache:
    """Loaded models of one process, by (task, the options that pick the model)."""

    def __init__(self, device) -> None:
        self.device = device
        self._models: dict[tuple, object] = {}

    def get(self, task: str, args: argparse.Namespace):
        steps = STEPS[task]
        key = (task, *steps.model_key(args))
        if key not in self._models:
            self._models[key] = steps.load(args, self.device)
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)


def error_line(error: BaseException, args: argparse.Namespace | None) -> str:
    """One line for a failed case, worded as the single command words it."""
    if isinstance(error, ParameterError):
        flags = getattr(args, "parameter_flags", {}) or {}
        return f"{flags.get(error.parameter, '--' + error.parameter.replace('_', '-'))} {error.problem}"
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # host or torch.cuda
        return "out of memory; use a smaller image or a machine with more memory"
    text = " ".join(str(error).split())
    if isinstance(error, OSError):
        return text
    return f"internal error ({type(error).__name__}: {text[:300]})"


def run_cases(
    cases: Sequence[Case],
    parse: Callable[[Case], argparse.Namespace],
    out: Path,
    log: ResultLog,
    models: ModelCache,
    on_failure: Callable[[Case, str], None],
) -> None:
    """Run ``cases`` in order, one record each in ``log``; ``parse`` gives a case's options."""
    quiet = Progress("none", quiet=True)  # the cohort has one bar; a case's own lines are in its record
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-read")
    upcoming = iter(cases)
    queued: deque[tuple[Case, argparse.Namespace | None, Future | BaseException | None]] = deque()

    def queue_next() -> None:
        case = next(upcoming, None)
        if case is None:
            return
        try:
            args = parse(case)
        except InputError as error:  # checked up front, so only a changed environment gets here
            queued.append((case, None, error))
            return
        read = STEPS[case.task].read
        queued.append((case, args, pool.submit(read, args) if read is not None else None))

    try:
        for _ in range(READ_AHEAD_CASES + 1):
            queue_next()
        while queued:
            case, args, pending = queued.popleft()
            queue_next()
            _run_case(case, args, pending, out, log, models, quiet, on_failure)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_case(
    case: Case,
    args,
    pending,
    out: Path,
    log: ResultLog,
    models: ModelCache,
    quiet: Progress,
    on_failure: Callable[[Case, str], None],
) -> None:
    start = time.perf_counter()
    try:
        if isinstance(pending, BaseException):
            raise pending
        (out / case.id).mkdir(exist_ok=True)
        inputs = pending.result() if pending is not None else None
        model = models.get(case.task, args) if STEPS[case.task].load is not None else None
        metrics = STEPS[case.task].run(args, inputs, model, quiet)
        # Committed: the command settled the cancellation state (a signal is kept, not raised), so
        # the record of a committed case is written whole before a cancel stops the run at rearm.
        written = [Path(getattr(args, a)) for a in vars(args) if a.startswith("output_") and getattr(args, a)]
        log.append(case, "ok", error=None, metrics=metrics, seconds=time.perf_counter() - start,
                   outputs=output_digests(written))  # fmt: skip
    except (KeyboardInterrupt, CancelledError):
        raise
    except Exception as error:  # every failure of a case (MemoryError included) is recorded; the cohort goes on
        line = error_line(error, args)
        if type(error).__name__ == "OutOfMemoryError":  # give the GPU memory back before the next case
            import torch

            torch.cuda.empty_cache()
        with cancellation.held():  # the record is written whole; a cancel takes effect after it
            log.append(case, "failed", error=line, metrics={}, seconds=time.perf_counter() - start, outputs={})
        on_failure(case, line)
    finally:
        # Arm cancellation again for the cases after this one (a committed case settled it); a
        # cancel that came after the commit stops the run here.
        cancellation.rearm()
