"""Run the backend in a background process: progress, log, cancel, temporary folder.

:class:`BackendProcess` starts a command with :mod:`subprocess`; two reader threads push its
stdout and stderr lines into a queue. Nothing is called from those threads: the owner calls
:meth:`BackendProcess.poll` from its own (GUI) thread, e.g. from a ``qt.QTimer``, and the
callbacks run there. :meth:`BackendProcess.wait` does the same in a loop for scripts.

Cancel ends the whole process tree. ``PythonSlicer`` is a launcher around the real Python, so
killing only the direct child would leave the worker running. On POSIX the worker is started
in its own session and the group gets SIGTERM (the backend turns it into a clean exit 130),
then SIGKILL after a grace period; on Windows ``taskkill /T /F`` ends the tree. Descendants
that left the group are found with ``psutil`` when it is installed, else from ``/proc`` (Linux),
and ended too.

The run ends when the **direct child** exits: a descendant that escaped (it keeps our stdout
pipe open, so end-of-file never comes) cannot keep the task "running" after its parent is
gone; output still queued is handled for :data:`DRAIN_SECONDS`, then the task finishes.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .progress import (
    EXIT_CANCELLED,
    EXIT_OK,
    ProgressEvent,
    describeExitCode,
    parseErrorLine,
    parseProgressLine,
)

#: Seconds between SIGTERM and SIGKILL when cancelling.
CANCEL_GRACE_SECONDS = 3.0
#: Seconds to keep reading output after the direct child exited (a descendant holding the pipe).
DRAIN_SECONDS = 1.0
#: Log lines kept in memory (older ones are dropped; the widget keeps its own copy).
MAX_LOG_LINES = 20000

ProgressCallback = Callable[[ProgressEvent], None]
LogCallback = Callable[[str, str], None]  # (line, stream) with stream "stdout" or "stderr"
FinishedCallback = Callable[["BackendProcess"], None]


@dataclass
class ProcessResult:
    """What a finished process left: exit code, whether it was cancelled, its error line, log."""

    returncode: int | None
    cancelled: bool
    error: str | None
    log: list[str] = field(default_factory=list)
    elapsedSeconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.returncode == EXIT_OK and not self.cancelled

    def summary(self) -> str:
        if self.cancelled:
            return "cancelled by the user"
        if self.succeeded:
            return f"finished in {self.elapsedSeconds:.1f} s"
        detail = self.error or (self.log[-1] if self.log else "")
        return f"{describeExitCode(self.returncode)}: {detail}" if detail else describeExitCode(self.returncode)


class BackendProcess:
    """One run of a worker command, driven by :meth:`poll` from the owner's thread."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        onProgress: ProgressCallback | None = None,
        onLog: LogCallback | None = None,
        onFinished: FinishedCallback | None = None,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd else None
        self.onProgress = onProgress
        self.onLog = onLog
        self.onFinished = onFinished
        self.log: list[str] = []
        self.lastProgress: ProgressEvent | None = None
        self.error: str | None = None
        self.cancelled = False
        self._popen: subprocess.Popen | None = None
        self._queue: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._openStreams = 0
        self._finished = False
        self._startTime = 0.0
        self._endTime = 0.0
        self._childExitTime: float | None = None

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> BackendProcess:
        """Start the process (raises OSError when the executable cannot be started)."""
        if self._popen is not None:
            raise RuntimeError("process already started")
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0
            )
        else:
            kwargs["start_new_session"] = True
        self._startTime = time.monotonic()
        self._popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **kwargs,
        )
        for name, stream in (("stdout", self._popen.stdout), ("stderr", self._popen.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True, name=f"DiffusionReg-{name}")
            self._openStreams += 1
            thread.start()
            self._readers.append(thread)
        return self

    def _read(self, name: str, stream) -> None:
        try:
            for line in stream:
                self._queue.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put((name, None))

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        """True until the process has exited *and* all its output has been handled."""
        return self._popen is not None and not self._finished

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else None

    @property
    def elapsedSeconds(self) -> float:
        if not self._startTime:
            return 0.0
        return (self._endTime or time.monotonic()) - self._startTime

    def result(self) -> ProcessResult:
        return ProcessResult(self.returncode, self.cancelled, self.error, list(self.log), self.elapsedSeconds)

    # --- pumping ----------------------------------------------------------------------
    def poll(self, maxLines: int = 1000) -> bool:
        """Handle queued output (callbacks run here); return True while still running."""
        if self._popen is None or self._finished:
            return False
        handled = 0
        while handled < maxLines:
            try:
                stream, line = self._queue.get_nowait()
            except queue.Empty:
                break
            handled += 1
            if line is None:
                self._openStreams -= 1
                continue
            self._handleLine(stream, line)
        if self._popen.poll() is not None:
            now = time.monotonic()
            if self._childExitTime is None:
                self._childExitTime = now
            # Streams closed, or the child is gone and something else still holds its pipe.
            if self._openStreams <= 0 or now - self._childExitTime >= DRAIN_SECONDS:
                self._finish()
                return False
        return True

    def _handleLine(self, stream: str, line: str) -> None:
        if stream == "stdout":
            event = parseProgressLine(line)
            if event is not None:
                self.lastProgress = event
                if self.onProgress:
                    self.onProgress(event)
                return
        error = parseErrorLine(line)
        if error is not None:
            self.error = error
        self.log.append(line)
        if len(self.log) > MAX_LOG_LINES:
            del self.log[: len(self.log) - MAX_LOG_LINES]
        if self.onLog:
            self.onLog(line, stream)

    def _finish(self) -> None:
        self._finished = True
        self._endTime = time.monotonic()
        if self._popen is not None and self._popen.returncode == EXIT_CANCELLED:
            self.cancelled = True
        for thread in self._readers:
            thread.join(timeout=0.1 if self._openStreams > 0 else 1.0)  # daemon readers of an escaped pipe stay behind
        if self.onFinished:
            self.onFinished(self)

    def wait(self, timeout: float | None = None, interval: float = 0.05, idle: Callable[[], None] | None = None) -> ProcessResult:
        """Block until the process ends (polling); ``idle`` runs between polls (e.g. processEvents).

        Raises TimeoutError (after cancelling the process) when ``timeout`` seconds pass; the
        cancel itself is bounded by the SIGKILL grace and :data:`DRAIN_SECONDS`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(grace=min(CANCEL_GRACE_SECONDS, 1.0))
                while self.poll():
                    time.sleep(interval)
                raise TimeoutError(f"{self.command[0]} did not finish within {timeout} s")
            if idle is not None:
                idle()
            time.sleep(interval)
        return self.result()

    # --- cancel -----------------------------------------------------------------------
    def cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """End the process and all its descendants; output stays readable until poll ends.

        Returns at once; the hard kill after ``grace`` seconds happens in a helper thread.
        """
        if self._popen is None or self._popen.poll() is not None:
            return
        self.cancelled = True
        descendants = _descendants(self._popen.pid)
        if os.name == "nt":
            _killTreeWindows(self._popen.pid)
            _killPids(descendants, hard=True)
            return
        try:
            os.killpg(self._popen.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        _killPids(descendants, hard=False)
        threading.Thread(target=self._hardKill, args=(grace, descendants), daemon=True).start()

    def _hardKill(self, grace: float, descendants: list[int]) -> None:
        try:
            self._popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self._popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        _killPids(descendants + _descendants(self._popen.pid), hard=True)


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants: psutil when installed, else ``/proc`` (Linux), else none."""
    try:
        import psutil
    except ImportError:
        return _procDescendants(pid)
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


def _procDescendants(pid: int, procRoot: str = "/proc") -> list[int]:
    """Descendants of ``pid`` from the parent ids in ``/proc/N/stat`` (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(procRoot)
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(procRoot, entry, "stat"), encoding="utf-8", errors="replace") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _killPids(pids: list[int], hard: bool) -> None:
    for pid in pids:
        try:
            if os.name == "nt" or hard:
                os.kill(pid, signal.SIGTERM if os.name == "nt" else signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass


def _killTreeWindows(pid: int) -> None:
    try:
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
        )
    except OSError:
        pass


class WorkFolder:
    """A temporary folder for one run, removed afterwards unless the user keeps it."""

    def __init__(self, parent: str | os.PathLike | None = None, prefix: str = "DiffusionReg-") -> None:
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent) if parent else None))

    def file(self, name: str) -> Path:
        return self.path / name

    def cleanup(self, keep: bool = False) -> bool:
        """Remove the folder (unless ``keep``); return True when it is gone."""
        if keep:
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return not self.path.exists()

    def __enter__(self) -> WorkFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()
