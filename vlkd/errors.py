"""The one kind of error a user sees: a ``VlkdError`` becomes one line on stderr and exit code 2."""

from __future__ import annotations


class VlkdError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class RecipeError(VlkdError):
    """A recipe file is missing, malformed, or has an unknown, missing or mistyped key."""


class DataError(VlkdError):
    """A dataset spec or the data behind it cannot be used."""


class ModelLoadError(VlkdError):
    """A teacher, student or weights file cannot be loaded."""


class BackendUnavailableError(VlkdError):
    """An attention backend was asked for that cannot run here."""


class EvalError(VlkdError):
    """An evaluation was asked for on inputs it cannot measure."""


class CheckpointError(VlkdError):
    """A checkpoint is missing or cannot be resumed from."""


class OutputExistsError(VlkdError):
    """An output folder already exists and ``--overwrite`` was not given."""


class NonFiniteLossError(VlkdError):
    """Training produced a NaN or infinite loss term."""
