"""How the coordinator's cost grows with the number of workers N (issue 16).

A coordinator and N logical workers spread over a few worker processes (``--clients``), all real
processes on loopback, the ``null`` task (no training work: each worker returns the model plus a
constant), R rounds, a share of the workers sampled each round. For each case it reports:

- seconds per steady round (median over rounds 2..R, measured by the coordinator);
- coordinator CPU seconds (user + system, from /proc) over rounds 2..R, per round and per sampled
  worker-round (CPU / the sum of the sampled workers of those rounds): the goal is that the second stays
  flat from N = 100 to N = 1,000;
- the coordinator's peak RSS against the goal of 3 x model + 200 MiB, and the largest peak RSS of a
  worker process;
- the seconds from the start until every worker had registered and the first round opened.

    python benchmarks/scale.py                    # 100K params at N = 10, 100, 1000 (fraction 0.1), 1M x 100
    python benchmarks/scale.py --case 100000x5000 # one case, PxN (or PxN:FRACTION)

Linux only (reads /proc). Writes benchmarks/results/scale.json and scale.md, with the machine, the
commands and the load average before and after each case: the machine may be shared with other work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedfleet.storage.run_dir import RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when imported by path
from machine import commit, cpu_model, memory_gib, vm_hwm

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
TICKS = os.sysconf("SC_CLK_TCK")
GOAL_CPU = "coordinator CPU per sampled worker-round flat from N = 100 to N = 1,000"
GOAL_RSS = "coordinator peak RSS <= 3 x model + 200 MiB at 1M x 100 and at 1,000 workers"


@dataclass(frozen=True)
class Case:
    params: int
    workers: int
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.params}x{self.workers}:{self.fraction:g}"


FULL = [Case(100_000, 10, 0.1), Case(100_000, 100, 0.1), Case(100_000, 1000, 0.1), Case(1_000_000, 100, 1.0)]
QUICK = [Case(100_000, 10, 0.1), Case(100_000, 100, 0.1)]


def parse_case(text: str) -> Case:
    size, _, fraction = text.partition(":")
    p, n = size.split("x")
    return Case(int(p), int(n), float(fraction) if fraction else 0.1)


# --- /proc -------------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of stat(5)


# --- one case ------------------------------------------------------------------------------------------------
def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", "--log-level", "WARNING", *argv], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def coordinator_argv(case: Case, rounds: int, out: Path, partitions: int | None = None) -> list[str]:
    return ["coordinator", "--task", "null", "--task-option", f"params={case.params}",
            "--workers", str(partitions or case.workers),
            "--rounds", str(rounds), "--fraction", str(case.fraction), "--quorum", "1", "--round-timeout", "600",
            "--wait-timeout", "900", "--linger", "3", "--data-dir", str(out), "--host", "127.0.0.1", "--port", "0"]


def spread(workers: int, processes: int) -> list[int]:
    base, extra = divmod(workers, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def _url(out: Path, coord: subprocess.Popen[bytes], timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if coord.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {coord.returncode}")
        with contextlib.suppress(OSError, ValueError, KeyError):
            info = json.loads((out / "coordinator.json").read_text())
            if info["pid"] == coord.pid:
                return str(info["url"])
        time.sleep(0.05)
    raise RuntimeError("the coordinator did not serve in time")


def _recorded(out: Path) -> int:
    with contextlib.suppress(OSError):
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    return 0


def spawn_workers(case: Case, procs: int, url: str, out: Path, workdir: Path) -> list[subprocess.Popen[bytes]]:
    return [spawn(["worker", "--coordinator", url, "--clients", str(k), "--state-dir", str(out / "w" / str(i)),
                   "--give-up", "120"], workdir / f"{out.name}-worker-{i}.log")
            for i, k in enumerate(spread(case.workers, procs))]


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 15)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=20)


def idle_cpu(case: Case, processes: int, workdir: Path, seconds: float, timeout: float) -> dict[str, Any]:
    """Coordinator CPU while N registered workers wait for a round that never opens (one partition more than
    workers): what idle workers cost it (long-polls, heartbeats), measured over ``seconds``."""
    out = workdir / (case.label.replace(":", "f") + "-idle")
    out.mkdir(parents=True)
    coord = spawn(coordinator_argv(case, 1, out, partitions=case.workers + 1), workdir / f"{out.name}-coordinator.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        url = _url(out, coord)
        workers = spawn_workers(case, min(processes, case.workers), url, out, workdir)
        end = time.monotonic() + timeout
        with httpx.Client(base_url=url, timeout=30.0) as http:
            while http.get("/v1/status").json()["workers_registered"] < case.workers:
                if time.monotonic() > end:
                    return {"error": f"not all {case.workers} workers registered within {timeout:.0f} s"}
                time.sleep(1.0)
        time.sleep(2.0)  # the last registrations' first polls
        cpu0 = cpu_seconds(coord.pid)
        time.sleep(seconds)
        return {"idle_cpu_share": (cpu_seconds(coord.pid) - cpu0) / seconds, "idle_s": seconds}
    finally:
        stop_all([*workers, coord])
        shutil.rmtree(out, ignore_errors=True)


def run_case(case: Case, rounds: int, processes: int, workdir: Path, timeout: float) -> dict[str, Any]:
    out = workdir / case.label.replace(":", "f")
    out.mkdir(parents=True)
    procs = min(processes, case.workers)
    row: dict[str, Any] = {"params": case.params, "workers": case.workers, "fraction": case.fraction,
                           "processes": procs, "rounds": rounds, "load_before": list(os.getloadavg()),
                           "command": "python -m fedfleet coordinator " + " ".join(
                               coordinator_argv(case, rounds, Path("$OUT"))[1:])
                           + f"; {procs} x python -m fedfleet worker --clients K (K = N / {procs})"}
    t0 = time.monotonic()
    coord = spawn(coordinator_argv(case, rounds, out), workdir / f"{out.name}-coordinator.log")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        url = _url(out, coord)
        workers = spawn_workers(case, procs, url, out, workdir)
        cpu_first = t_first = None
        end = t0 + timeout
        while time.monotonic() < end and coord.poll() is None:
            done = _recorded(out)
            if done >= 1 and cpu_first is None:
                cpu_first, t_first = cpu_seconds(coord.pid), time.monotonic()
            if done >= rounds:
                row["coordinator_cpu_s"] = cpu_seconds(coord.pid) - (cpu_first or 0.0)
                row["steady_wall_s"] = time.monotonic() - (t_first or t0)
                row["coordinator_rss"] = vm_hwm(coord.pid)
                row["worker_rss_max"] = max(vm_hwm(w.pid) for w in workers)
                row["worker_rss_mean"] = statistics.mean(vm_hwm(w.pid) for w in workers)
                break
            time.sleep(0.02)
        if "coordinator_cpu_s" not in row:
            return {**row, "error": f"no {rounds} rounds within {timeout:.0f} s (exit {coord.poll()})"}
        coord.wait(timeout=60)
    finally:
        stop_all([*workers, coord])
    row["load_after"] = list(os.getloadavg())
    records = RunDir(out).read_rounds()
    steady = records[1:]
    sampled = sum(r.sampled for r in steady)
    row.update({
        "rounds_s": [r.seconds for r in records],
        "round_s": statistics.median(r.seconds for r in steady),
        "first_round_recorded_s": (t_first or t0) - t0,
        "sampled_per_round": statistics.mean(r.sampled for r in steady),
        "cpu_per_round_s": row["coordinator_cpu_s"] / len(steady),
        "cpu_per_worker_round_ms": 1000 * row["coordinator_cpu_s"] / sampled,
        "model_bytes": 4 * case.params,
        "rss_goal": 3 * 4 * case.params + 200 * MIB,
    })
    shutil.rmtree(out, ignore_errors=True)
    return row


# --- results -------------------------------------------------------------------------------------------------
def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| params | N | fraction | processes | s/round | coordinator CPU s/round | CPU ms per sampled "
             "worker-round | idle coordinator CPU % | coordinator peak RSS MiB (goal) | worker process peak RSS MiB "
             "(max) | round 1 recorded after s | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        load = f"{r['load_before'][0]:.1f} → {r.get('load_after', [float('nan')])[0]:.1f}"
        idle = f"{100 * r['idle_cpu_share']:.1f}" if "idle_cpu_share" in r else "—"
        if "error" in r:
            lines.append(f"| {r['params']:,} | {r['workers']} | {r['fraction']:g} | {r['processes']} | error: "
                         f"{r['error'][:80]} | | | | | | | {load} |")
            continue
        lines.append(
            f"| {r['params']:,} | {r['workers']} | {r['fraction']:g} | {r['processes']} | {r['round_s']:.3f} | "
            f"{r['cpu_per_round_s']:.3f} | {r['cpu_per_worker_round_ms']:.2f} | {idle} | "
            f"{r['coordinator_rss'] / MIB:.0f} ({r['rss_goal'] / MIB:.0f}) | {r['worker_rss_max'] / MIB:.0f} | "
            f"{r['first_round_recorded_s']:.1f} | {load} |")
    return lines


def verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    ok = [r for r in rows if "error" not in r]
    out: dict[str, str] = {}
    small = next((r for r in ok if r["workers"] == 100 and r["fraction"] < 1), None)
    large = next((r for r in ok if r["workers"] == 1000), None)
    if small and large:
        at_large, at_small = large["cpu_per_worker_round_ms"], small["cpu_per_worker_round_ms"]
        out["cpu"] = f"{at_large:.2f} ms at N = 1,000 against {at_small:.2f} ms at N = 100 ({at_large / at_small:.2f}x)"
    rss = [r for r in ok if r["workers"] >= 1000 or (r["params"] >= 1_000_000 and r["workers"] >= 100)]
    if rss:
        out["rss"] = "; ".join(f"{r['params']:,} x {r['workers']}: {r['coordinator_rss'] / MIB:.0f} MiB of at most "
                               f"{r['rss_goal'] / MIB:.0f} ({_met(r['coordinator_rss'] <= r['rss_goal'])})"
                               for r in rss)
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    v = result["verdicts"]
    return f"""# Scale: the coordinator's cost against the number of workers ({m['date']})

