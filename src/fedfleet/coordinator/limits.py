"""Limits a coordinator puts on what it accepts: body sizes, registrations per second, connections.

The number of workers is bounded by the run itself: ``--workers`` partitions, each held by one live
worker; a worker beyond that is turned away with 409 (see ``registry``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fedfleet.errors import ConfigError

JSON_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """How much a coordinator takes from clients; checked once when built."""

    json_body_bytes: int = JSON_BODY_LIMIT
    registration_rate: float = 20.0  # registrations per second, sustained
    registration_burst: int = 200  # registrations at once, e.g. a fleet starting together
    max_connections: int | None = None  # open connections; more get 503 (uvicorn's limit_concurrency)

    def __post_init__(self) -> None:
        _at_least("max_body_bytes", self.json_body_bytes, 1024)
        if not (math.isfinite(self.registration_rate) and self.registration_rate > 0):
            raise ConfigError(f"The 'registration_rate' option must be a number above 0. Got "
                              f"{self.registration_rate!r} instead.", option="registration_rate")
        _at_least("registration_burst", self.registration_burst, 1)
        if self.max_connections is not None:
            _at_least("max_connections", self.max_connections, 8)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"The '{name}' option must be an int of at least {low}. Got {value!r} instead.",
                          option=name)


class RateLimit:
    """A token bucket: ``rate`` events per second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._now = time.monotonic
        self._last = self._now()

    def take(self) -> float:
        """0 if one event may happen now (and count it), else the seconds until one may."""
        now = self._now()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate
