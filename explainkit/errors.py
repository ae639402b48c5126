"""Exceptions. Anything derived from :class:`ExplainkitError` is a user-facing problem:
the CLI prints its message on one line and exits with status 2."""

from __future__ import annotations


class ExplainkitError(Exception):
    """A problem with the caller's input (method, layer, checkpoint, data, image, path)."""

    exit_code = 2


class UnknownExplainerError(ExplainkitError, KeyError):
    """No registered explainer has the requested name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateExplainerError(ExplainkitError):
    """Two plugins registered an explainer under the same name."""


class LayerNotFoundError(ExplainkitError):
    """The requested layer path does not name a submodule of the model."""


class CheckpointError(ExplainkitError):
    """A checkpoint is missing, unreadable or does not fit its architecture."""


class DataError(ExplainkitError):
    """The dataset is missing, has the wrong layout, or its classes disagree with the model."""


class ImageReadError(ExplainkitError):
    """An image file could not be read."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type's name: what a one-line
    error shows of a library's long message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
