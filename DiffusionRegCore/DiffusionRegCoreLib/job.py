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
from dataclasses import dataclass, field, replace
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
    #: Prepended to the stage of each progress event, so a job run as one step of a chain keeps
    #: its stages apart from the next step's (both backends report e.g. "read").
    stagePrefix: str = ""
    #: A chained run: the next job, prepared from this job's imported outputs once it completed
    #: (None: this is the last step). Runners run it at once; its outcome is the chain's.
    then: Callable[[Any], PreparedJob | None] | None = None


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


def stageWeightsOfStep(weights: Mapping[str, float], prefix: str, share: float) -> dict[str, float]:
    """The weights of one step of a chained run: stages renamed ``prefix + stage``, summing to ``share``.

    A chain's first job carries the weights of all its steps (each step's from this function,
    in the order they run), so one progress bar covers the whole chain.
    """
    total = float(sum(weights.values()))
    if total <= 0 or share <= 0:
        raise ValueError("stage weights and the step's share must be more than 0")
    return {f"{prefix}{stage}": share * float(weight) / total for stage, weight in weights.items()}


def prefixedProgress(onProgress: Callable[[ProgressEvent], None] | None, prefix: str) -> Callable[[ProgressEvent], None] | None:
    """``onProgress`` seeing each event's stage as ``prefix + stage`` (see :attr:`PreparedJob.stagePrefix`)."""
    if onProgress is None or not prefix:
        return onProgress
    return lambda event: onProgress(replace(event, stage=f"{prefix}{event.stage}"))


def nextJob(job: PreparedJob, outcome: JobOutcome, log: Callable[[str], None]) -> tuple[PreparedJob | None, JobOutcome]:
    """After ``job`` ended with ``outcome``: ``(the chain's next job, outcome)``; ``(None, outcome)``
    when the chain ends here. A next step that cannot be prepared fails the chain with its reason."""
    if outcome.state != "completed" or job.then is None:
        return None, outcome
    try:
        following = job.then(outcome.outputs)
    except Exception as error:  # reported to the user like a failed run
        failed = JobOutcome("failed", outcome.outputs, f"could not start the next step: {error}", outcome.processResult)
        log(failed.error)
        return None, failed
    return following, outcome


def runJob(
    job: PreparedJob,
    processFactory: ProcessFactory = BackendProcess,
    timeout: float | None = None,
    keepTemporaryFiles: bool = False,
    onProgress: Callable[[ProgressEvent], None] | None = None,
    onLog: Callable[[str], None] | None = None,
    idle: Callable[[], None] | None = None,
) -> JobOutcome:
    """Run ``job`` (and the jobs chained after it) to the end and return the last outcome.

    Blocking; ``idle`` runs between polls. A step running past ``timeout`` seconds is cancelled
    and the run ends as ``cancelled``.
    """
    log = onLog or (lambda text: None)
    while True:
        outcome = _runOne(job, processFactory, timeout, keepTemporaryFiles, onProgress, log, idle)
        job, outcome = nextJob(job, outcome, log)
        if job is None:
            return outcome


def _runOne(job, processFactory, timeout, keepTemporaryFiles, onProgress, log, idle) -> JobOutcome:
    for note in job.notes:
        log(note)
    process = processFactory(
        job.command,
        env=job.env,
        cwd=str(job.workFolder.path),
        onProgress=prefixedProgress(onProgress, job.stagePrefix),
        onLog=lambda line, stream: log(line),
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
