"""Errors that the command line turns into exit codes.

:class:`InputError` (and :class:`ParameterError`) is bad input: exit 2 with its one-line message.
Any other exception from the library -- ``ValueError`` and ``TypeError`` for calls that break a
function's contract included -- is a bug and exits 1 as an "internal error".
"""


class InputError(ValueError):
    """Bad user input: a missing or unreadable file, a wrong dimension, mismatched grids, NaNs.

    The message is one line that names the problem; the CLI prints it and exits with code 2.
    """


class ParameterError(InputError):
    """A bad value of a named parameter of the Python API (``steps``, ``io_steps``, ...).

    The library names its parameter; the command line prints the flag that set it instead
    (``--instance-optimization must be >= 0``), so library messages never name CLI flags.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem


class CancelledError(RuntimeError):
    """The user cancelled long work (Ctrl-C, SIGTERM from the Slicer process runner)."""
