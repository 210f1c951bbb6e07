"""One backend run as data: options -> prepared job -> process -> imported results.

The pattern of SlicerNNUnet's ``Parameter`` / ``SegmentationLogic``, shared by every DiffusionReg
module:

- a module describes one run with an **options dataclass** derived from :class:`JobOptions`:
  ``isValid() -> (ok, reason)`` says in one sentence why it cannot run (the panel shows that
  text next to its Run button), ``asArgList(files)`` gives the backend arguments;
- the module's ``prepare...Job`` function exports the input nodes into a :class:`WorkFolder`,
  builds the command line and returns a :class:`PreparedJob` holding a closure that loads the
  outputs into the scene;
- a **runner** executes it: :func:`runJob` blocks (scripts, tests), ``DiffusionRegCore.BackendTask``
  drives the same job from a Qt timer. Both take an injectable ``processFactory`` (default
  :class:`BackendProcess`), so tests can run a fake backend, and both end through
  :func:`finishJob`, so success, failure and cancel are decided in one place.

No Qt here; the MRML tier runs these functions with slicer-core exactly as the modules do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .process import BackendProcess, ProcessResult, WorkFolder
from .progress import ProgressEvent

#: Job states, in the order a run goes through them.
STATES = ("running", "importing", "completed", "cancelled", "failed")

ProcessFactory = Callable[..., Any]  # (command, env=, cwd=, onProgress=, onLog=, onFinished=) -> BackendProcess-like


class JobOptions:
    """Base of a module's options dataclass: the whole description of one backend run."""

    #: The backend subcommand (``diffusionreg <subcommand> ...``) and the model task it uses.
    subcommand: tuple[str, ...] = ()
    #: Share of the run's time each progress stage usually takes, in the order they run.
    stageWeights: Mapping[str, float] = {}

    def isValid(self) -> tuple[bool, str]:
        """``(True, "")`` when the run can start, else ``(False, reason)`` for the user."""
        raise NotImplementedError

    def asArgList(self, files: Mapping[str, Path]) -> list[str]:
        """Backend arguments (after the subcommand) for the exported input/output ``files``."""
        raise NotImplementedError


@dataclass
class PreparedJob:
    """Everything needed to run one job and load its results."""

    name: str
    command: list[str]
    workFolder: WorkFolder
    importResults: Callable[[ProcessResult], Any]
    stageWeights: Mapping[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # said in the log before the run starts
    env: dict[str, str] | None = None


@dataclass
class JobOutcome:
    """How a job ended: ``state`` completed / cancelled / failed, the imported ``outputs``."""

    state: str
    outputs: Any = None
    error: str | None = None
    processResult: ProcessResult | None = None


def finishJob(
    job: PreparedJob, result: ProcessResult, keepTemporaryFiles: bool = False, log: Callable[[str], None] | None = None
) -> JobOutcome:
    """Decide the outcome of a finished process, import the outputs on success, clean up."""
    log = log or (lambda text: None)
    if result.cancelled:
        outcome = JobOutcome("cancelled", processResult=result)
        log("Cancelled.")
    elif not result.succeeded:
        outcome = JobOutcome("failed", error=result.summary(), processResult=result)
        log(f"Failed: {outcome.error}")
    else:
        try:
            outcome = JobOutcome("completed", job.importResults(result), processResult=result)
            log(f"Completed in {result.elapsedSeconds:.1f} s.")
        except Exception as error:
            outcome = JobOutcome("failed", error=f"loading the results failed: {error}", processResult=result)
            log(outcome.error)
    if keepTemporaryFiles:
        log(f"Temporary files kept in {job.workFolder.path}")
    else:
        job.workFolder.cleanup()
    return outcome


def runJob(
    job: PreparedJob,
    processFactory: ProcessFactory = BackendProcess,
    timeout: float | None = None,
    keepTemporaryFiles: bool = False,
    onProgress: Callable[[ProgressEvent], None] | None = None,
    onLog: Callable[[str], None] | None = None,
    idle: Callable[[], None] | None = None,
) -> JobOutcome:
    """Run ``job`` to the end (blocking; ``idle`` runs between polls) and return its outcome.

    A run past ``timeout`` seconds is cancelled and ends as ``cancelled``.
    """
    log = onLog or (lambda text: None)
    for note in job.notes:
        log(note)
    process = processFactory(
        job.command, env=job.env, cwd=str(job.workFolder.path), onProgress=onProgress, onLog=lambda line, stream: log(line)
    )
    try:
        process.start()
    except OSError as error:
        job.workFolder.cleanup()
        raise RuntimeError(f"could not start {job.command[0]}: {error}") from error
    try:
        result = process.wait(timeout=timeout, idle=idle)
    except TimeoutError:
        result = process.result()
    return finishJob(job, result, keepTemporaryFiles, log)
