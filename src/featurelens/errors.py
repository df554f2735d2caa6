"""Errors that stop a run with a one-line message instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration value or input; the message names the value and the valid choices."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""
