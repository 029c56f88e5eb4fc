"""Flower in a throwaway virtualenv, for benchmarks that run the same workload through Flower.

Flower is never a dependency of fedfleet: ``ensure_flower`` makes a virtualenv for it (by default
~/.cache/fedfleet-bench/flower-venv, reused when Flower imports there), pip-installs ``flwr[simulation]``
(and any extra packages a benchmark's Flower script needs) and reports the versions, or the error.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FLOWER_VENV = Path.home() / ".cache" / "fedfleet-bench" / "flower-venv"
# Flower 1.42 is the version the issues' reference figures were taken with; else the newest 1.x.
FLOWER_PINS = ("flwr[simulation]==1.42.*", "flwr[simulation]>=1,<2")


def shown(path: Path) -> str:
    """``path`` as the results show it: under the home folder as ~/..., so no machine's own paths are written."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return path.name


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _flower_versions(python: Path) -> dict[str, str] | None:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({n: m.version(n) for n in ('flwr', 'ray', 'numpy', 'cryptography')}))")
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            versions: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
            return versions
    return None


def ensure_flower(venv: Path, log: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A virtualenv with Flower (and ``extra`` packages) in it: reused if they import, else made and installed.
    Never raises."""
    python = venv_python(venv)
    if python.exists():
        versions = _flower_versions(python)
        if versions is not None and _has(python, extra):
            return {"venv": shown(venv), "reused": True, "versions": versions, "install_s": 0.0}
    t = time.perf_counter()
    tried: list[str] = []
    try:
        if not python.exists():
            venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        for pin in FLOWER_PINS:
            tried.append(pin)
            with log.open("a") as f:
                r = subprocess.run([str(python), "-m", "pip", "install", "-q", pin, *extra], stdout=f,
                                   stderr=subprocess.STDOUT, timeout=1200)
            if r.returncode == 0:
                versions = _flower_versions(python)
                if versions is not None:
                    return {"venv": shown(venv), "reused": False, "pin": pin, "versions": versions,
                            "install_s": time.perf_counter() - t}
        tail = log.read_text()[-1500:] if log.exists() else ""
        return {"venv": shown(venv), "error": f"pip install failed for {tried}: {tail}"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"venv": shown(venv), "error": f"{type(exc).__name__}: {exc}"}


def _has(python: Path, packages: tuple[str, ...]) -> bool:
    """Whether every one of ``packages`` (pip requirements; the name is what is checked) is installed."""
    names = [p.split("=")[0].split("<")[0].split(">")[0].split("[")[0] for p in packages]
    if not names:
        return True
    code = f"import importlib.metadata as m; [m.version(n) for n in {names!r}]"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120).returncode == 0
    return False
