"""Errors that are the user's to fix.

Every error convlens raises on purpose is a :class:`ConvlensError` (``convlens.ConvlensError``):
from Python, ``except convlens.ConvlensError`` catches exactly what the CLI reports as one line.
A :class:`UserError` is printed by the CLI as one line (no traceback unless ``--debug``) and
exits with code 2. Messages follow Keras's style: say what is wrong, what was received and
what to do, e.g. ``"padding must be 'valid' or 'same'. Received: padding='foo'"``.
"""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """The first line of ``str(error)`` (else its type's name), cut to ``limit`` characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class ConvlensError(Exception):
    """The base of every error convlens raises on purpose; ``str(e)`` is the one-line message."""


class UserError(ConvlensError):
    """A problem with the user's input: an option, a file, a folder or a model spec."""

    exit_code = 2


class ConfigError(UserError):
    """A bad configuration key or value."""


class SpecError(UserError):
    """A model layer list that cannot be built."""


class DataError(UserError):
    """A dataset folder that cannot be used (missing, empty, no classes, ...)."""


class BundleError(UserError):
    """A model bundle that is missing, truncated, tampered with or mismatched."""


class DiskFullError(UserError):
    """Not enough free disk space for a file convlens writes (checked before writing, or ENOSPC).

    ``str(e)`` is one line: what could not be written, where, how much it needed and how much was
    free, then ``hint`` (how to make room or move the output). ``path`` is the file, ``needed`` and
    ``free`` are bytes (``needed`` is None when a write failed without a size known beforehand).
    """

    def __init__(self, problem: str, hint: str, *, path: str = "", needed: int | None = None,
                 free: int | None = None) -> None:
        super().__init__(f"{problem}; {hint}")
        self.problem, self.hint, self.path, self.needed, self.free = problem, hint, path, needed, free

    def with_hint(self, hint: str) -> DiskFullError:
        """The same error with the advice of a caller that knows more (which flag moves this output)."""
        return DiskFullError(self.problem, hint, path=self.path, needed=self.needed, free=self.free)


class ImageError(ConvlensError):
    """One image that cannot be used. Never fatal to a run: the file is skipped and reported.

    ``kind`` is a short machine-readable reason (``zero_bytes``, ``not_image``, ``truncated``,
    ``corrupt``, ``unsupported``, ``too_large``, ``too_small``, ``unreadable``).
    """

    def __init__(self, path: object, kind: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.kind = kind
        self.message = message


class WeightsError(UserError):
    """A pretrained weight file that cannot be used (unreadable, truncated, wrong architecture, bad hash)."""
