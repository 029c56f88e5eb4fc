"""Serving the model's bytes: whole, or the part a ``Range`` asks for, so a broken download resumes.

``Range: bytes=START-`` / ``bytes=START-END`` / ``bytes=-SUFFIX`` gets 206 with ``Content-Range``;
``If-Range`` carrying an ETag that is no longer the model's gets the whole new model (200), so a
resumed download never joins two model versions; a range that starts past the end gets 416 with a
message. Anything else in ``Range`` (several ranges, another unit, bad syntax) is ignored, as RFC 9110
allows: the whole model comes back. The bytes go out as memoryview slices of the one serialised
model, a piece at a time, waiting for the socket to drain between pieces: however many workers
download at once, no copy of the model is made for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

PIECE = 4 * 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


class Unsatisfiable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end-exclusive) a ``Range`` header asks of ``size`` bytes; None for the whole body.

    >>> parse_range("bytes=100-", 1000), parse_range("bytes=0-9", 1000), parse_range("bytes=-10", 1000)
    ((100, 1000), (0, 10), (990, 1000))
    """
    if value is None:
        return None
    m = _RANGE.match(value.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # the last N bytes
        n = int(last)
        if n == 0:
            raise Unsatisfiable(f"range {value!r} asks for the last 0 bytes of the {size}-byte model")
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise Unsatisfiable(f"range {value!r} starts at byte {start}, but the model has {size} bytes "
                            f"(last byte {size - 1})")
    return start, end


class BufferResponse(Response):
    """Sends ``body`` (a memoryview, not copied) in pieces of ``PIECE`` bytes."""

    def __init__(self, body: memoryview, status_code: int, headers: Mapping[str, str], media_type: str) -> None:
        super().__init__(content=b"", status_code=status_code, headers=dict(headers), media_type=media_type)
        self.view = body
        self.headers["content-length"] = str(len(body))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        view = self.view if scope.get("method") != "HEAD" else self.view[:0]
        for pos in range(0, len(view), PIECE):
            # uvicorn waits for the socket to drain after each piece: memory per download stays at a piece.
            await send({"type": "http.response.body", "body": view[pos:pos + PIECE], "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def model_response(body: memoryview, headers: dict[str, str], range_header: str | None, if_range: str | None,
                   media_type: str) -> tuple[Response, int]:
    """The response to ``GET /v1/model`` for these request headers, and how many model bytes it sends."""
    size = len(body)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if if_range is not None and if_range != headers.get("ETag"):
        range_header = None  # the model changed since the part the client has: send the whole new one
    try:
        span = parse_range(range_header, size)
    except Unsatisfiable as exc:
        return JSONResponse({"detail": str(exc)}, status_code=416,
                            headers={**headers, "Content-Range": f"bytes */{size}"}), 0
    if span is None:
        return BufferResponse(body, 200, headers, media_type), size
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return BufferResponse(body[start:end], 206, headers, media_type), end - start
