"""What every benchmark's results file says about how it was produced: the commit, the machine, versions,
and the peak memory of a process (Linux's /proc); where the results go. Shared by the scripts in benchmarks/."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def commit() -> str | None:
    """The short commit of this checkout, noting uncommitted changes under src/; None outside git."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               check=True, cwd=here).stdout.strip()
        return sha + (" (src/ with uncommitted changes)" if dirty else "")
    return None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def versions(*names: str) -> dict[str, str]:
    """Python's version and each installed package's of ``names``."""
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid`` in bytes (VmHWM), 0 once it has ended."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def provenance(script: str, argv: list[str] | None, *packages: str) -> dict[str, str | None]:
    """How a results file was produced: the date, the commit, the command (``script`` with ``argv``, or this
    process's arguments), the machine, and the versions of Python and ``packages``."""
    args = argv if argv is not None else sys.argv[1:]
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "command": "python " + shlex.join([script, *args]),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib()} GiB",
            "versions": ", ".join(f"{k} {v}" for k, v in versions(*packages).items())}


def write_results(folder: Path, name: str, result: dict[str, Any], table: str) -> None:
    """``folder/NAME.json`` (strict JSON: a NaN is a bug to see, not a value to write) and ``NAME.md``, the
    table the script also prints."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (folder / f"{name}.md").write_text(table)
