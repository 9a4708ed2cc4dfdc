"""SIGTERM / SIGINT while training (a preempted or cancelled VM): stop at a step boundary with a
checkpoint, so rerunning the same command resumes where the run stopped."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np


class StopRequest:
    """SIGTERM / SIGINT while training: the loop finishes the step it is in, saves a checkpoint at
    that step, waits for it and returns (exit code 0). A second signal stops at once (the default
    action). With several processes the flag is combined over all of them at log steps
    (`process_allgather`, where the metrics are fetched anyway), so every process stops at the same
    step; a single process stops after the current step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "request"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # no printing here: the handler may interrupt a print
            return
        self.uninstall()  # a second signal: act now
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def agreed(self, at_log_step: bool) -> bool:
        """Whether every process stops after this step."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not at_log_step:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.signum is not None, np.int32))
        if self.signum is None and np.any(flags):
            self.signum = signal.SIGTERM  # another process's signal
        return bool(np.any(flags))
