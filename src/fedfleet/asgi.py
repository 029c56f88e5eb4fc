"""Small ASGI and socket pieces shared by the coordinator's app and ``fedfleet serve``.

Neutral ground, so that the web layer (``fedfleet.web``) needs nothing from the coordinator.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from fedfleet.errors import ConfigError

JSON_BODY_LIMIT = 1024 * 1024  # default limit of a JSON request body


def listen(host: str, port: int) -> socket.socket:
    """``bind``, with a port in use (or any other refusal) as a ConfigError of one line naming it."""
    try:
        return bind(host, port)
    except OSError as exc:
        raise ConfigError(f"port {port} on {host} is in use: choose another with --port (--port 0 picks a free one)"
                          if exc.errno == errno.EADDRINUSE else f"cannot listen on {host} port {port}: "
                          f"{exc.strerror or exc}", option="port") from exc


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def respond(send: Callable[[Any], Awaitable[None]], status: int, body: bytes, content_type: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer from an ASGI middleware, before any route (and without reading the request's body)."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413, declared or streamed (chunked)."""

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, ...] = (),
                 exempt_prefix: str | None = None) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt or (
                self.exempt_prefix is not None and scope["path"].startswith(self.exempt_prefix)):
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _too_large(send, self.limit)
                return
        seen = 0

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.limit)


class _BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other error raised while it reads a body into a 400.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")


async def _too_large(send: Callable[[Any], Awaitable[None]], limit: int) -> None:
    body = f'{{"detail":"request body is over the limit of {limit} bytes"}}'.encode()
    await respond(send, 413, body, b"application/json")

