"""Limits a coordinator puts on what it accepts: body sizes, registrations per second, connections.

The number of workers is bounded by the run itself: ``--workers`` partitions, each held by one live
worker; a worker beyond that is turned away with 409 (see ``registry``). The limits on the wire
(header size, header and idle timeouts, open connections) are enforced in ``http_limits``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fedfleet.asgi import JSON_BODY_LIMIT
from fedfleet.errors import ConfigError

HEADER_LIMIT = 64 * 1024
HEADER_TIMEOUT = 10.0
# Above the 60 s idle timeout of the usual load balancers (AWS ALB, nginx), so that a balancer never
# sends a request on a connection the coordinator has just closed.
IDLE_TIMEOUT = 75.0


@dataclass(frozen=True)
class Limits:
    """How much a coordinator takes from clients; checked once when built."""

    json_body_bytes: int = JSON_BODY_LIMIT
    registration_rate: float = 20.0  # registrations per second, sustained
    registration_burst: int = 200  # registrations at once, e.g. a fleet starting together
    max_connections: int | None = None  # open connections; more get 503 (uvicorn's limit_concurrency)
    header_bytes: int = HEADER_LIMIT  # request line and headers of one request; more: 431 and closed
    header_timeout: float = HEADER_TIMEOUT  # seconds from connecting (or a request's first byte) to its headers' end
    idle_timeout: float = IDLE_TIMEOUT  # seconds a kept-alive connection may wait for its next request

    def __post_init__(self) -> None:
        _at_least("max_body_bytes", self.json_body_bytes, 1024)
        _above_zero("registration_rate", self.registration_rate)
        _at_least("registration_burst", self.registration_burst, 1)
        if self.max_connections is not None:
            _at_least("max_connections", self.max_connections, 8)
        _at_least("max_header_bytes", self.header_bytes, 1024)
        _above_zero("header_timeout", self.header_timeout)
        _above_zero("idle_timeout", self.idle_timeout)


def _above_zero(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"The '{name}' option must be a number above 0. Got {value!r} instead.", option=name)


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
