"""What a real training round costs: the MNIST CNN with 10 workers, next to the work it cannot avoid.

In one benchmark run, for each setting (``--val-fraction``, ``--processes``):

1. **The work alone.** The ten local fits the workers do (the same task and worker code: each of the
   10 IID partitions loaded by ``worker.trainer.Trainer``, E=1, B=32, lr 0.05, all from the same initial
   model), spread over the cores as well as can be: one process per usable CPU, one torch thread each,
   data loaded and the model warmed up before the clock starts, the fits dealt out round-robin. With a
   validation split (``--val-fraction`` > 0) each worker also scores the global model on it before it
   trains, as a worker does, and that is part of the work too. Plus one evaluation of the model on the
   10k test set with every core (as the coordinator does it, while the workers wait). Both are timed
   before and after the run; the smaller of each is kept (the stricter goal). Their CPU seconds too.
2. **The round.** A real ``fedfleet run --task mnist`` (CNN) with 10 workers, fraction 1, E=1, B=32,
   lr 0.05, 5 rounds, the default ``--processes`` unless ``--processes`` says otherwise; seconds per
   steady round = median of rounds 2..R as the coordinator records them (metrics.jsonl ``seconds``).
3. **Memory** while the run goes: the sum over its processes (``fedfleet run``, the coordinator, the
   worker processes) of RSS, and of PSS (shared pages divided among the processes that share them), both
   at their peak, sampled from /proc every 0.5 s (PSS every 10 s); and the drop in free RAM (MemAvailable
   before the run less its lowest value during it; other work on the machine moves it too). And the CPU seconds of all
   the run's processes per steady round, which other work on the machine hardly moves: against the CPU
   seconds of the work alone, what fedfleet adds to it.

The goal (issue 16): round <= 1.05 x (fits spread + one evaluation).

    python benchmarks/mnist_cost.py                          # val fraction 0 and 0.1, default --processes
    python benchmarks/mnist_cost.py --val-fraction 0 --processes 0 --processes 8   # the default against 8

Needs the MNIST files in $FEDFLEET_MNIST_DIR (``fedfleet data download mnist``) and torch. Writes
benchmarks/results/mnist_cost.json and mnist_cost.md (or into --results).
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when imported by path
from machine import commit, cpu_model, versions

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.05
GOAL = ("the MNIST CNN with 10 workers (E=1, B=32, lr 0.05, every worker every round, the coordinator evaluating "
        "on the 10k test set) costs no more than 1.05 x (the ten local fits spread over the cores + one evaluation)")
# What the issue quotes (2 cores, same run): seconds per round and memory held (sum of RSS).
ISSUE_REFERENCE = [
    {"what": "fedfleet, --processes 8 (the old default)", "round_s": 23.3, "rss_gib": 4.5, "drop_gib": 3.5},
    {"what": "fedfleet, --processes 2", "round_s": 22.0, "rss_gib": 2.2, "drop_gib": None},
    {"what": "Flower simulation, 2 Ray actors", "round_s": 27.4, "rss_gib": 2.6, "drop_gib": None},
]
GIB = 2**30
# A row is judged only if the machine was quiet enough for its seconds to mean something: the load average at
# most its CPUs before and after the run, and the two timings of the work alone within 10% of each other.
QUIET_SPREAD = 1.10
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- 1. the work alone -----------------------------------------------------------------------------------

def fit_child(spec: dict[str, Any]) -> None:
    """In a child process: load the partitions given, warm up, say READY, wait for GO, then for each
    partition evaluate on its validation split (if any) and fit, as a worker does; print the times as JSON."""
    from fedfleet.protocol.messages import PartitionInfo, TrainParamsMsg
    from fedfleet.tasks import load_task
    from fedfleet.tasks.base import Dataset, TrainParams
    from fedfleet.worker.trainer import Trainer

    task = load_task("mnist", {"model": spec["model"], **({"examples": str(spec["examples"])}
                                                          if spec["examples"] else {})})
    weights = task.init_weights(spec["seed"])
    trainers = [Trainer(task, PartitionInfo(name=f"bench-{i}", index=i, count=spec["workers"], scheme="iid",
                                            seed=spec["seed"], val_fraction=spec["val_fraction"]))
                for i in spec["partitions"]]
    for t in trainers:
        t.data  # noqa: B018  (loaded before the clock starts, as a worker loads it when it registers)
    params = TrainParamsMsg(local_epochs=spec["epochs"], batch_size=spec["batch"], lr=spec["lr"], seed=spec["seed"],
                            prox_mu=0.0)
    warm = trainers[0].data
    task.fit(weights, Dataset(warm.x[:256], warm.y[:256]), TrainParams(1, spec["batch"], spec["lr"], 0, 0.0))
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    times = []
    for t in trainers:
        t0, c0 = time.perf_counter(), time.process_time()
        t.evaluate(weights)
        t1 = time.perf_counter()
        t.fit(weights, params)
        times.append({"evaluate_s": t1 - t0, "fit_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c0})
    print("RESULT " + json.dumps(times), flush=True)


def fits_spread(args: argparse.Namespace, val_fraction: float, cpus: int) -> dict[str, Any]:
    """Wall seconds of the workers' local work (the ten fits, and their validation scoring) over ``cpus``
    processes of one torch thread each, from GO to the last one done."""
    env = {**os.environ, "FEDFLEET_TORCH_THREADS": "1"}
    children: list[subprocess.Popen[str]] = []
    try:
        for j in range(min(cpus, args.workers)):
            spec = {"model": args.model, "examples": args.examples, "seed": args.seed, "workers": args.workers,
                    "partitions": list(range(j, args.workers, cpus)), "val_fraction": val_fraction,
                    "epochs": args.local_epochs, "batch": args.batch_size, "lr": args.lr}
            children.append(subprocess.Popen([sys.executable, __file__, "--fit-child", json.dumps(spec)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a fit process did not get ready: {line!r}")
        t0 = time.perf_counter()
        for c in children:
            assert c.stdin is not None
            c.stdin.write("GO\n")
            c.stdin.flush()
        per: list[dict[str, float]] = []
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line.startswith("RESULT "):
                raise RuntimeError(f"a fit process failed: {line!r}")
            per += json.loads(line[len("RESULT "):])
        wall = time.perf_counter() - t0
    finally:
        for c in children:
            with contextlib.suppress(OSError):
                if c.stdin is not None:
                    c.stdin.close()
            c.wait(timeout=60)
    return {"wall_s": wall, "processes": len(children), "fit_s": [p["fit_s"] for p in per],
            "local_evaluate_s": [p["evaluate_s"] for p in per], "cpu_s": sum(p["cpu_s"] for p in per)}


def evaluate_seconds(args: argparse.Namespace, cpus: int, repeat: int = 3) -> dict[str, float]:
    """Median wall and CPU seconds of ``repeat`` evaluations of the initial model on the 10k test set on ``cpus``
    torch threads (after one to warm up), as the coordinator evaluates: between rounds, with the cores to itself."""
    from fedfleet.tasks import load_task, torch_common

    threads = torch_common.threads()
    torch_common.use_threads(cpus)
    try:
        task = load_task("mnist", {"model": args.model})
        weights = task.init_weights(args.seed)
        test = task.load_test()
        task.evaluate(weights, test)
        times, cpu = [], []
        for _ in range(repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            task.evaluate(weights, test)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    finally:
        torch_common.use_threads(threads)  # as it was (this may be a test's process)
    return {"wall_s": statistics.median(times), "cpu_s": statistics.median(cpu)}


# --- 2. the round, 3. its memory -------------------------------------------------------------------------

def _meminfo(field: str = "MemAvailable") -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/meminfo")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry.name}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids = _children()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "run"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    return "coordinator" if b"coordinator" in argv else "worker" if b"worker" in argv else "other"


def _kib(path: str, field: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class MemorySampler:
    """Samples the process tree under ``root`` every ``every`` s: the peak sum of RSS and of PSS (all of it and
    by role), the lowest MemAvailable, and the tree's CPU seconds at the sample when ``metrics`` first held each
    number of rounds (so the CPU of the steady rounds can be told apart from the start's)."""

    def __init__(self, root: int, metrics: Path, every: float = 0.5, pss_every: int = 20) -> None:
        # PSS costs the kernel a walk of every page table (~10 ms a process of torch): read every 10 s, not to
        # take a share of the cores from the run; memory is level through the steady rounds.
        self.root, self.metrics, self.every, self.pss_every = root, metrics, every, pss_every
        # rounds recorded -> (monotonic time, tree CPU s, CPU s by role)
        self.at_round: dict[int, tuple[float, float, dict[str, float]]] = {}
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_by_role: dict[str, int] = {}
        self.min_available = _meminfo()
        self.processes = 0
        self.samples = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            rss = pss = 0
            cpu = 0.0
            by_role: dict[str, int] = {}
            cpu_by_role: dict[str, float] = {}
            now = time.monotonic()
            pids = _tree(self.root)
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    r = _kib(f"/proc/{pid}/status", "VmRSS")
                    p = _kib(f"/proc/{pid}/smaps_rollup", "Pss") if self.samples % self.pss_every == 0 else 0
                    c = _cpu_seconds(pid)
                    cpu += c
                    rss, pss = rss + r, pss + p
                    role = _role(pid, self.root)
                    by_role[role] = by_role.get(role, 0) + r
                    cpu_by_role[role] = cpu_by_role.get(role, 0.0) + c
            try:
                rounds = self.metrics.read_bytes().count(b"\n")
            except OSError:
                rounds = 0
            for n in range(rounds + 1):  # a round that ended between two samples is dated by the later one
                self.at_round.setdefault(n, (now, cpu, cpu_by_role))
            if rss > self.peak_rss:
                self.peak_rss, self.peak_by_role = rss, by_role
            self.peak_pss = max(self.peak_pss, pss)
            self.processes = max(self.processes, len(pids))
            self.min_available = min(self.min_available, _meminfo())
            self.samples += 1
            self.stop.wait(self.every)


def run_command(args: argparse.Namespace, val_fraction: float, processes: int | None, out: Path) -> list[str]:
    cmd = ["fedfleet", "run", "--task", "mnist", "--task-option", f"model={args.model}"]
    if args.examples:
        cmd += ["--task-option", f"examples={args.examples}"]
    cmd += ["--workers", str(args.workers), "--fraction", "1", "--local-epochs", str(args.local_epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--rounds", str(args.rounds),
            "--val-fraction", str(val_fraction), "--seed", str(args.seed), "--quorum", "1",
            "--round-timeout", "3600"]
    if processes:
        cmd += ["--processes", str(processes)]
    return [*cmd, "--out", str(out), "--overwrite", "--quiet"]


def run_fedfleet(args: argparse.Namespace, val_fraction: float, processes: int | None, workdir: Path
                 ) -> dict[str, Any]:
    from fedfleet.storage.run_dir import RunDir

    out = workdir / f"run-v{val_fraction}-p{processes or 'default'}"
    cmd = run_command(args, val_fraction, processes, out)
    shown = " ".join(cmd).replace(str(out), "OUT")
    baseline = statistics.median(_meminfo() for _ in range(5))
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", *cmd[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid, out / "metrics.jsonl", every=args.sample_every)
    sampler.thread.start()
    output, _ = proc.communicate()
    sampler.stop.set()
    sampler.thread.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{shown} exited with {proc.returncode}:\n{output[-2000:]}")
    records = RunDir(out).read_rounds()
    steady = records[1:] if len(records) > 1 else records
    workers = [int(p.name.split("-")[1].split(".")[0]) for p in (out / "logs").glob("worker-*.log")]
    # CPU of every process of the run (fedfleet run, coordinator, workers) from the end of round 1 to the end of
    # the last, per round: what the steady rounds cost in CPU, whatever else the machine was doing.
    first, last = sampler.at_round.get(1), sampler.at_round.get(len(records))
    steady_cpu = steady_wall = None
    cpu_by_role: dict[str, float] = {}
    if first is not None and last is not None and len(records) > 1 and last[0] > first[0]:
        steady_wall = (last[0] - first[0]) / (len(records) - 1)
        steady_cpu = (last[1] - first[1]) / (len(records) - 1)
        cpu_by_role = {k: (v - first[2].get(k, 0.0)) / (len(records) - 1) for k, v in sorted(last[2].items())}
    return {
        "command": shown, "wall_s": wall, "processes": len(workers), "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "rounds_s": [r.seconds for r in records], "round_s": statistics.median(r.seconds for r in steady),
        "open_s": statistics.median(r.timings.open for r in steady),
        "aggregate_s": statistics.median(r.timings.aggregate for r in steady),
        "evaluate_s": statistics.median(r.timings.evaluate for r in steady),
        "checkpoint_s": statistics.median(r.timings.checkpoint for r in steady),
        "worker_train_s": statistics.median(r.worker_metrics.get("train_s", 0.0) for r in steady),
        "participants": [r.participants for r in records],
        "cpu_per_round_s": steady_cpu, "wall_per_round_s": steady_wall, "cpu_per_round_by_role_s": cpu_by_role,
        "final_accuracy": records[-1].accuracy if records else None,
        "memory": {"rss_peak_gib": sampler.peak_rss / GIB, "pss_peak_gib": sampler.peak_pss / GIB,
                   "rss_peak_by_role_gib": {k: v / GIB for k, v in sorted(sampler.peak_by_role.items())},
                   "available_before_gib": baseline / GIB,
                   "drop_gib": max(0.0, baseline - sampler.min_available) / GIB,
                   "processes": sampler.processes, "samples": sampler.samples},
    }


# --- the report ------------------------------------------------------------------------------------------

def row_of(val_fraction: float, processes: int | None, before: dict[str, Any], after: dict[str, Any],
           run: dict[str, Any]) -> dict[str, Any]:
    """The row of one setting: the run against the faster of the two timings of the work alone."""
    work = min(before, after, key=lambda w: w["wall_s"])
    eval_s = min(before["evaluation"]["wall_s"], after["evaluation"]["wall_s"])
    ideal = work["wall_s"] + eval_s
    ratio = run["round_s"] / ideal
    cpu_ideal = min(before["cpu_s"], after["cpu_s"]) + min(before["evaluation"]["cpu_s"], after["evaluation"]["cpu_s"])
    cpu_round = run["cpu_per_round_s"]
    return {"val_fraction": val_fraction, "processes_asked": processes, "processes": run["processes"],
            "round_s": run["round_s"], "fits_spread_s": work["wall_s"],
            "fits_spread_tries_s": [before["wall_s"], after["wall_s"]],
            "eval_tries_s": [before["evaluation"]["wall_s"], after["evaluation"]["wall_s"]],
            "fit_s_mean": statistics.mean(work["fit_s"]),
            "local_evaluate_s_mean": statistics.mean(work["local_evaluate_s"]), "eval_s": eval_s,
            "ideal_s": ideal, "ratio": ratio, "met": ratio <= GOAL_RATIO,
            "cpu_round_s": cpu_round, "cpu_ideal_s": cpu_ideal,
            "cpu_ratio": None if cpu_round is None else cpu_round / cpu_ideal,
            "rss_gib": run["memory"]["rss_peak_gib"], "pss_gib": run["memory"]["pss_peak_gib"],
            "drop_gib": run["memory"]["drop_gib"], "load_before": run["load_before"][0],
            "load_after": run["load_after"][0]}


def judge(row: dict[str, Any], cpus: int) -> dict[str, Any]:
    """``row`` with ``quiet``: whether the machine was quiet enough to judge the goal by it (see QUIET_SPREAD)."""
    tries = row["fits_spread_tries_s"]
    quiet = max(tries) <= QUIET_SPREAD * min(tries) and max(row["load_before"], row["load_after"]) <= cpus
    return {**row, "quiet": quiet}


def goal_verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    quiet = [r for r in rows if r["quiet"]]
    if not quiet:
        return {"met": None, "text": "not judged: the machine was busy during every row (load average above its "
                                     "CPUs, or the two timings of the work alone more than 10% apart)"}
    worst = max(quiet, key=lambda r: r["ratio"])
    met = all(r["met"] for r in quiet)
    return {"met": met, "text": f"{'met' if met else 'NOT met'}: round / ideal at most {worst['ratio']:.3f} over "
                                f"the {len(quiet)} row(s) measured on a quiet machine (goal at most {GOAL_RATIO})"}


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| val fraction | processes | round s | fits spread s | eval s | ideal s | round / ideal | goal | "
           "CPU s a round | CPU s ideal | CPU ratio | sum RSS GiB | sum PSS GiB | drop in free RAM GiB | load |",
           "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        procs = f"{r['processes']} (default)" if r["processes_asked"] is None else str(r["processes"])
        out.append(f"| {r['val_fraction']:g} | {procs} | {r['round_s']:.2f} | {r['fits_spread_s']:.2f} | "
                   f"{r['eval_s']:.2f} | {r['ideal_s']:.2f} | {r['ratio']:.3f} | "
                   f"{'met' if r['met'] else 'not met'}{'' if r['quiet'] else ' (busy: not judged)'} | "
                   f"{_s(r['cpu_round_s'], 1)} | {r['cpu_ideal_s']:.1f} | "
                   f"{_s(r['cpu_ratio'], 3)} | {r['rss_gib']:.2f} | {r['pss_gib']:.2f} | "
                   f"{r['drop_gib']:.2f} | {r['load_before']:.1f} → {r['load_after']:.1f} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    runs = "\n".join(
        f"| {r['val_fraction']:g} | {r['processes']} | {', '.join(f'{x:.2f}' for x in r['rounds_s'])} | "
        f"{r['open_s']:.2f} | {r['aggregate_s']:.3f} | {r['evaluate_s']:.2f} | {r['checkpoint_s']:.3f} | "
        f"{r['worker_train_s']:.2f} | {_acc(r['final_accuracy'])} | "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["memory"]["rss_peak_by_role_gib"].items()) + " | "
        + ", ".join(f"{k} {v:.1f}" for k, v in r.get("cpu_per_round_by_role_s", {}).items())
        + f" | {r['wall_s']:.0f} |" for r in result["runs"])
    commands = "\n".join(f"    {r['command']}" for r in result["runs"])
    issue = "\n".join(f"| {i['what']} | {i['round_s']} | {i['rss_gib']} | {i['drop_gib'] or ''} |"
                      for i in ISSUE_REFERENCE)
    return f"""# The MNIST CNN, 10 workers: a round against the work in it, and memory ({m['date']})

- Command: `{m['command']}` ({m['seconds'] / 60:.1f} min in all), at fedfleet commit {m['commit']}
- Machine: {m['machine']}; {m['cpus']} usable CPUs ({m['cpu_model']}), {m['memory_gib']} GiB; load average
  {', '.join(f'{x:.1f}' for x in m['load_start'])} at the start (the machine is shared: other work may have been
  running; each run's 1-minute load average before and after it is in the table)
- Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}

**Goal** (issue 16): {GOAL}. **{result['goal']['text']}.**

*Round* is the median of rounds 2..{m['rounds']} of a real run (`seconds` in metrics.jsonl: from the round's
start to its checkpoint, the coordinator's evaluation included):

{commands}

*Fits spread* is the wall time of the same local work alone: the {m['workers']} workers' partitions loaded with
the worker's own code (`Trainer`), each fitted once (E={m['local_epochs']}, B={m['batch_size']}, lr {m['lr']})
from the same model, by {m['cpus']} processes of one torch thread each, data loaded and warmed up before the
clock starts; with a validation split each worker's scoring of the global model on it is included, as the
worker does it. *Eval* is one evaluation on the 10k test set with {m['cpus']} torch threads (median of 3). Both
are timed before and after the run, and the faster of each kept (all in the JSON). *Ideal* = fits spread + eval.
Memory: the peak over the run of the sum of RSS, and of PSS (shared pages split among the processes sharing
them), of `fedfleet run`, the coordinator and the worker processes, sampled every 0.5 s (PSS every 10 s); the
drop in free RAM is MemAvailable before the run less its lowest value during it (other work on the machine
moves it too).
*CPU s a round* is the CPU time (user + system) of all the run's processes from the end of round 1 to the end
of the last round, per round; *CPU s ideal* the CPU time of the fits spread (the smaller try) plus one
evaluation's. CPU seconds move less than seconds with other work on the machine (they still move: a thread
that waits for a core keeps its caches cold, and torch's OpenMP threads spin while they wait for each other), so
their ratio is a rougher but steadier view of what fedfleet adds to the work. A row's goal is judged only if
the machine was quiet: load average at most {m['cpus']} before and after the run, and the two timings of the
work alone within {QUIET_SPREAD - 1:.0%} of each other.

{chr(10).join(table_lines(result['rows']))}

## Each run

| val fraction | processes | each round s | open s | aggregate s | evaluate s | checkpoint s | worker train_s \
| final accuracy | peak RSS by process GiB | CPU s a round by process | wall s |
|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|
{runs}

*open* is the round's open phase (model download, the workers' evaluation and training, the uploads);
*worker train_s* the median over rounds of the workers' mean fit seconds (logical workers of one process train
side by side, so each fit takes longer than alone).

## What the issue quotes for the same run on this kind of machine (2 cores)

| what | seconds per round | sum of RSS GiB | drop in free RAM GiB |
|---|---:|---:|---:|
{issue}
"""


def _s(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--val-fraction", type=float, action="append", help="the run's --val-fraction; repeat for "
                    "several rows (default: 0 and 0.1, fedfleet run's default)")
    ap.add_argument("--processes", type=int, action="append", help="the run's --processes (0: fedfleet run's "
                    "default); repeat for several rows (default: the default only)")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each run (the first is not counted)")
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    ap.add_argument("--examples", type=int, default=None, help="train on this many of the 60k images (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for mnist_cost.json and mnist_cost.md")
    ap.add_argument("--sample-every", type=float, default=0.5, help="seconds between two looks at the run's "
                    "processes in /proc (PSS every 20 looks)")
    ap.add_argument("--redraw", action="store_true", help="only rewrite mnist_cost.md from mnist_cost.json (in "
                    "--results), judging its rows again; runs nothing")
    ap.add_argument("--fit-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fit_child:
        fit_child(json.loads(args.fit_child))
        return 0
    if args.redraw:
        result = json.loads((args.results / "mnist_cost.json").read_text())
        result["rows"] = [judge(r, result["meta"]["cpus"]) for r in result["rows"]]
        result["goal"] = {"statement": GOAL, "ratio": GOAL_RATIO, **goal_verdict(result["rows"])}
        (args.results / "mnist_cost.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        (args.results / "mnist_cost.md").write_text(markdown(result))
        print("\n".join(table_lines(result["rows"])))
        return 0
    if not os.environ.get("FEDFLEET_MNIST_DIR"):
        print("set FEDFLEET_MNIST_DIR to the folder of the MNIST files (fedfleet data download mnist)", file=sys.stderr)
        return 2
    from fedfleet.tasks.torch_common import usable_cpus

    cpus = usable_cpus()
    fractions = args.val_fraction or [0.0, 0.1]
    processes = [p or None for p in (args.processes or [0])]
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    rows, runs = [], []
    workdir = Path(tempfile.mkdtemp(prefix="fedfleet-mnist-cost-"))
    try:
        for vf in fractions:
            for p in processes:
                before = {**fits_spread(args, vf, cpus), "evaluation": evaluate_seconds(args, cpus)}
                print(f"val {vf:g}: fits spread over {before['processes']} processes {before['wall_s']:.2f} s, "
                      f"evaluation on {cpus} threads {before['evaluation']['wall_s']:.2f} s", flush=True)
                run = run_fedfleet(args, vf, p, workdir)
                run["val_fraction"] = vf
                runs.append(run)
                print(f"val {vf:g}, {run['processes']} processes: round {run['round_s']:.2f} s (rounds "
                      + ", ".join(f"{x:.2f}" for x in run["rounds_s"])
                      + f"), sum RSS {run['memory']['rss_peak_gib']:.2f} GiB, PSS {run['memory']['pss_peak_gib']:.2f}"
                      f" GiB, drop {run['memory']['drop_gib']:.2f} GiB", flush=True)
                after = {**fits_spread(args, vf, cpus), "evaluation": evaluate_seconds(args, cpus)}
                print(f"val {vf:g}: fits spread again {after['wall_s']:.2f} s, evaluation "
                      f"{after['evaluation']['wall_s']:.2f} s", flush=True)
                rows.append(row_of(vf, p, before, after, run))
                rows[-1]["fits"] = {"before": before, "after": after}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/mnist_cost.py"
            + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
            "seconds": time.perf_counter() - t_start, "commit": commit(), "machine": platform.platform(),
            "cpus": cpus, "cpu_model": cpu_model(), "memory_gib": round(_meminfo("MemTotal") / GIB, 1),
            "load_start": load_start, "load_end": list(os.getloadavg()),
            "versions": versions("fedfleet", "torch", "numpy"),
            "workers": args.workers, "rounds": args.rounds, "local_epochs": args.local_epochs,
            "batch_size": args.batch_size, "lr": args.lr, "model": args.model, "examples": args.examples}
    rows = [judge(r, cpus) for r in rows]
    result = {"meta": meta, "goal": {"statement": GOAL, "ratio": GOAL_RATIO, **goal_verdict(rows)},
              "rows": rows, "runs": runs, "issue_reference": ISSUE_REFERENCE}
    print("\n" + "\n".join(table_lines(rows)) + f"\n\nGoal: {result['goal']['text']}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "mnist_cost.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (args.results / "mnist_cost.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
