"""``fedfleet simulate``: the coordinator's engine with clients trained by executors, no sockets.

Real processes throughout: the CLI, its executor processes (or Ray actors of a Ray instance this test
starts on 127.0.0.1), and for the comparison a real ``fedfleet run`` with worker processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from conftest import run_fedfleet
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import Dataset, FitResult, TrainParams
from fedfleet.types import Weights
from fedfleet.web import FinishedRun

TESTS = Path(__file__).resolve().parent
SONGS = ("--task", "songs", "--workers", "6", "--fraction", "0.5", "--rounds", "3", "--seed", "11",
         "--local-epochs", "1")


class HalfBrokenTask:
    """Each client's model is its partition's number (a mean task); client 1's fit gives NaN weights and
    client 2's raises. Neither can answer; the round must close without them, not at its deadline."""

    name = "half-broken"

    def init_weights(self, seed: int) -> Weights:
        return {"mu": np.zeros(1, dtype=np.float32)}

    def load_test(self) -> Dataset:
        return Dataset(np.zeros((4, 1)), np.zeros(4, dtype=np.int64))

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        return Dataset(np.full((10, 1), float(index)), np.zeros(10, dtype=np.int64))

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        index = float(data.x[0, 0])
        if index == 2:
            raise RuntimeError("the task's own bug, for client 2")
        mu = np.array([np.nan if index == 1 else index], dtype=np.float32)
        return FitResult({"mu": mu}, len(data), {"train_loss": 0.5})

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return {"loss": float(np.abs(weights["mu"]).sum()), "accuracy": 0.0}


