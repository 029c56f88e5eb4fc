"""The worker's ``--state-dir``: one process per folder, locked for as long as the process runs.

The folder keeps each logical worker's id and token, so that a restarted worker gets its partition
back. Two processes reading one folder would register as the same workers and have each other's
updates rejected as duplicates, which is what happened to workers started side by side in one
directory with the default folder. So a process takes the first *slot* no other process holds: the
folder itself, else its subfolders ``1``, ``2``, ... (``flock`` on a lock file in each, which the
kernel releases however the process ends: a crashed worker never leaves a slot taken). A restarted
worker takes the lowest free slot, its own when the others are still running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from fedfleet.errors import StorageError

LOCK_FILE = "worker.lock"
# Far more worker processes than one host runs; past it, something is starting workers in a loop.
MAX_SLOTS = 256


@dataclass(frozen=True)
class Slot:
    """A claimed state folder: ``path`` is ``root`` itself (slot 0) or ``root/N``."""

    root: Path
    path: Path
    number: int
    fd: int
    # Why the slots before this one were passed over, e.g. ".fedfleet-worker (pid 1234)".
    passed: tuple[str, ...] = ()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def claim(root: Path) -> Slot:
    """Lock the first slot of ``root`` that no other process holds; create folders as needed.

    Raises ``StorageError`` naming ``--state-dir`` when a folder cannot be written or locked, or every
    slot is taken.
    """
    passed: list[str] = []
    for number in range(MAX_SLOTS):
        path = root if number == 0 else root / str(number)
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            passed.append(f"{path} ({_holder(fd)})")
            os.close(fd)
            continue
        except OSError as exc:  # e.g. ENOLCK on a network file system without locks
            os.close(fd)
            raise StorageError(f"cannot lock the worker state dir {path}: {exc.strerror}; pass --state-dir "
                               "with a folder on a local disk") from exc
        # Who holds the slot, for the next process that finds it taken.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return Slot(root, path, number, fd, tuple(passed))
    raise StorageError(f"all {MAX_SLOTS} slots of the worker state dir {root} are held by running worker processes; "
                       "pass --state-dir with another folder")


def _open_lock(path: Path) -> int:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot write the worker state dir {path}: {exc.strerror}; pass --state-dir with a "
                           "folder this user can write") from exc


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"held by pid {pid}" if pid.isdigit() else "held by another process"
