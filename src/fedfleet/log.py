"""Structured logs: one line per event, ``event key=value ...``, with run, round and worker as fields."""

from __future__ import annotations

import logging
import sys

_log = logging.getLogger("fedfleet")


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("fedfleet")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def event(name: str, level: int = logging.INFO, /, **fields: object) -> None:
    """Log ``name`` with ``key=value`` fields; values with spaces are quoted."""
    if _log.isEnabledFor(level):
        parts = [name]
        for key, value in fields.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
        _log.log(level, " ".join(parts))