def model(out: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(out / "model.safetensors")


def records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((out / "summary.json").read_text())
    return result


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = model(a), model(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        assert np.array_equal(ma[name], mb[name]), name
    ra, rb = records(a), records(b)
    assert [(r["round"], r["sampled"], r["participants"], r["accuracy"]) for r in ra] == \
        [(r["round"], r["sampled"], r["participants"], r["accuracy"]) for r in rb]


def test_the_same_seed_gives_the_same_model_in_simulate_and_in_run(tmp_path: Path) -> None:
    ran = run_fedfleet("run", *SONGS, "--out", str(tmp_path / "run"), "--quiet", timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    sim = run_fedfleet("simulate", *SONGS, "--out", str(tmp_path / "sim"), "--quiet", timeout=300)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    assert summary(tmp_path / "sim")["state"] == "finished"
    assert_same_run(tmp_path / "run", tmp_path / "sim")
    # The same run folder: what fedfleet report and serve read.
    for name in ("config.toml", "state.sqlite", "summary.json", "metrics.jsonl", "model.safetensors"):
        assert (tmp_path / "sim" / name).is_file(), name
    assert "round.closed" in (tmp_path / "sim" / "logs" / "simulate.log").read_text()
    report = run_fedfleet("report", str(tmp_path / "sim"), timeout=120)
    assert report.returncode == 0, report.stdout + report.stderr
    # The simulated clients send their label counts as the worker processes do: the same counts by partition
    # in the per-worker history (what the dashboard's label mix and fedfleet report read).
    ran_labels, sim_labels = label_counts(tmp_path / "run"), label_counts(tmp_path / "sim")
    assert sim_labels == ran_labels
    assert len([c for c in sim_labels.values() if c is not None]) >= 3, sim_labels  # half of 6 sampled a round
    assert all(len(c) == 3 and sum(c) > 0 for c in sim_labels.values() if c is not None), sim_labels


def label_counts(out: Path) -> dict[str, list[int] | None]:
    """Each partition's label counts in the run's per-worker history, as GET /v1/dashboard/workers serves it."""
    history = asyncio.run(FinishedRun.load(out).worker_history(0, 100))
    return {w["partition"]: w["label_counts"] for w in history["workers"]}


def test_ten_thousand_clients_ten_sampled_a_round(tmp_path: Path) -> None:
    out = tmp_path / "many"
    r = run_fedfleet("simulate", "--task", "null", "--task-option", "params=1000", "--workers", "10000",
                     "--fraction", "0.001", "--rounds", "3", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "simulating null on 10000 clients" in r.stdout
    s = summary(out)
    assert (s["state"], s["rounds"], s["workers"]) == ("finished", 3, 10000)
    assert [(x["sampled"], x["participants"]) for x in records(out)] == [(10, 10)] * 3
    with sqlite3.connect(out / "state.sqlite") as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT partition) FROM workers").fetchone() == (10000, 10000)
    # Round 3 of the null task: every sampled client added one to each weight, three times.
    assert np.array_equal(model(out)["w"], np.full(1000, 3.0, dtype=np.float32))


def test_clients_that_cannot_answer_do_not_hold_the_round_to_its_deadline(tmp_path: Path) -> None:
    out = tmp_path / "broken"
    # A deadline of 10 minutes and a subprocess bound of 4: only declining the broken clients can finish in time.
    r = run_fedfleet("simulate", "--task", f"{__name__}:HalfBrokenTask", "--workers", "4", "--rounds", "2",
                     "--quorum", "0.5", "--round-timeout", "600", "--val-fraction", "0", "--out", str(out),
                     "--quiet", env={"PYTHONPATH": str(TESTS)}, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [(x["sampled"], x["participants"]) for x in records(out)] == [(4, 2), (4, 2)]
    assert model(out)["mu"].tolist() == [1.5]  # the mean of clients 0 and 3
    log = (out / "logs" / "simulate.log").read_text()
    assert log.count("worker.declined") == 4, log
    assert "non-finite values in mu" in log and "own bug, for client 2" in log


@pytest.mark.parametrize(("args", "words"), [
    (("--task", "songs", "--secure-aggregation"), "does not run --secure-aggregation"),
    (("--task", "songs", "--ray-address", "auto"), "--ray-address goes with --backend ray"),
    (("--task", "tabular", "--task-option", "label=y"), "trains on each site's own files"),
    (("--task", "songs", "--backend", "threads"), "invalid choice: 'threads'"),
])
def test_what_a_simulation_cannot_run_is_refused_naming_the_option(tmp_path: Path, args: tuple[str, ...],
                                                                    words: str) -> None:
    r = run_fedfleet("simulate", *args, "--out", str(tmp_path / "x"), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr
    assert not (tmp_path / "x" / "state.sqlite").exists()


def test_ctrl_c_stops_a_simulation_and_resume_finishes_it_with_every_round_once(tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    rounds = 400
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "simulate", "--task", "null", "--task-option",
                             "params=1000", "--workers", "50", "--fraction", "0.1", "--rounds", str(rounds),
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(records(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    s = summary(out)
    done = s["rounds"]
    assert s["state"] == "stopped" and isinstance(done, int) and 3 <= done < rounds, s
    assert f"fedfleet simulate --out {out} --resume" in text
    again = run_fedfleet("simulate", "--out", str(out), "--resume", "--quiet", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [r["round"] for r in records(out)] == list(range(1, rounds + 1))
    assert summary(out)["state"] == "finished"
    assert np.array_equal(model(out)["w"], np.full(1000, float(rounds), dtype=np.float32))
    with sqlite3.connect(out / "state.sqlite") as db:  # the resumed run kept its 50 clients
        assert db.execute("SELECT COUNT(*) FROM workers").fetchone() == (50,)


# --- Ray ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head on 127.0.0.1 with 2 CPUs, started for the test and stopped after it: its address, and the
    environment a driver needs to join it (Ray's token authentication, with a token made for the test)."""
    pytest.importorskip("ray", reason="Ray is the optional extra fedfleet[ray]; the dev extra installs it")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray is not None, "the ray package is installed but its command is not"
    port = _free_port()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray address on the loopback interface (Ray otherwise
    # takes the host's own IP even when told 127.0.0.1); the token is Ray's own authentication.
    ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, **ray_env}
    # Ray's socket paths live under its temp dir and may not exceed 107 bytes: pytest's tmp_path is too deep.
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    started = subprocess.run([ray, "start", "--head", "--port", str(port),
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                              "--temp-dir", str(temp)],
                             capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}", ray_env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_actors_on_a_ray_cluster_give_the_same_model_as_local_executors(
        tmp_path: Path, ray_cluster: tuple[str, dict[str, str]]) -> None:
    address, env = ray_cluster
    local = run_fedfleet("simulate", *SONGS, "--out", str(tmp_path / "local"), "--quiet", timeout=300)
    assert local.returncode == 0, local.stdout + local.stderr
    on_ray = run_fedfleet("simulate", *SONGS, "--backend", "ray", "--ray-address", address, "--executors", "2",
                          "--out", str(tmp_path / "ray"), env=env, timeout=300)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    assert "with 2 ray executors" in on_ray.stdout
    assert_same_run(tmp_path / "local", tmp_path / "ray")
