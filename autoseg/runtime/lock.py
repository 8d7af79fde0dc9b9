"""Exclusive locks on a folder, so two runs of the same job cannot clobber each other's files.

A run takes the lock file `<folder>/.autoseg.lock` with flock(2) and writes its pid and command into it.
The kernel releases the lock when the process ends, however it ends (kill -9 included), so a stale lock
file never blocks a later run. A second run fails at once with the first one's pid. Where flock is not
available (Windows), runs are not locked; network file systems that do not support flock raise OSError,
and the run then goes on unlocked with a warning.

Parts of one job (`--part I/N`) hold the folder's lock shared and their own part lock exclusively: parts run
side by side, the same part cannot run twice, and a whole-folder run waits for none of them but is refused
while any runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autoseg.errors import SettingsError
from autoseg.log import get_logger
from autoseg.runtime.parts import Part

log = get_logger("runtime")

LOCK_NAME = ".autoseg.lock"


@contextmanager
def folder_lock(folder: Path, what: str, *, shared: bool = False, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold the lock `name` of `folder` (created if needed) while the block runs; SettingsError naming the
    other run's pid when `what` (e.g. "training of fold 0") is already running there. `shared`: any number
    of shared holders at once, but never beside an exclusive one."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = "; ".join(handle.read().strip().splitlines()[-4:]) or "another process"
            raise SettingsError(f"{what} is already running ({holder})", path=folder,
                                hint="wait for it to finish, or stop it first; two runs would overwrite each "
                                     "other's files") from None
        except OSError as err:
            log.warning("cannot lock %s (%s): running without a lock", path, err)
            yield
            return
        if not shared:  # shared holders add their line to the last exclusive holder's file
            handle.seek(0)
            handle.truncate()
        handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


@contextmanager
def part_lock(folder: Path, what: str, part: Part) -> Iterator[None]:
    """folder_lock for one part of a split job: the folder's lock shared, the part's own lock exclusive
    (the whole job, part 1/1, takes the folder's lock exclusively)."""
    if part.whole:
        with folder_lock(folder, what):
            yield
        return
    with folder_lock(folder, what, shared=True), \
            folder_lock(folder, f"{what}, part {part}", name=f".autoseg.part{part.index}of{part.count}.lock"):
        yield
