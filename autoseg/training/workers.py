"""Background worker processes that make batches, and how many of them this process may run.

Batch i is made by worker i % n and handed out strictly in order, so a run's batches depend only on
the base seed, never on the number of workers. Each worker sends pickled batches through its own pipe
(the parent keeps no copy of the writing end, so a worker killed mid-send reads as end-of-file instead
of a hang). A worker that raises sends its traceback before exiting; a worker that dies is noticed
within `poll_s` seconds and reported with its exit code or signal and a hint, never as a bare
"background workers are no longer alive".
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from autoseg.errors import AutosegError
from autoseg.log import get_logger
from autoseg.runtime.signals import STOP_SIGNALS

log = get_logger("training")

_SIGNAL_HINTS = {
    signal.SIGKILL: "most often the out-of-memory killer (see `dmesg`): lower --workers or the batch size, "
                    "or give the job more memory",
    signal.SIGSEGV: "a crash in native code (numpy/scipy); rerun with --workers 0 to reproduce it in the main process",
    signal.SIGBUS: "a memory-mapped cache file was truncated or its disk is full: check free space, then rerun "
                   "`autoseg preprocess ... --overwrite` if the cache is damaged",
    signal.SIGTERM: "it was stopped from outside (a scheduler's time or memory limit, or a manual kill)",
}


class DataLoaderError(AutosegError):
    """A loader worker failed or died; the message says which, why, and what to try."""


# ---------------------------------------------------------------- the pool


class WorkerPool:
    """`workers` processes calling `produce(i)` for i = start, start + 1, ...; `get()` returns them in order.

    `produce` must be picklable for the "spawn" start method; with "fork" (the Linux default) it is
    inherited. Each worker runs at most `prefetch` batches ahead. Close the pool (or use it as a context
    manager) to stop the processes; it is also closed when garbage-collected and at interpreter exit.
    """

    def __init__(self, produce: Callable[[int], Any], *, workers: int, start: int = 0, prefetch: int = 2,
                 poll_s: float = 0.1, stall_warning_s: float = 120.0, start_method: str | None = None) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker")
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context(start_method or ("fork" if "fork" in methods else "spawn"))
        self.workers, self.poll_s, self.stall_warning_s = workers, poll_s, stall_warning_s
        self._next = start
        self._stop = context.Event()
        self._procs: list[Any] = []
        self._readers: list[Any] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._procs, self._readers)
        # Objects that exist now are frozen out of the garbage collector while the workers fork: a forked
        # child must never run the destructors of the parent's garbage (a native library's thread pool,
        # a CUDA tensor), which can hang it for good. It also keeps the parent's pages shared.
        gc.freeze()
        try:
            self._start_workers(context, produce, workers=workers, start=start, prefetch=prefetch)
        finally:
            gc.unfreeze()

    def _start_workers(self, context: Any, produce: Callable[[int], Any], *, workers: int, start: int,
                       prefetch: int) -> None:
        for worker in range(workers):
            reader, writer = context.Pipe(duplex=False)
            args = (produce, worker, workers, start, writer, self._stop, os.getpid(), prefetch)
            proc = context.Process(target=_worker_main, args=args, name=f"autoseg-loader-{worker}", daemon=True)
            try:
                proc.start()
            except OSError as exc:  # fork/spawn itself failed, usually for lack of memory
                reader.close()
                self.close()
                raise DataLoaderError(f"could not start loader worker {worker}: {exc}",
                                      hint="lower --workers or the batch size, or free memory") from exc
            finally:
                writer.close()  # the worker holds the only writing end: its death reads as EOF here
            self._procs.append(proc)
            self._readers.append(reader)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def get(self) -> Any:
        """The next batch in order; raises DataLoaderError when a worker failed or died."""
        if not self._finalizer.alive:
            raise DataLoaderError("the loader was closed", hint="create a new loader")
        worker = self._next % self.workers
        reader, waited = self._readers[worker], time.monotonic()
        while not reader.poll(self.poll_s):
            self._check_alive()
            if time.monotonic() - waited > self.stall_warning_s:
                log.warning("loader worker %d has made no batch for %.0f s (still alive)", worker,
                            time.monotonic() - waited)
                waited = time.monotonic()
        try:
            kind, index, payload = pickle.loads(reader.recv_bytes())
        except (EOFError, OSError):
            raise self._fail(self._death(worker)) from None
        if kind == "error":
            raise self._fail(_failure_error(worker, index, payload))
        self._next += 1
        return payload

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_alive(self) -> None:
        for worker, proc in enumerate(self._procs):
            if not proc.is_alive():
                raise self._fail(self._death(worker))

    def _death(self, worker: int) -> DataLoaderError:
        """Why `worker` is gone: the traceback it sent, else its exit code or signal."""
        proc, reader = self._procs[worker], self._readers[worker]
        proc.join(timeout=2.0)
        try:
            while reader.poll(0):
                kind, index, payload = pickle.loads(reader.recv_bytes())
                if kind == "error":
                    return _failure_error(worker, index, payload)
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        return _exit_error(worker, proc.pid, proc.exitcode)

    def _fail(self, error: DataLoaderError) -> DataLoaderError:
        log.error("%s", error.message.splitlines()[0])
        self.close()
        return error


def _exit_error(worker: int, pid: int | None, code: int | None) -> DataLoaderError:
    if code is not None and code < 0:
        number = -code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        hint = _SIGNAL_HINTS.get(number, "it was stopped from outside")  # type: ignore[call-overload]
        return DataLoaderError(f"loader worker {worker} (pid {pid}) was killed by signal {number} ({name})", hint=hint)
    return DataLoaderError(f"loader worker {worker} (pid {pid}) exited unexpectedly with code {code}",
                           hint="rerun with --workers 0 to reproduce it in the main process")


def _failure_error(worker: int, index: int, failure: dict[str, str]) -> DataLoaderError:
    message = (f"loader worker {worker} failed while making batch {index}: {failure['type']}: {failure['message']}"
               f"\n--- traceback in the worker ---\n{failure['traceback'].rstrip()}")
    hint = failure.get("hint") or ("the worker ran out of memory: lower --workers or the batch size"
                                   if failure["type"] == "MemoryError"
                                   else "rerun with --workers 0 to debug it in the main process")
    return DataLoaderError(message, hint=hint)


def _shutdown(stop: Any, procs: list[Any], readers: list[Any]) -> None:
    stop.set()
    for reader in readers:
        reader.close()  # a worker blocked in send now gets BrokenPipeError and exits
    deadline = time.monotonic() + 2.0
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()  # workers ignore SIGTERM
            proc.join(timeout=1.0)


# ---------------------------------------------------------------- inside a worker


def _worker_main(produce: Callable[[int], Any], worker: int, workers: int, start: int, writer: Any,
                 stop: Any, parent: int, prefetch: int) -> None:
    """Make batches worker, worker + workers, ... (offset by start) until told to stop or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for number in STOP_SIGNALS:  # a scheduler signals every process; the main one finishes its epoch first
        signal.signal(number, signal.SIG_IGN)  # workers end when told to stop or when orphaned
    _single_threaded_libraries()
    outbox: queue.Queue[bytes | None] = queue.Queue(maxsize=max(1, prefetch))
    sender = threading.Thread(target=_send_loop, args=(outbox, writer), daemon=True)
    sender.start()
    index = start + worker

    def running() -> bool:
        return not stop.is_set() and os.getppid() == parent and sender.is_alive()

    while running():
        try:
            payload = pickle.dumps(("batch", index, produce(index)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # sent to the main process, which raises it with this traceback
            failure = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
                       "hint": getattr(exc, "hint", "")}
            if _put(outbox, pickle.dumps(("error", index, failure)), running) and _put(outbox, None, running):
                sender.join(timeout=30.0)  # let the report reach the pipe before exiting
            os._exit(3)
        _put(outbox, payload, running)
        index += workers


def _put(outbox: queue.Queue[bytes | None], item: bytes | None, running: Callable[[], bool]) -> bool:
    """Queue `item` for sending; False if the pool stopped (or the parent died) first."""
    while running():
        try:
            outbox.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _send_loop(outbox: queue.Queue[bytes | None], writer: Any) -> None:
    while (item := outbox.get()) is not None:
        try:
            writer.send_bytes(item)
        except OSError:  # the main process closed its end: stop quietly
            return
    writer.close()


def _single_threaded_libraries() -> None:
    """One BLAS/OpenMP thread per worker: the workers are the parallelism."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except ImportError:  # threadpoolctl comes with batchgenerators; without it, keep the defaults
        pass
