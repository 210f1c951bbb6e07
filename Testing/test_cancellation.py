"""Cancellation by signal: what a SIGTERM does before, during and after a command commits.

Real signals to this process (``signal.raise_signal``), through the handler the command line
installs; the previous handlers are restored after each test.
"""

from __future__ import annotations

import signal

import pytest

from diffusionreg import cancellation
from diffusionreg.errors import CancelledError


@pytest.fixture
def armed():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cancellation.install_cancel_handler()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_raises_at_once_when_armed(armed):
    with pytest.raises(CancelledError):
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_inside_held_is_raised_when_the_block_ends(armed):
    reached_end_of_block = False
    with pytest.raises(CancelledError):
        with cancellation.held():
            signal.raise_signal(signal.SIGTERM)
            reached_end_of_block = True
    assert reached_end_of_block


def test_after_settle_a_signal_is_kept_and_raised_at_rearm(armed):
    """A cohort's case committed, its record being written: the cancel must not be lost."""
    cancellation.settle()
    signal.raise_signal(signal.SIGTERM)  # a single command would simply finish
    with cancellation.held():
        pass  # the record's bookkeeping does not consume the kept signal
    with pytest.raises(CancelledError):
        cancellation.rearm()
    cancellation.rearm()  # raised once only


def test_a_signal_held_while_settled_waits_for_rearm(armed):
    cancellation.settle()
    with cancellation.held():
        signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        cancellation.rearm()


def test_rearm_without_a_signal_arms_again(armed):
    cancellation.settle()
    cancellation.rearm()
    with pytest.raises(CancelledError):
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_held_across_settle_is_kept_for_the_cohort(armed):
    """The commit's last held block: a cancel arriving just before settle() still stops a cohort."""
    with cancellation.held():
        signal.raise_signal(signal.SIGTERM)
        cancellation.settle()
    with pytest.raises(CancelledError):
        cancellation.rearm()
