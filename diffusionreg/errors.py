"""Errors that the command line turns into exit codes."""


class InputError(ValueError):
    """Bad user input: a missing or unreadable file, a wrong dimension, mismatched grids, NaNs.

    The message is one line that names the problem; the CLI prints it and exits with code 2.
    """


class CancelledError(RuntimeError):
    """The user cancelled long work (Ctrl-C, SIGTERM from the Slicer process runner)."""
