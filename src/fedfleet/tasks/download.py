"""``fedfleet data download``: fetch a data set's IDX files from their official locations, verified.

Training never downloads: a worker that reaches out to the internet in the middle of a run is a
surprise, and many run where there is no network. Fetching is one explicit step, run once per host
(or once into a shared folder). Each file is taken from the first location that serves it with the
published SHA-256 of its uncompressed bytes (the same check the loader makes), and written
atomically, so an interrupted download never leaves a file the loader would take for a good one. A
file already in place that verifies is kept, without a request.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedfleet.errors import TaskError
from fedfleet.storage.files import write_atomic
from fedfleet.tasks.mnist import FASHION_MNIST, FILES, MNIST, Source, read_idx_bytes

SOURCES = {source.name: source for source in (MNIST, FASHION_MNIST)}
MAX_FILE_BYTES = 64 * 1024 * 1024  # the largest file, Fashion-MNIST's training images, is 26 MB gzipped


@dataclass(frozen=True)
class Fetched:
    """One file of the data set: where it is now, and the URL it came from (None: it was there already)."""

    stem: str
    path: Path
    url: str | None


def verified(source: Source, folder: Path, stem: str) -> Path | None:
    """The file the loader would read for ``stem`` in ``folder`` (the gzipped one first), if it is the
    official one; None if it is missing or not."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            try:
                raw = read_idx_bytes(candidate)
            except TaskError:
                return None
            return candidate if hashlib.sha256(raw).hexdigest() == source.sha256[stem] else None
    return None


def download(source: Source, folder: Path, mirrors: Sequence[str] = (), timeout: float = 60.0,
             on_file: Callable[[Fetched], None] | None = None) -> list[Fetched]:
    """Make ``folder`` hold the four verified files of ``source``, fetching what is missing or wrong
    from ``mirrors`` (base URLs; default the source's official ones), each tried in turn.

    TaskError naming every URL tried and why it failed if a file cannot be had from any of them."""
    bases = list(mirrors) or list(source.urls)
    folder.mkdir(parents=True, exist_ok=True)
    done: list[Fetched] = []
    with httpx.Client(follow_redirects=True, timeout=timeout) as http:
        for stem in FILES:
            have = verified(source, folder, stem)
            fetched = Fetched(stem, have, None) if have else _fetch(http, source, folder, stem, bases)
            done.append(fetched)
            if on_file is not None:
                on_file(fetched)
    return done


def _fetch(http: httpx.Client, source: Source, folder: Path, stem: str, bases: list[str]) -> Fetched:
    failures = []
    for base in bases:
        url = f"{base.rstrip('/')}/{stem}.gz"
        try:
            raw = _get(http, url)
            digest = hashlib.sha256(gzip.decompress(raw)).hexdigest()
        except (httpx.HTTPError, OSError, EOFError, zlib.error, _Refused) as exc:
            failures.append(f"{url}: {exc}")
            continue
        if digest != source.sha256[stem]:
            failures.append(f"{url}: its uncompressed SHA-256 is {digest}, expected {source.sha256[stem]}")
            continue
        target = folder / f"{stem}.gz"
        write_atomic(target, [raw])
        return Fetched(stem, target, url)
    raise TaskError(f"could not download {source.name} {stem}.gz: " + "; ".join(failures)
                    + f". Put the file in {folder} by hand, or give another --mirror")


class _Refused(Exception):
    """The server answered, but not with the file."""


def _get(http: httpx.Client, url: str) -> bytes:
    with http.stream("GET", url) as response:
        if response.status_code != 200:
            raise _Refused(f"HTTP {response.status_code}")
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_FILE_BYTES:
                raise _Refused(f"over {MAX_FILE_BYTES} bytes, larger than any file of the data set")
        return bytes(body)
