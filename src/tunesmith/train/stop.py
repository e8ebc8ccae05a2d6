"""Stopping a run cleanly on SIGINT/SIGTERM: finish the step, save, tell how to resume."""

from __future__ import annotations

import signal
import threading
from typing import Any

from tunesmith.utils import logger


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and stops cleanly."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopRequest:
        """Catch SIGINT and SIGTERM (main thread only; elsewhere signals keep their handlers)."""
        stop = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                stop.previous[sig] = signal.signal(sig, stop.handle)
        return stop

    def handle(self, signum: int, frame: Any) -> None:
        """Remember the first signal; a second SIGINT interrupts at once."""
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        logger.info(f"{self.requested}: finishing this step, then saving a checkpoint")

    def restore(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
