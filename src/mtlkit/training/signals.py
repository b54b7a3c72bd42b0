"""Stopping a run cleanly on SIGINT/SIGTERM: at the end of the current batch, with a checkpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from mtlkit.errors import MtlkitError


class TrainingInterrupted(MtlkitError):
    """Training stopped on a signal; a checkpoint was saved (when the run has an ``out_dir``)."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        where = f"; checkpoint saved to {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"training interrupted by {name}{where}")


class StopOnSignal:
    """Within its ``with`` block, SIGINT and SIGTERM only set ``requested`` (the signal number),
    so that training stops at the end of the current batch with a checkpoint; outside the main
    thread it does nothing. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
