"""All the outputs of one command: checked before any work, committed together or not at all.

A command declares its inputs and outputs up front (:class:`OutputSet`). Every output location
is checked before the work starts: a known extension, an existing writable folder, not a folder
itself, not an existing read-only file (unless ``overwrite``), not one of the inputs (resolved
paths, so symlinks and hard links count) and not another output of the same command. Outputs are
then written under temporary names in their own folders and renamed together by
:meth:`OutputSet.commit`; a file that was already there is moved aside first and put back if
anything fails. Leaving the ``with`` block by an exception (bad input, an internal error, a
cancellation) removes every temporary and undoes every rename of this run, so the output
locations are exactly as they were.

The renames run under :func:`diffusionreg.cancellation.held`: a cancel signal lands between two
renames, never between a rename and its record. Before each rename the progress stage
``write`` reports ``renaming FLAG``.
"""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from diffusionreg import cancellation
from diffusionreg.errors import InputError
from diffusionreg.io_atomic import split_suffix

# Seconds to wait before each rename, for tests that cancel in the middle of a commit; unset in use.
PAUSE_BEFORE_RENAME_ENV = "DIFFUSIONREG_TEST_PAUSE_BEFORE_RENAME"


@dataclass
class _Output:
    flag: str
    path: Path
    temporary: Path | None = None
    backup: Path | None = None
    committed: bool = False


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file: equal resolved paths, or the same inode (hard links)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _read_only(path: Path) -> bool:
    """An existing file nobody may write (mode bits, so it holds for root too) or we may not."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    return not (mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) or not os.access(path, os.W_OK)


class OutputSet:
    """The outputs of one command run, written all together or not at all.

    ``inputs`` are ``(flag, path)`` pairs (None paths are skipped); flags name paths in messages.
    ``progress`` is a :class:`~diffusionreg.progress.Progress` for the ``write`` stage.
    """

    def __init__(self, inputs: Iterable[tuple[str, Path | str | None]], *, overwrite: bool = False, progress=None) -> None:
        self._inputs = [(flag, Path(path)) for flag, path in inputs if path is not None]
        self._overwrite = overwrite
        self._progress = progress
        self._outputs: dict[str, _Output] = {}

    @classmethod
    def from_args(cls, args, input_flags: Sequence[str], progress=None) -> OutputSet:
        """The output set of a parsed command line: ``input_flags`` name its input options
        (``--fixed``; repeatable options give lists); ``--overwrite`` comes from ``args``."""
        inputs: list[tuple[str, Path | None]] = []
        for flag in input_flags:
            value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
            for path in value if isinstance(value, list) else [value]:
                inputs.append((flag, path))
        return cls(inputs, overwrite=bool(getattr(args, "overwrite", False)), progress=progress)

    # --- declaring and checking ---------------------------------------------------------------
    def add(self, flag: str, path: Path | str | None, suffixes: Sequence[str]) -> None:
        """Declare an output (None: not requested) and check its location; raise InputError."""
        if path is None:
            return
        path = Path(path)
        if not path.name.lower().endswith(tuple(suffixes)):
            raise InputError(f"{flag} {path}: unsupported extension; use one of {', '.join(suffixes)}")
        folder = path.parent
        if not folder.exists():
            raise InputError(f"{flag} {path}: folder {folder} does not exist")
        if not folder.is_dir():
            raise InputError(f"{flag} {path}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: folder {folder} is not writable")
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder; give a file name")
        for input_flag, input_path in self._inputs:
            if same_file(path, input_path):
                raise InputError(f"output {flag} {path} is also input {input_flag} {input_path}; choose another output path")
        for other in self._outputs.values():
            if same_file(path, other.path):
                raise InputError(f"outputs {other.flag} and {flag} are the same file {path}")
        if path.exists() and _read_only(path) and not self._overwrite:
            raise InputError(f"{flag} {path} exists and is read-only; pass --overwrite to replace it")
        self._outputs[flag] = _Output(flag, path)

    def wants(self, flag: str) -> bool:
        return flag in self._outputs

    def temporary(self, flag: str) -> Path:
        """Where to write output ``flag`` now: a fresh name in its folder, same extension."""
        output = self._outputs[flag]
        if output.temporary is not None:  # written again: the earlier attempt is not kept
            _remove(output.temporary)
        stem, suffix = split_suffix(output.path)
        output.temporary = output.path.with_name(f".{stem}.partial-{uuid.uuid4().hex[:8]}{suffix}")
        return output.temporary

    # --- committing and undoing ---------------------------------------------------------------
    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.discard()

    def commit(self) -> None:
        """Rename every temporary onto its output; on any failure undo all and re-raise."""
        unwritten = [o.flag for o in self._outputs.values() if o.temporary is None or not o.temporary.exists()]
        if unwritten:
            raise RuntimeError(f"outputs {', '.join(unwritten)} were declared but not written")
        pause = float(os.environ.get(PAUSE_BEFORE_RENAME_ENV, "0") or 0)
        stages = self._progress.stage("write", total=len(self._outputs)) if self._progress else nullcontext()
        try:
            with stages as stage:
                for output in self._outputs.values():
                    if stage is not None:
                        stage.update(0, message=f"renaming {output.flag}")
                    if pause:
                        time.sleep(pause)
                    with cancellation.held():
                        if output.path.is_dir() and not output.path.is_symlink():
                            raise IsADirectoryError(f"{output.flag} {output.path} became a folder during the run")
                        if os.path.lexists(output.path):
                            backup = output.path.with_name(f".{output.path.name}.backup-{uuid.uuid4().hex[:8]}")
                            os.replace(output.path, backup)
                            output.backup = backup
                        os.replace(output.temporary, output.path)
                        output.committed = True
                    if stage is not None:
                        stage.update(1, message=f"wrote {output.flag}")
                with cancellation.held():
                    cancellation.settle()  # from here on, the command has succeeded
        except BaseException:
            self.discard()
            raise
        for output in self._outputs.values():
            if output.backup is not None:
                with suppress(OSError):  # committed already: a stale backup is untidy, not an error
                    _remove(output.backup)
                output.backup = None

    def discard(self) -> None:
        """Remove temporaries and undo this run's renames (pre-existing files are put back).

        Best effort, output by output: a step that fails leaves its backup file in place (the
        earlier content is never deleted) and the others are still undone.
        """
        with cancellation.held(discard=True):
            for output in reversed(list(self._outputs.values())):
                with suppress(OSError):
                    if output.committed:
                        _remove(output.path)
                        output.committed = False
                    if output.backup is not None:
                        os.replace(output.backup, output.path)
                        output.backup = None
                with suppress(OSError):
                    if output.temporary is not None:
                        _remove(output.temporary)
                        output.temporary = None


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
