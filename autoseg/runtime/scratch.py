"""Scratch files and folders named by the process that owns them, so a later run can remove those a killed
run left behind (kill -9 runs no cleanup; issue 19). A name carries the owner's pid; a scratch path whose
pid is no longer running is stale."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from autoseg.log import get_logger

log = get_logger("runtime")


def pid_alive(pid: int) -> bool:
    """True while a process `pid` exists (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(paths: Iterable[Path], pattern: re.Pattern[str]) -> list[Path]:
    """Delete the paths whose name matches `pattern` (group `pid`) and whose pid is not running; returns them."""
    removed = []
    for path in paths:
        match = pattern.search(path.name)
        if match is None or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d scratch item(s) of runs that were killed, e.g. %s", len(removed), removed[0])
    return removed


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder PREFIX-<pid>-XXXX in the system's temp folder, deleted afterwards; the folders of
    this prefix that killed processes left are deleted first."""
    root = Path(tempfile.gettempdir())
    remove_stale(root.glob(f"{prefix}-*"), re.compile(rf"^{re.escape(prefix)}-(?P<pid>\d+)-"))
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-{os.getpid()}-") as folder:
        yield Path(folder)
