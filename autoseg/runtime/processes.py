"""Process pools whose forked children never finalize the parent's garbage and die with their parent."""

from __future__ import annotations

import ctypes
import gc
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager


@contextmanager
def process_pool(max_workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor, with every object that exists when it opens frozen out of the garbage
    collector until it closes.

    Workers fork lazily, at any submit. A forked child that collected the parent's garbage would run
    destructors of native objects whose threads do not exist in the child (an onnxruntime session, a
    CUDA tensor) and could hang for good; frozen objects are never collected in the children. The
    parent collects them again once the pool is closed.
    """
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=max_workers, initializer=die_with_parent) as pool:
            yield pool
    finally:
        gc.unfreeze()


#: prctl(2) option: the signal a process gets when the thread that created it ends.
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a worker: be killed when the parent process dies, however it dies (kill -9, out of memory).
    A killed `autoseg preprocess` otherwise left its workers running on (issue 19). Linux only; a no-op
    elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
