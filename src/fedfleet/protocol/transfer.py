"""Pieces of resumable transfers shared by the worker's client: sizes, byte ranges, slices of buffers.

A model download that breaks mid-body resumes with ``Range`` + ``If-Range`` into the same buffer; an
update larger than ``CHUNKED_UPLOAD_BYTES`` (or one whose single upload failed) goes up through
``/v1/uploads`` in chunks of ``UPLOAD_CHUNK_BYTES`` and resumes from the coordinator's offset.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CHUNKED_UPLOAD_BYTES = 64 * 1024 * 1024  # larger updates go up in resumable chunks
UPLOAD_CHUNK_BYTES = 64 * 1024 * 1024
MODEL_RESUMES = 5  # times one download may resume before it fails (the caller may then retry it whole)
UPLOAD_RESUMES = 10  # broken connections or offset re-syncs one chunked upload may survive
READ_PIECE = 4 * 1024 * 1024  # a download is read this much at a time, so a break loses nothing read
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def slice_parts(parts: Sequence[bytes | memoryview], start: int, end: int) -> list[bytes | memoryview]:
    """Bytes ``start .. end`` (exclusive) of the concatenation of ``parts``, as views (no copy).

    >>> [bytes(p) for p in slice_parts([b"abc", b"defg"], 2, 5)]
    [b'c', b'de']
    """
    out: list[bytes | memoryview] = []
    pos = 0
    for part in parts:
        n = len(part)
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            out.append(memoryview(part)[lo:hi])
        pos += n
        if pos >= end:
            break
    return out


def content_range(value: str | None) -> tuple[int, int, int] | None:
    """(first byte, last byte, total) of a ``Content-Range: bytes A-B/T`` header, or None."""
    m = _CONTENT_RANGE.match((value or "").strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def backoff(attempt: int) -> float:
    """Seconds to wait before resuming after ``attempt`` breaks: 0.1, 0.2, 0.4 ... at most 3.2."""
    return 0.1 * float(2 ** min(attempt, 5))
