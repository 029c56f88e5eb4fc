"""A large model through a real coordinator and real workers: seconds per round and peak memory.

The ``null`` task with P float32 parameters (default 125M: a 500 MB model), N worker processes on
loopback, R rounds. The coordinator's and each worker's peak resident memory is read from
``/proc/PID/status`` (VmHWM) while they run. With ``--cut`` every worker talks to the coordinator
through a TCP proxy that breaks the first model download and the first update upload halfway, once
each, so the run shows the transfers resuming (HTTP Range, chunked upload) instead of starting again.

    python benchmarks/large_model.py                       # 500 MB, 3 workers, 2 rounds, and again with --cut
    python benchmarks/large_model.py --params 25000000     # a smaller model

Writes benchmarks/results/large_model.json and large_model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedfleet.storage.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT / "tests"))

from tcp_proxy import CutProxy  # noqa: E402 - the test suite's proxy, shared so both cut the same way

MB = 1_000_000


def vm_hwm(pid: int) -> int:
    """Peak resident set of ``pid`` in bytes (VmHWM), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakWatcher(threading.Thread):
    """Keeps the latest VmHWM of each process (VmHWM only grows, so the last reading is the peak)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for name, pid in list(self.pids.items()):
                self.peak[name] = max(self.peak.get(name, 0), vm_hwm(pid))


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", "--log-level", "INFO", *args], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def run_case(params: int, workers: int, rounds: int, cut: bool, workdir: Path) -> dict[str, object]:
    data = workdir / "coordinator"
    watcher = PeakWatcher()
    watcher.start()
    procs: list[subprocess.Popen[bytes]] = []
    proxies: list[CutProxy] = []
    try:
        coord = _spawn(["coordinator", "--task", "null", "--task-option", f"params={params}",
                        "--workers", str(workers), "--rounds", str(rounds), "--quorum", "1",
                        "--round-timeout", "600", "--worker-timeout", "120", "--linger", "1",
                        "--data-dir", str(data), "--host", "127.0.0.1", "--port", "0"], workdir / "coordinator.log")
        procs.append(coord)
        watcher.pids["coordinator"] = coord.pid
        address = data / "coordinator.json"
        end = time.monotonic() + 120
        while not address.exists() or json.loads(address.read_text() or "{}").get("pid") != coord.pid:
            if coord.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"coordinator did not start; see {workdir / 'coordinator.log'}")
            time.sleep(0.1)
        url = json.loads(address.read_text())["url"]
        port = int(url.rsplit(":", 1)[1])
        t0 = time.perf_counter()
        for i in range(workers):
            target = url
            if cut:
                # Cut the first model download and the first upload chunk halfway through, once each.
                proxy = CutProxy(port, down=[params * 2], up=[params * 2])
                proxies.append(proxy)
                target = proxy.url
            w = _spawn(["worker", "--coordinator", target, "--state-dir", str(workdir / f"w{i}")],
                       workdir / f"worker-{i}.log")
            procs.append(w)
            watcher.pids[f"worker-{i}"] = w.pid
        if coord.wait(timeout=1800) != 0:
            raise RuntimeError(f"coordinator failed; see {workdir / 'coordinator.log'}")
        wall = time.perf_counter() - t0
        for p in procs[1:]:
            p.wait(timeout=60)
    finally:
        watcher.stop.set()
        watcher.join()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for proxy in proxies:
            proxy.close()
    records = RunDir(data).read_rounds()
    logs = "".join((workdir / f"worker-{i}.log").read_text(errors="replace") for i in range(workers))
    model_bytes = params * 4
    coord_peak = watcher.peak.get("coordinator", 0)
    worker_peak = max(v for k, v in watcher.peak.items() if k.startswith("worker"))
    return {
        "params": params, "model_mb": model_bytes / MB, "workers": workers, "rounds": rounds, "cut": cut,
        "round_s": statistics.median(r.seconds for r in records),
        "round_s_each": [round(r.seconds, 2) for r in records],
        "transfer_s": statistics.median(r.timings.open for r in records),
        "aggregate_s": statistics.median(r.timings.aggregate for r in records),
        "checkpoint_s": statistics.median(r.timings.checkpoint for r in records),
        "wall_s": wall,
        "coordinator_peak_mb": coord_peak / MB, "coordinator_peak_x_model": coord_peak / model_bytes,
        "worker_peak_mb": worker_peak / MB,
        "download_resumes": logs.count("model.resumed"),
        "upload_resumes": logs.count("update.resumed"),
        # Through the proxies, over what the transfers need (a model down and an update up per worker and
        # round): near 1.0 when broken transfers resume, about 1.5 if they started again from zero.
        "proxied_x_needed": (sum(p.forwarded["down"] + p.forwarded["up"] for p in proxies)
                             / (2 * model_bytes * workers * rounds)) if proxies else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=125_000_000, help="float32 parameters (125M = 500 MB)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-cut", action="store_true", help="skip the run with interrupted transfers")
    args = ap.parse_args()
    rows = []
    for cut in (False,) if args.no_cut else (False, True):
        workdir = Path(tempfile.mkdtemp(prefix="fedfleet-large-"))
        try:
            rows.append(run_case(args.params, args.workers, args.rounds, cut, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        r = rows[-1]
        print(f"{r['model_mb']:.0f} MB x {r['workers']} workers{' (cut)' if cut else ''}: round {r['round_s']:.1f} s, "
              f"coordinator peak {r['coordinator_peak_mb']:.0f} MB ({r['coordinator_peak_x_model']:.2f}x model), "
              f"worker peak {r['worker_peak_mb']:.0f} MB, resumes: {r['download_resumes']} downloads, "
              f"{r['upload_resumes']} uploads", flush=True)
    header = ("| model MB | workers | rounds | transfers cut | s per round | transfers+train s | aggregate s "
              "| checkpoint s | coordinator peak RSS MB | x model | worker peak RSS MB | downloads resumed "
              "| uploads resumed | bytes sent / needed |\n"
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['model_mb']:.0f} | {r['workers']} | {r['rounds']} | {'yes' if r['cut'] else 'no'} "
        f"| {r['round_s']:.1f} | {r['transfer_s']:.1f} | {r['aggregate_s']:.1f} | {r['checkpoint_s']:.1f} "
        f"| {r['coordinator_peak_mb']:.0f} | {r['coordinator_peak_x_model']:.2f} "
        f"| {r['worker_peak_mb']:.0f} | {r['download_resumes']} | {r['upload_resumes']} "
        f"| {'-' if r['proxied_x_needed'] is None else format(r['proxied_x_needed'], '.3f')} |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/large_model.py " + " ".join(sys.argv[1:])}
    (RESULTS / "large_model.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "large_model.md").write_text(
        f"# Large model through the coordinator ({meta['date']}, {meta['cpus']} CPUs, Python {meta['python']})\n\n"
        f"`{meta['command'].strip()}`: the `null` task, worker processes on loopback. Seconds per round = "
        "median over rounds as the coordinator measures them (transfers both ways, aggregation, evaluation, "
        "checkpoint). Peak RSS = VmHWM of the process. With transfers cut, each worker goes through a TCP "
        "proxy that breaks its first model download and its first upload halfway, once each; they resume "
        "from where they stopped.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
