"""User-facing errors: every mistake a user can make raises one of these.

Each carries the offending `path` (when there is one) and a `hint` that says what to do,
so the CLI can print two lines (what is wrong, how to fix it) instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class AutosegError(Exception):
    """Base class for errors caused by input, settings or files, not by bugs."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}{self.message}"
        return f"{text}\n  fix: {self.hint}" if self.hint else text


class DatasetError(AutosegError):
    """The raw dataset (dataset.json, images, labels) is malformed."""


class ImageReadError(AutosegError):
    """An image or label file cannot be read."""


class FormatVersionError(AutosegError):
    """A stored contract (fingerprint, plans, ...) was written by another format version."""


class PlanError(AutosegError):
    """Planning cannot produce a configuration for this dataset or budget."""


class SettingsError(AutosegError):
    """A setting, flag or registry key is invalid."""
