"""Atomic file writes: temp file, fsync, rename, so a crash never leaves a half-written file."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def write_atomic(path: Path, parts: Iterable[bytes | memoryview], mode: int = 0o644) -> int:
    """Write ``parts`` to ``path`` atomically and durably; returns the bytes written.

    ``mode`` applies from the first byte (0o600 for secrets), not after a chmod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = 0
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
            for part in parts:
                written += fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return written


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    write_atomic(path, [text.encode()], mode)
