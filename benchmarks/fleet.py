"""One real ``fedfleet`` command (a run: coordinator and worker processes on loopback) from a benchmark, and what
it wrote: the summary, the round records and the wall time. Shared by the scripts in benchmarks/."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_fedfleet(args: list[str], out: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """``fedfleet ARGS --out OUT --quiet``; RuntimeError with the tail of its output if it fails."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedfleet", *args, "--out", str(out), "--quiet"],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"fedfleet {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rounds, seconds
