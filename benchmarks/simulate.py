"""``fedfleet simulate`` against Flower's simulation engine, the same workloads in one benchmark run.

Workloads (each system trains the same model on the same partitions with the same settings):

- ``null``: 10,000 clients, 10 sampled a round, a model of 100K float32 parameters, no training work (each
  client returns the model plus one). What is measured is the engine: sampling, handing out, folding.
- ``mnist``: MNIST 2NN (784-200-200-10, 199,210 parameters), 1,000 clients with 60 training images each
  (IID), 10 sampled a round, E = 1, B = 10, lr = 0.1 (McMahan et al. 2017's 2NN settings); the server
  scores the 10k test images after every round in both systems.
- ``memory``: fedfleet alone, the ``null`` workload with 1,000, 10,000 and 100,000 clients: peak memory
  against the number of clients.

For each: seconds per steady round (median of the gaps between successive round ends over rounds 2..R,
from fedfleet's log and from Flower's server-side evaluation calls), seconds from launch to the end of the
first round and to the end of the run, and peak memory: the sum of the resident set sizes of the process
and all its descendants (Ray's included for Flower), sampled every 0.1 s from /proc (Linux only).

Flower is never a dependency of fedfleet: it runs from a throwaway virtualenv (``flower_env``), with torch
2.13.0 added there for the MNIST workload; if its install or a run fails, the error goes into the results.
Flower's clients each get one CPU (``client_resources``), so it runs one Ray actor per core, as fedfleet
runs one executor per core by default.

    python benchmarks/simulate.py                 # everything (about 10 min on 2 cores)
    python benchmarks/simulate.py --no-flower     # fedfleet only
    python benchmarks/simulate.py --ray           # also fedfleet's Ray backend (a local Ray instance)
    python benchmarks/simulate.py --only null     # one workload (null, mnist, memory)

MNIST comes from $FEDFLEET_MNIST_DIR (the IDX files); without it the mnist workload is skipped, saying so.
Writes benchmarks/results/simulate.json and simulate.md (or into --results).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when imported by path
from flower_env import FLOWER_VENV, ensure_flower, shown, venv_python
from machine import commit, cpu_model, memory_gib, versions, write_results

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {
    "null": "fedfleet at least 10x Flower's speed per round, and no slower to its first round",
    "mnist": "fedfleet at least 3x Flower's simulation speed per round",
    "memory": "peak memory flat in the number of clients",
}


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    sampled: int
    rounds: int
    params: int = 100_000  # null only


NULL = Workload("null", 10_000, 10, 20)
MNIST = Workload("mnist", 1_000, 10, 20)
MEMORY = [Workload("null", n, 10, 10) for n in (1_000, 10_000, 100_000)]


# --- measuring a process tree ----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(parent, []).append(int(entry.name))
    return out


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants now."""
    children = _children()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """The largest ``tree_rss(pid)`` seen, sampled every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, tree_rss(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def steady(ends: list[float]) -> float | None:
    """Median gap between successive round ends from round 2 on (round 1 pays for start-up)."""
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return statistics.median(gaps) if gaps else None


# --- fedfleet -------------------------------------------------------------------------------------------------
ROUND_CLOSED = re.compile(r"^(\S+ \S+) INFO fedfleet round\.closed .*round=(\d+) ")


def fedfleet_command(w: Workload, out: Path, backend: str = "local") -> list[str]:
    common = [*(["--backend", "ray"] if backend == "ray" else []),
              "--workers", str(w.clients), "--fraction", f"{w.sampled / w.clients:.10g}", "--rounds", str(w.rounds),
              "--val-fraction", "0", "--seed", "1", "--out", str(out), "--quiet", "--overwrite"]
    if w.name == "null":
        return ["simulate", "--task", "null", "--task-option", f"params={w.params}", *common]
    return ["simulate", "--task", "mnist", "--task-option", "model=mlp", "--local-epochs", "1", "--batch-size", "10",
            "--lr", "0.1", *common]


def run_fedfleet(w: Workload, workdir: Path, backend: str = "local") -> dict[str, Any]:
    out = workdir / f"fedfleet-{w.name}-{w.clients}-{backend}"
    argv = fedfleet_command(w, out, backend)
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    text = proc.communicate(timeout=1800)[0]
    ended = time.time()
    peak = memory.stop()
    system = "fedfleet" if backend == "local" else f"fedfleet ({backend})"
    row: dict[str, Any] = {"system": system, "workload": w.name, "clients": w.clients, "sampled": w.sampled,
                           "rounds": w.rounds,
                           "command": "fedfleet " + " ".join("OUT" if a == str(out) else a for a in argv),
                           "load_before": list(os.getloadavg())}
    if proc.returncode != 0:
        row["error"] = text[-2000:]
        return row
    ends = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in (ROUND_CLOSED.match(line) for line in (out / "logs" / "simulate.log").read_text().splitlines())
            if m]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row.update(round_s=steady(ends), first_round_s=ends[0] - launched if ends else None, wall_s=ended - launched,
               peak_rss_mb=peak / 2**20, final_accuracy=records[-1]["accuracy"] if records else None,
               engine_round_s=statistics.median(r["seconds"] for r in records[1:]) if len(records) > 1 else None)
    return row


# --- Flower ---------------------------------------------------------------------------------------------------
FLOWER_APP = textwrap.dedent('''
    """Written by fedfleet's benchmarks/simulate.py: the same workloads in Flower's simulation engine.
    Prints one line RESULT {json}: the time.time() of every server-side evaluation (round 0 included)."""
    import gzip
    import json
    import sys
    import time
    from pathlib import Path

    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    spec = json.loads(sys.argv[1])
    N, K, R = spec["clients"], spec["sampled"], spec["rounds"]
    marks, accuracy = [], []


    def idx(path):
        with gzip.open(path, "rb") as f:
            data = f.read()
        dims = data[3]
        shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


    def mnist():
        # On the sys module, not in a global: Ray ships client_fn to its actors by value (cloudpickle), with a
        # fresh copy of any global of this script, so a global cache would be empty at every call and each
        # client would read MNIST again. sys is imported by reference: one read per actor process.
        _cache = sys.__dict__.setdefault("_fedfleet_bench_mnist", {})
        if not _cache:
            root = Path(spec["mnist_dir"])
            x = idx(root / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
            y = idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
            order = np.random.default_rng(0).permutation(len(y))
            _cache["shards"] = np.array_split(order, N)
            _cache["x"], _cache["y"] = x, y
        return _cache


    if spec["workload"] == "null":
        initial = [np.zeros(spec["params"], dtype=np.float32)]

        class Client(NumPyClient):
            def fit(self, parameters, config):
                return [p + 1 for p in parameters], 1, {}

        def client_fn(context: Context):
            return Client().to_client()

        def evaluate_fn(server_round, parameters, config):
            marks.append(time.time())
            return float(parameters[0][:1000].mean()), {}
    else:
        import torch

        torch.set_num_threads(1)

        def net():
            return torch.nn.Sequential(torch.nn.Linear(784, 200), torch.nn.ReLU(), torch.nn.Linear(200, 200),
                                       torch.nn.ReLU(), torch.nn.Linear(200, 10))

        def get(model):
            return [p.detach().numpy().copy() for p in model.state_dict().values()]

        def put(model, arrays):
            model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(model.state_dict(), arrays)})

        torch.manual_seed(1)
        initial = get(net())

        class Client(NumPyClient):
            def __init__(self, pid):
                self.pid = pid

            def fit(self, parameters, config):
                data = mnist()
                rows = data["shards"][self.pid]
                x, y = torch.from_numpy(data["x"][rows]), torch.from_numpy(data["y"][rows])
                model = net()
                put(model, parameters)
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(1):
                    order = torch.randperm(len(y))
                    for s in range(0, len(y), 10):
                        b = order[s:s + 10]
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                        opt.step()
                return get(model), len(y), {}

        def client_fn(context: Context):
            return Client(int(context.node_config["partition-id"])).to_client()

        root = Path(spec["mnist_dir"])
        tx = torch.from_numpy(idx(root / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0)
        ty = torch.from_numpy(idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64))

        def evaluate_fn(server_round, parameters, config):
            model = net()
            put(model, parameters)
            with torch.no_grad():
                out = model(tx)
            acc = float((out.argmax(1) == ty).float().mean())
            accuracy.append(acc)
            marks.append(time.time())
            return float(torch.nn.functional.cross_entropy(out, ty)), {"accuracy": acc}


    def server_fn(context: Context):
        strategy = FedAvg(fraction_fit=K / N, fraction_evaluate=0.0, min_fit_clients=K, min_evaluate_clients=0,
                          min_available_clients=N, initial_parameters=ndarrays_to_parameters(initial),
                          evaluate_fn=evaluate_fn)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=R))


    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=N, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    print("RESULT " + json.dumps({"marks": marks, "accuracy": accuracy}), flush=True)
''')


def run_flower(w: Workload, python: Path, workdir: Path, mnist_dir: str | None) -> dict[str, Any]:
    app = workdir / "flower_simulate_app.py"
    app.write_text(FLOWER_APP)
    spec = {"workload": w.name, "clients": w.clients, "sampled": w.sampled, "rounds": w.rounds, "params": w.params,
            "mnist_dir": mnist_dir}
    row: dict[str, Any] = {"system": "flower", "workload": w.name, "clients": w.clients, "sampled": w.sampled,
                           "rounds": w.rounds, "load_before": list(os.getloadavg())}
    launched = time.time()
    proc = subprocess.Popen([str(python), str(app), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=workdir,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    memory = PeakMemory(proc.pid)
    try:
        text = proc.communicate(timeout=1800)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        text = proc.communicate()[0]
    ended = time.time()
    peak = memory.stop()
    result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        row["error"] = text[-2000:]
        return row
    ends = result["marks"][1:]  # marks[0] is the evaluation of the initial model, before round 1
    row.update(round_s=steady(ends), first_round_s=ends[0] - launched if ends else None, wall_s=ended - launched,
               peak_rss_mb=peak / 2**20, final_accuracy=result["accuracy"][-1] if result["accuracy"] else None)
    return row


# --- the report -----------------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fedfleet against Flower per workload: the speed-up per round and to the first round."""
    out = []
    for name in ("null", "mnist"):
        ff = next((r for r in rows if r["system"] == "fedfleet" and r["workload"] == name and "error" not in r
                   and r["clients"] == (NULL if name == "null" else MNIST).clients), None)
        fl = next((r for r in rows if r["system"] == "flower" and r["workload"] == name and "error" not in r), None)
        if ff and fl and ff.get("round_s") and fl.get("round_s"):
            out.append({"workload": name, "speedup_per_round": fl["round_s"] / ff["round_s"],
                        "first_round_ratio": fl["first_round_s"] / ff["first_round_s"],
                        "memory_ratio": fl["peak_rss_mb"] / ff["peak_rss_mb"], "goal": GOALS[name]})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# fedfleet simulate against Flower's simulation engine ({result['date']})", "",
             f"Command: `{result['command']}`. Machine: {result['machine']}. "
             f"Versions: {json.dumps(result['versions'])}.", "",
             "Seconds per round are the median gap between successive round ends over rounds 2..R; first round and "
             "wall are seconds from launch; memory is the peak sum of resident set sizes of the process tree "
             "(Ray's processes included for Flower). The machine may be shared with other work: `load_before` in "
             "the JSON gives its load average before each run.", "",
             "| system | workload | clients | sampled/round | rounds | s/round | first round s | wall s | peak MB "
             "| final accuracy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['workload']} | {r['clients']:,} | {r['sampled']} | {r['rounds']} | "
                         f"error: {r['error'].splitlines()[-1][:80] if r['error'] else '?'} |||||")
            continue
        lines.append(f"| {r['system']} | {r['workload']} | {r['clients']:,} | {r['sampled']} | {r['rounds']} | "
                     f"{_f(r['round_s'], 4)} | {_f(r['first_round_s'], 1)} | {_f(r['wall_s'], 1)} | "
                     f"{r['peak_rss_mb']:.0f} | {_f(r.get('final_accuracy'), 4)} |")
    if result["comparison"]:
        lines += ["", "| workload | Flower s/round ÷ fedfleet s/round | Flower first round ÷ fedfleet | "
                  "Flower peak memory ÷ fedfleet | goal |", "|---|---:|---:|---:|---|"]
        lines += [f"| {c['workload']} | {c['speedup_per_round']:.1f}× | {c['first_round_ratio']:.1f}× | "
                  f"{c['memory_ratio']:.1f}× | {c['goal']} |" for c in result["comparison"]]
    for note in result["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    mem = memory_gib()
    return (f"{len(os.sched_getaffinity(0))} CPUs ({cpu_model()})" + (f", {mem:.0f} GiB" if mem else "")
            + f", {platform.system()} {platform.release()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["null", "mnist", "memory"], action="append", help="run only these workloads")
    ap.add_argument("--no-flower", action="store_true", help="fedfleet only")
    ap.add_argument("--ray", action="store_true", help="also fedfleet simulate --backend ray (a local Ray instance)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every workload (default 20, 10 for memory)")
    ap.add_argument("--flower-venv", type=Path, default=FLOWER_VENV, help="the throwaway virtualenv for Flower")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for simulate.json and simulate.md")
    args = ap.parse_args(argv)
    only = set(args.only or ["null", "mnist", "memory"])
    mnist_dir = os.environ.get("FEDFLEET_MNIST_DIR")
    notes: list[str] = []
    if "mnist" in only and not mnist_dir:
        only.discard("mnist")
        notes.append("The mnist workload was skipped: FEDFLEET_MNIST_DIR is not set.")

    def sized(w: Workload) -> Workload:
        return w if args.rounds is None else Workload(w.name, w.clients, w.sampled, args.rounds, w.params)

    workdir = Path(tempfile.mkdtemp(prefix="fedfleet-bench-sim-"))
    rows: list[dict[str, Any]] = []
    flower: dict[str, Any] = {"skipped": True} if args.no_flower else {}
    try:
        if not args.no_flower and only & {"null", "mnist"}:
            flower.update(ensure_flower(args.flower_venv, workdir / "pip.log", extra=("torch==2.13.0",)))
        for name, w in (("null", NULL), ("mnist", MNIST)):
            if name not in only:
                continue
            w = sized(w)
            rows.append(run_fedfleet(w, workdir))
            print(json.dumps(rows[-1]), flush=True)
            if args.ray:
                rows.append(run_fedfleet(w, workdir, backend="ray"))
                print(json.dumps(rows[-1]), flush=True)
            if not args.no_flower and "error" not in flower:
                rows.append(run_flower(w, venv_python(args.flower_venv), workdir, mnist_dir))
                print(json.dumps(rows[-1]), flush=True)
        if "memory" in only:
            for w in MEMORY:
                rows.append(run_fedfleet(sized(w), workdir))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "error" in flower:
        notes.append(f"Flower could not be installed: {flower['error'][-300:]}")
    shown_argv = list(sys.argv[1:] if argv is None else argv)
    result = {"command": " ".join(["python benchmarks/simulate.py", *shown_argv]), "date": time.strftime("%Y-%m-%d"),
              "commit": commit(), "machine": _machine(),
              "versions": {**versions("fedfleet", "numpy", "torch"), **flower.get("versions", {})},
              "flower_venv": shown(args.flower_venv) if not args.no_flower else None, "goals": GOALS,
              "rows": rows, "comparison": compare(rows), "notes": notes}
    write_results(args.results, "simulate", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
