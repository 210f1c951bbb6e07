"""Cancelling long work with a signal, and the few steps a signal must not cut in half.

The command line installs :func:`install_cancel_handler`: SIGTERM (the Slicer runner's Cancel)
raises :class:`~diffusionreg.errors.CancelledError` and SIGINT (Ctrl-C) raises
``KeyboardInterrupt``, both turned into exit code 130. A handler may run between any two
bytecodes, so bookkeeping that must stay consistent (a rename and the record that it happened)
runs under :func:`held`: a signal arriving there is kept and raised when the block ends. Once a
command has committed its outputs, :func:`settle` makes later signals harmless, so exit 130
always means "nothing written". A cohort re-arms with :func:`rearm` before its next case: a signal
that came while the last case was settled is raised then, so no cancel is ever lost.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from diffusionreg.errors import CancelledError

_CANCEL_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), signal.SIGINT) if s is not None)

_state = {"held": 0, "pending": None, "settled": False}


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise CancelledError("cancelled")


def _handler(signum, frame) -> None:
    if _state["settled"] or _state["held"]:
        _state["pending"] = signum
        return
    _raise_for(signum)


def install_cancel_handler() -> None:
    """Route SIGTERM and SIGINT through this module (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _state.update(held=0, pending=None, settled=False)
    for signum in _CANCEL_SIGNALS:
        try:
            signal.signal(signum, _handler)
        except (ValueError, OSError):  # e.g. an embedding interpreter that owns its signals
            pass


@contextlib.contextmanager
def held(discard: bool = False) -> Iterator[None]:
    """Defer cancellation inside the block; raise it at the end unless ``discard``.

    ``discard`` is for clean-up that runs because of a cancellation already being handled.
    """
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        pending = _state["pending"]
        # once settled, a signal is kept for rearm() rather than raised or dropped
        if _state["held"] == 0 and pending is not None and not _state["settled"]:
            _state["pending"] = None
            if not discard:
                _raise_for(pending)


def settle() -> None:
    """The work is committed: from now on a signal no longer cancels it.

    A signal kept by :func:`held` or arriving later is kept, not raised: a single command ignores
    it (its outputs are whole), a cohort raises it at :func:`rearm`, before its next case starts.
    """
    _state["settled"] = True


def rearm() -> None:
    """Cancellation applies again (a cohort's next case); a signal kept while settled is raised now."""
    pending = _state["pending"]
    _state.update(settled=False, pending=None)
    if pending is not None and not _state["held"]:
        _raise_for(pending)
