"""One error hierarchy: every user-facing failure says what went wrong and what to do.

The CLI maps each class to an exit code and prints ``message`` plus ``hint`` on one
screen; the traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class HetuneError(Exception):
    """Base class. ``hint`` tells the user how to fix the problem."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class ConfigError(HetuneError):
    """A setting is out of range or inconsistent (names the field and the bad value)."""

    exit_code = 2


class ModelLoadError(HetuneError):
    """The model could not be found, loaded, or is not of a supported family (hetune.models.families)."""

    exit_code = 3


class OverflowRiskError(HetuneError):
    """A quantization setting can exceed the GLWE accumulator budget."""

    exit_code = 4


class BundleError(HetuneError):
    """A worker bundle is missing, corrupted, truncated, or cannot be written."""

    exit_code = 5


class WorkerError(HetuneError):
    """A remote worker is unreachable, or refused a request (its address and answer are in the message)."""

    exit_code = 6


class OutputError(HetuneError):
    """A run's output (checkpoint, adapter, metrics) cannot be written or read back: full disk, no permission, a file in the way."""

    exit_code = 9
