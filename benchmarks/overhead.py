"""Per-round overhead of the engine, next to the physical floor of moving the bytes.

A model of P float32 parameters and no training work (the ``null`` task: each worker returns the
model plus a constant), N workers as N real worker processes on loopback, R rounds. For each (P, N)
it prints seconds per steady round (median over rounds 2..R) next to the floor: one memcpy of
2·N·P·4 bytes plus the weighted average in numpy, measured here in this process.

    python benchmarks/overhead.py                 # the full table (a few minutes on 2 cores)
    python benchmarks/overhead.py --quick         # 100K and 1M with 10 workers only

Writes benchmarks/results/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.storage.run_dir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import provenance, write_results

SCRIPT = "benchmarks/overhead.py"

CASES = [(100_000, 10), (100_000, 100), (1_000_000, 10), (1_000_000, 100), (10_000_000, 10)]
QUICK = [(100_000, 10), (1_000_000, 10)]
RESULTS = Path(__file__).resolve().parent / "results"


def floor_seconds(p: int, n: int, repeat: int = 3) -> float:
    """Best of ``repeat``: copy the model out to N and back from N, and fold N updates into a sum."""
    src = np.ones(p, dtype=np.float32)
    dst = np.empty_like(src)
    acc = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(2 * n):
            np.copyto(dst, src)
        for i in range(n):
            np.multiply(src, np.float32(i + 1), out=dst)
            acc += dst
        acc /= np.float32(n)
        best = min(best, time.perf_counter() - t)
    return best


def run_case(p: int, n: int, rounds: int, workdir: Path) -> dict[str, float]:
    out = workdir / f"p{p}-n{n}"
    cmd = [sys.executable, "-m", "fedfleet", "run", "--task", "null", "--task-option", f"params={p}",
           "--workers", str(n), "--processes", str(n), "--rounds", str(rounds), "--quorum", "1",
           "--round-timeout", "600", "--out", str(out), "--quiet", "--overwrite"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    records = RunDir(out).read_rounds()
    steady = records[1:] if len(records) > 1 else records
    return {"round_s": statistics.median(r.seconds for r in steady),
            "transfer_s": statistics.median(r.timings.open for r in steady),
            "aggregate_s": statistics.median(r.timings.aggregate for r in steady),
            "checkpoint_s": statistics.median(r.timings.checkpoint for r in steady),
            "bytes_per_round": steady[-1].bytes_in + steady[-1].bytes_out, "wall_s": wall}


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    header = ("| params | workers | round s | transfer+train s | aggregate s | checkpoint s | floor s | round/floor |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['params']:,} | {r['workers']} | {r['round_s']:.4f} | {r['transfer_s']:.4f} | {r['aggregate_s']:.4f} "
        f"| {r['checkpoint_s']:.4f} | {r['floor_s']:.4f} | {r['ratio']:.1f} |" for r in result["rows"]]
    return "\n".join([
        f"# Overhead per round ({m['date']}, {m['cpus']} CPUs)", "",
        f"`{m['command']}` at commit {m['commit']}, on {m['machine']} ({m['versions']}); {m['rounds']} rounds a "
        "case, each a real `fedfleet run --task null` with one worker process per worker on loopback.", "",
        "Steady round = median of rounds 2..R, measured by the coordinator; floor = memcpy of 2·N·P·4 bytes "
        "plus the weighted average in numpy.", "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(f"{p}x{n}" for p, n in QUICK))
    ap.add_argument("--case", action="append", metavar="PxN", help="run only this case, e.g. 1000000x100")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per case (the first is not counted)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cases = QUICK if args.quick else CASES
    if args.case:
        cases = [(int(c.split("x")[0]), int(c.split("x")[1])) for c in args.case]
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="fedfleet-bench-"))
    try:
        for p, n in cases:
            measured = run_case(p, n, args.rounds, workdir)
            fl = floor_seconds(p, n)
            rows.append({"params": p, "workers": n, "floor_s": fl, "ratio": measured["round_s"] / fl, **measured})
            r = rows[-1]
            print(f"P={p:>10,} N={n:>4}: round {r['round_s']:.4f} s  (transfer+train {r['transfer_s']:.4f}, "
                  f"aggregate {r['aggregate_s']:.4f}, checkpoint {r['checkpoint_s']:.4f})  floor {fl:.4f} s  "
                  f"x{r['ratio']:.1f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {**provenance(SCRIPT, argv, "numpy", "fedfleet"), "cpus": _cpus(), "rounds": args.rounds}
    result = {"meta": meta, "rows": rows}
    write_results(args.results, "overhead", result, markdown(result))
    print("\n" + markdown(result))
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
