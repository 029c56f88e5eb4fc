"""Limits on the wire, enforced where uvicorn reads the bytes: its httptools protocol.

uvicorn's own ``h11_max_incomplete_event_size`` applies to h11 only, and h11 costs 60% more CPU
(DESIGN.md); with httptools (llhttp) a request's headers may grow without bound and take forever,
and a connection that never sends a byte is never timed out. ``LimitedHttpTools`` adds, per
connection:

- **header size**: the request line and headers of one request may take ``header_bytes`` bytes and
  ``MAX_HEADERS`` headers; past either the client gets 431 and the connection is closed. The parser is
  fed at most the bytes still allowed, so an endless header costs at most ``header_bytes`` of memory;
- **header timeout**: from the connection opening, or from the first byte of a later request on it,
  the headers must be complete within ``header_timeout`` seconds, else the connection is closed. The
  body is not timed: an upload of hundreds of MB over a slow link is a worker doing its job;
- **idle timeout**: a kept-alive connection waits at most ``idle_timeout`` seconds for its next request
  (uvicorn's keep-alive timer);
- **open connections**: at most ``max_open``, computed from ``RLIMIT_NOFILE`` minus what the process
  already uses minus a reserve (``connection_cap``). A connection beyond that is closed as soon as it
  is accepted, so the checkpoint, SQLite and upload files always find a file descriptor: running out
  of descriptors refuses clients, it never fails the run.

Under TLS the protocol does the handshake itself (``loop.start_tls``) instead of letting the server
do it before the protocol sees the connection: so a connection is counted from the moment it is
accepted, and one that never finishes its handshake is dropped after ``header_timeout``, where the
event loop's default would keep it 60 s, uncounted.

Refusals are logged as events, at most one line per kind every ``LOG_EVERY`` seconds with a count:
a flood of connections must not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import ssl
import time
from asyncio import TimerHandle
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from fedfleet import log
from fedfleet.errors import ConfigError

MAX_HEADERS = 100  # as Apache's LimitRequestFields: each header is ~150 bytes of Python objects
FD_RESERVE = 64  # descriptors kept for checkpoints, SQLite, uploads and logs: at least this many...
FD_RESERVE_SHARE = 0.1  # ...or this share of the limit, whichever is more
FD_TARGET = 65536  # the soft limit is raised towards the hard one, up to this
MIN_CONNECTIONS = 16
LOG_EVERY = 10.0


@dataclass(frozen=True)
class Wire:
    """What one connection may do before its request reaches the app."""

    header_bytes: int
    header_timeout: float
    idle_timeout: float
    max_open: int
    tls: ssl.SSLContext | None = None


class Tally:
    """Counts events of a kind and logs them at most once per ``every`` seconds, with the count since."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.total: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def add(self, event: str, **fields: object) -> None:
        self.total[event] = self.total.get(event, 0) + 1
        self._unlogged[event] = self._unlogged.get(event, 0) + 1
        now = self.clock()
        if now - self._last.get(event, -self.every) >= self.every:
            log.event(event, logging.WARNING, count=self._unlogged[event], total=self.total[event], **fields)
            self._unlogged[event] = 0
            self._last[event] = now


class HeaderLimit(Exception):
    """Raised inside a parser callback to stop parsing a request that has too many headers."""


class LimitedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``wire`` (set on a subclass: see ``protocol_class``)."""

    wire: ClassVar[Wire]
    tally: ClassVar[Tally]
    handshaking: ClassVar[set[LimitedHttpTools]]  # accepted, TLS handshake under way: not yet in connections

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn's Config takes whole seconds; its timer takes any number.
        self.timeout_keep_alive = self.wire.idle_timeout  # type: ignore[assignment]
        self._refused = False
        self._reading_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._too_large: str | None = None
        self._header_timer: TimerHandle | None = None

    # --- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) + len(self.handshaking) >= self.wire.max_open:
            # Closed before uvicorn counts it: nothing of it is kept but the socket, until the loop drops it.
            self._refused = True
            transport.close()
            self.tally.add("coordinator.connections_refused", open=len(self.connections),
                           handshaking=len(self.handshaking), cap=self.wire.max_open)
            return
        if self.wire.tls is None:
            super().connection_made(transport)
            self._arm_header_timer()
            return
        self.handshaking.add(self)
        # start_tls hands the socket to its TLS protocol before its first await. That part has to run
        # here, inside connection_made, not in a task: the loop starts reading as soon as this returns,
        # and a ClientHello read by the HTTP parser would be lost to TLS. (Python 3.12's eager tasks
        # would do the same.) The rest runs when the handshake is over.
        self._step(self.loop.start_tls(transport, self, self.wire.tls, server_side=True,
                                       ssl_handshake_timeout=self.wire.header_timeout), transport)

    def _step(self, handshake: Coroutine[Any, Any, asyncio.Transport | None], raw: asyncio.Transport) -> None:
        try:
            waiting = handshake.send(None)
        except StopIteration as done:
            self._handshake_over(raw, done.value)  # None if the connection closed as the handshake finished
        except OSError as exc:  # ssl.SSLError, a reset, or the handshake timed out (ConnectionAbortedError)
            self.tally.add("coordinator.tls_handshake_failed", error=type(exc).__name__)
            self._handshake_over(raw, None)
        except BaseException:  # cancelled at shutdown, or a bug: the connection must not stay counted
            self._handshake_over(raw, None)
            raise
        else:
            waiting.add_done_callback(lambda _: self._step(handshake, raw))

    def _handshake_over(self, raw: asyncio.Transport, transport: asyncio.Transport | None) -> None:
        self.handshaking.discard(self)
        if transport is None:
            raw.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # While headers are read, feed the parser no more than they may still take: an endless header
        # is refused after header_bytes, not buffered (httptools keeps a partial header in memory).
        while data and self._reading_headers:
            room = self.wire.header_bytes - self._header_bytes
            if room <= 0:
                self._refuse_headers(f"the request line and headers are over {self.wire.header_bytes} bytes")
                return
            piece, data = data[:room], data[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        # A parser error raised by on_header below is a limit, not a malformed request.
        if self._too_large is not None:
            self._refuse_headers(self._too_large)
        else:
            super().send_400_response(msg)

    # --- parser callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._header_count = 0
        self._arm_header_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self._too_large = f"the request has over {MAX_HEADERS} headers"
            raise HeaderLimit(self._too_large)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers = True
        self._header_bytes = 0

    # --- limits ----------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.wire.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            self.tally.add("coordinator.header_timeout", seconds=self.wire.header_timeout,
                           received=self._header_bytes)
            self.transport.close()

    def _refuse_headers(self, why: str) -> None:
        self._cancel_header_timer()
        self.tally.add("coordinator.headers_too_large", limit=self.wire.header_bytes, headers=MAX_HEADERS)
        # Answer only between requests: mid-response (a pipelined request) the 431 would corrupt it.
        if self.cycle is None or self.cycle.response_complete:
            body = f"431 Request Header Fields Too Large: {why}\n".encode()
            self.transport.write(b"".join([
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
                *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n", body]))
        self.transport.close()


def protocol_class(wire: Wire, tally: Tally | None = None) -> type[LimitedHttpTools]:
    """The protocol class to give ``uvicorn.Config(http=...)``: uvicorn instantiates it per connection."""
    shared = {"wire": wire, "tally": tally or Tally(), "handshaking": set()}
    return type("LimitedHttpTools", (LimitedHttpTools,), shared)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files towards its hard limit (at most ``FD_TARGET``); the new soft limit.

    Linux's usual soft limit is 1024 under a much higher hard one: a coordinator that stopped at 1024
    would turn workers away while the system would let it serve them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # e.g. a sandbox that forbids it: the soft limit stays what it was
    return FD_TARGET if soft == resource.RLIM_INFINITY else soft


def open_fds() -> int:
    """File descriptors this process has open now (0 where the system does not list them)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # listdir's own descriptor
        except OSError:
            continue
    return 0


def connection_cap(limit: int, in_use: int) -> int:
    """Connections to accept at most: ``limit`` descriptors, less those ``in_use``, less the reserve."""
    cap = limit - in_use - max(FD_RESERVE, int(limit * FD_RESERVE_SHARE))
    if cap < MIN_CONNECTIONS:
        raise ConfigError(f"only {limit} open files are allowed (ulimit -n) and {in_use} are in use: the coordinator "
                          f"needs {in_use + MIN_CONNECTIONS + max(FD_RESERVE, int(limit * FD_RESERVE_SHARE))} to serve "
                          f"{MIN_CONNECTIONS} connections and keep a reserve for its files; raise the limit",
                          option="max_connections")
    return cap