`{m['command']}`, {m['seconds'] / 60:.1f} min in all, at commit {m['commit']}.

- Machine: {m['machine']}; {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; load average
  {', '.join(f'{x:.1f}' for x in m['load_start'])} at the start. The machine is shared with other work: each
  case's 1-minute load average before and after it is in the table.
- Each case: one coordinator and N logical workers in `processes` worker processes (`--clients K`), the `null`
  task of P float32 parameters, {m['rounds']} rounds, `--fraction` of the live workers sampled per round,
  `--quorum 1`, default registration rate (20/s after a burst of 200). Per case:
  `{result['rows'][0]['command'] if result['rows'] else ''}`.
- s/round: median of rounds 2..R as the coordinator records them. Coordinator CPU: user + system seconds of
  its process over rounds 2..R (from /proc), per round and per sampled worker-round. Peak RSS: VmHWM.
  Idle coordinator CPU: its CPU use (% of one core) over {m['idle']:g} s with all N workers registered and
  waiting for a round that does not open (a second coordinator with one partition more than workers): the cost
  of idle workers' long-polls and heartbeats. Round 1 recorded after: seconds from starting the processes until
  round 1 was recorded (registration at the default rate included).

{chr(10).join(result['table'])}

- {GOAL_CPU}: {v.get('cpu', 'not measured')}.
- {GOAL_RSS}: {v.get('rss', 'not measured')}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only " + ", ".join(c.label for c in QUICK))
    ap.add_argument("--case", action="append", metavar="PxN[:FRACTION]", help="run only this case, e.g. 100000x1000")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per case (the first is not counted)")
    ap.add_argument("--processes", type=int, default=8, help="worker processes the N workers are spread over")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a case may take")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds to measure the coordinator's CPU with every "
                    "worker registered and idle (0: skip)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for scale.json and scale.md")
    args = ap.parse_args(argv)
    cases = [parse_case(c) for c in args.case] if args.case else QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so that the processes a case started are stopped (they run in their own sessions).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    at_commit = commit()  # the code the cases run, even if the checkout moves on meanwhile
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="fedfleet-scale-"))
    try:
        for case in cases:
            r = run_case(case, args.rounds, args.processes, workdir, args.timeout)
            if args.idle > 0 and "error" not in r:
                r.update(idle_cpu(case, args.processes, workdir, args.idle, args.timeout))
            rows.append(r)
            print(table_lines([r])[-1], flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = table_lines(rows)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/scale.py"
            + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
            "seconds": time.perf_counter() - t_start, "commit": at_commit, "machine": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model(), "memory_gib": memory_gib(),
            "load_start": load_start, "load_end": list(os.getloadavg()), "python": platform.python_version(),
            "rounds": args.rounds, "processes": args.processes, "idle": args.idle}
    said = verdicts(rows)
    result: dict[str, Any] = {"meta": meta, "goals": {"cpu": GOAL_CPU, "rss": GOAL_RSS}, "verdicts": said,
                              "rows": rows, "table": table}
    print("\n" + "\n".join(table))
    for key, text in said.items():
        print(f"{key}: {text}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "scale.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (args.results / "scale.md").write_text(markdown(result))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
