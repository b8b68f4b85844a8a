"""The preemption signals: SIGTERM (what Kaggle, SLURM and Kubernetes send before killing), SIGUSR1 (SLURM's
``--signal`` warning) and SIGINT (Ctrl-C). Training turns them into a checkpoint at the next iteration boundary;
the launcher forwards them to its workers."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["PREEMPT_SIGNALS", "SignalFlag"]

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class SignalFlag:
    """Records the first of ``PREEMPT_SIGNALS`` received while installed; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        self.signum = 0
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only; an engine run elsewhere keeps the defaults
        for sig in PREEMPT_SIGNALS:
            self._previous.setdefault(sig, signal.signal(sig, self._handle))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum:
            self.restore()
            raise KeyboardInterrupt
        self.signum = self.signum or signum
