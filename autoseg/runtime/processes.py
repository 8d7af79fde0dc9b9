"""Process pools whose forked children never finalize the parent's garbage."""

from __future__ import annotations

import gc
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
        with ProcessPoolExecutor(max_workers=max_workers) as pool:
            yield pool
    finally:
        gc.unfreeze()
