"""Logging and progress for library code, which never prints.

`get_logger("dataset")` returns `autoseg.dataset`. `progress(...)` wraps an iterable in a rich
progress bar when stderr is a terminal and this is the main rank, and is silent otherwise.
The CLI calls `configure` once to attach handlers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def get_logger(stage: str) -> logging.Logger:
    return logging.getLogger(f"autoseg.{stage}")


def is_main_rank() -> bool:
    """True unless torchrun says this process is a non-zero rank."""
    return os.environ.get("RANK", "0") == "0"


def configure(verbosity: int = 0) -> None:
    """Attach one stderr handler to the `autoseg` logger (INFO, or DEBUG with verbosity > 0)."""
    logger = logging.getLogger("autoseg")
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    logger.setLevel(level if is_main_rank() else logging.WARNING)
    for old in [h for h in logger.handlers if getattr(h, "_autoseg", False)]:
        logger.removeHandler(old)  # it may point at a stream that no longer exists
    handler = _make_handler()
    handler._autoseg = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def _make_handler() -> logging.Handler:
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        return RichHandler(show_time=False, show_path=False, markup=False)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes, not the stream of when it was made: a command
    run inside another program (a test runner, a notebook) may swap sys.stderr and close the old one."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def progress(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    """Yield from `items`, drawing a progress bar only where a person can see it."""
    if not (sys.stderr.isatty() and is_main_rank()):
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
