"""Graceful stop on SIGTERM / SIGUSR1: finish the running epoch, save, exit (for schedulers' time limits).

SLURM sends SIGTERM at a time limit or preemption (then SIGKILL after KillWait) and, with
`--signal=B:USR1@600`, a warning signal minutes earlier. Dying at once loses everything since the last
checkpoint; finishing the epoch and saving `checkpoint_latest` loses nothing, and `--continue` picks up
exactly there. A second signal of either kind stops at once, as without the handler.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from autoseg.log import get_logger

log = get_logger("runtime")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Context manager: while active, the stop signals only set `requested` (the first time).

    Installs nothing outside the main thread (Python allows handlers only there); `requested` then
    stays None. Previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested is None:
            self.requested = name
            log.warning("%s received: finishing this epoch, then saving checkpoint_latest and stopping "
                        "(send it again to stop at once)", name)
            return
        self.__exit__(None, None, None)  # a second signal: behave as if no handler had been installed
        os.kill(os.getpid(), number)
