"""Turn SIGTERM and SIGINT into a clean stop of the worker's threads."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from fedfleet import log


def stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.event("worker.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
