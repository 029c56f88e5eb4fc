"""Turn SIGTERM and SIGINT into a clean stop of the worker's threads."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from fedfleet import log
from fedfleet.parent import follow_parent


def stop_on_signals(stop: threading.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT; a worker started by ``fedfleet run`` also stops when the run's
    process dies (``fedfleet.parent``), so that killing the run never leaves workers behind."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.event("worker.signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    follow_parent()
