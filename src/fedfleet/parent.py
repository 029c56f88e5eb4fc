"""A process that ``fedfleet run`` started ends when ``fedfleet run`` does, however that ends (SIGKILL too).

The runner puts its pid in the child's environment (``PARENT_ENV``); the child calls ``follow_parent``
once its SIGTERM handling is in place. On Linux the kernel then sends it SIGTERM the moment its parent
dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread compares ``os.getppid()`` with the
parent's pid once a second and sends the SIGTERM itself. Either way the child stops through its own
SIGTERM path (a coordinator ends its run as "stopped", a worker finishes its threads). A coordinator
or worker started by hand has no such variable and is left alone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "FEDFLEET_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_CHECK_SECONDS = 1.0


def follow_parent() -> bool:
    """If ``PARENT_ENV`` names this process's parent, end this process (SIGTERM) when the parent dies;
    if the parent is already gone, now. Returns whether there was a parent to follow."""
    raw = os.environ.pop(PARENT_ENV, "")  # not passed on: this process's own children have another parent
    if not raw.isdecimal():
        return False
    parent = int(raw)
    if not _death_signal(signal.SIGTERM):
        threading.Thread(target=_watch, args=(parent,), name="parent-watch", daemon=True).start()
    # The parent may have died before the kernel was asked to tell us: then we are already an orphan.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _death_signal(sig: signal.Signals) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_CHECK_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
