"""The one kind of error a user sees: a ``VlkdError`` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import pickle


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


class LaunchError(VlkdError):
    """A multi-process launch that would not run what the user asked for."""


# What loading a model folder raises when the folder is bad: missing or corrupt files, or a pickle holding code.
MODEL_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)


def load_failure(exc: BaseException) -> str:
    """One line saying why a model file did not load (a refused pickle gets its own words)."""
    if isinstance(exc, pickle.UnpicklingError):
        return ("a pickle weights file holds more than tensors and was refused unread (weights_only=True); "
                "use safetensors weights")
    return (str(exc).splitlines() or [type(exc).__name__])[0]
