"""Errors that stop a run with a one-line message instead of a traceback.

``ConfigError`` (exit code 2): a bad configuration value or input file. ``RunError`` (exit code 1): the run
itself cannot go on (it diverged, the disk is full); the last good checkpoint is kept, so it can be resumed.
Anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A bad configuration value or input; the message names the value and the valid choices."""


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class DivergedError(RunError):
    """The training or validation loss exploded."""


class NonFiniteLossError(DivergedError):
    """The training loss became NaN or infinite."""


class DiskFullError(RunError):
    """A write failed for lack of space (or quota)."""
