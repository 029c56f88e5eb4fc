"""End to end with real processes: `fedfleet run`, federated vs central accuracy, dead and restarted workers."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy

from conftest import run_fedfleet as fedfleet
from fedfleet.config import RunConfig
from fedfleet.tasks.songs import SongsTask


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_status(url: str, until: Any, timeout: float = 120) -> dict[str, Any]:
    end = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < end:
        try:
            last = httpx.get(f"{url}/v1/status", timeout=5).json()
        except httpx.TransportError:
            pass
        else:
            if until(last):
                return last
        time.sleep(0.1)
    raise AssertionError(f"status never satisfied the condition; last: {last}")


def wait_finished(coord: Any, timeout: float = 180) -> dict[str, Any]:
    """Wait for a coordinator to end its run and exit (it does once its workers heard); its summary."""
    coord.proc.wait(timeout=timeout)
    summary: dict[str, Any] = json.loads((coord.data_dir / "summary.json").read_text())
    return summary


def test_run_writes_outputs_and_uses_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('rounds = 2\nworkers = 5\npartition = "dirichlet:0.5"\nseed = 3\n')
    out = tmp_path / "out"
    # 5 workers over 2 processes: one process hosts several logical workers.
    r = fedfleet("run", "--config", str(cfg), "--rounds", "3", "--processes", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "final accuracy" in r.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "finished"
    assert summary["rounds"] == 3  # the flag beat the file
    assert summary["workers"] == 5 and summary["task"] == "songs" and summary["partition"] == "dirichlet:0.5"
    assert 0.4 < summary["final_accuracy"] <= 1.0 and summary["final_loss"] > 0
    assert summary["seconds"] > 0 and [t["round"] for t in summary["round_timings"]] == [1, 2, 3]

    rounds = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for rec in rounds:
        assert rec["participants"] == 5
        assert rec["bytes_in"] > 0 and rec["bytes_out"] > 0
        assert {"accuracy", "loss", "seconds"} <= set(rec)
    assert rounds[-1]["accuracy"] == summary["final_accuracy"]

    model = safetensors.numpy.load_file(out / "model.safetensors")
    task = SongsTask()
    assert {k: v.shape for k, v in model.items()} == {k: v.shape for k, v in task.init_weights(0).items()}
    assert task.evaluate(model, task.load_test())["accuracy"] == pytest.approx(summary["final_accuracy"])

    saved = RunConfig.from_mapping(tomllib.loads((out / "config.toml").read_text()))
    assert (saved.rounds, saved.workers, saved.partition, saved.seed) == (3, 5, "dirichlet:0.5", 3)

    # Each logical worker had its own partition.
    states = sorted((out / "workers").glob("proc-*/client-*.json"))
    assert len(states) == 5
    assert len({json.loads(p.read_text())["worker_id"] for p in states}) == 5


def test_bad_option_is_one_line_error(tmp_path: Path) -> None:
    r = fedfleet("run", "--workers", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "fedfleet: error: The 'workers' option must be an int in the range [1, 100000]. Got '0' instead."]
    cfg = tmp_path / "bad.toml"
    cfg.write_text("lr = -1\n")
    r = fedfleet("coordinator", "--config", str(cfg), "--data-dir", str(tmp_path / "c"))
    assert r.returncode == 2 and "'lr' option" in r.stderr and "Got -1" in r.stderr
    r = fedfleet("worker", "--coordinator", "ftp://nowhere")
    assert r.returncode == 2 and "--coordinator" in r.stderr


def central_accuracy(epochs: int, lr: float, batch_size: int) -> float:
    """The same model and SGD, trained on the whole training pool in one place."""
    task = SongsTask()
    return task.evaluate(task.fit_central(epochs, lr, batch_size), task.load_test())["accuracy"]


def test_federated_iid_matches_central(tmp_path: Path) -> None:
    rounds, lr, batch = 12, 0.05, 32
    out = tmp_path / "fed"
    r = fedfleet("run", "--workers", "6", "--rounds", str(rounds), "--lr", str(lr), "--batch-size", str(batch),
                 "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    federated = json.loads((out / "summary.json").read_text())["final_accuracy"]
    central = central_accuracy(rounds, lr, batch)
    majority = np.bincount(SongsTask().load_test().y).max() / len(SongsTask().load_test().y)
    assert central > majority + 0.15
    assert abs(federated - central) <= 0.01, (federated, central)


def test_dead_worker_does_not_block_the_run(coordinator: Any, worker: Any) -> None:
    coord = coordinator("--workers", "4", "--min-workers", "3", "--rounds", "25", "--round-timeout", "20",
                        "--worker-timeout", "2", "--quorum", "0.5")
    workers = [worker(coord.url) for _ in range(4)]
    wait_status(coord.url, lambda s: s["round"] >= 2)
    workers[0].kill()  # SIGKILL: no goodbye
    final = wait_finished(coord)
    assert final["state"] == "finished", final
    assert coord.proc.returncode == 0
    rounds = read_jsonl(coord.data_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, 26))
    assert rounds[0]["participants"] == 4
    assert rounds[-1]["participants"] == 3
    # The round that lost the worker closed when it was found dead, long before its 20 s deadline.
    assert max(r["seconds"] for r in rounds) < 20
    for w in workers[1:]:
        assert w.proc.wait(timeout=30) == 0  # told to stop, exited cleanly


def test_restarted_worker_gets_its_partition_back(coordinator: Any, worker: Any) -> None:
    coord = coordinator("--workers", "2", "--rounds", "400", "--worker-timeout", "30")
    first = worker(coord.url)
    second = worker(coord.url)
    wait_status(coord.url, lambda s: s["round"] >= 1)
    before = {w["worker_id"]: w["partition"] for w in httpx.get(f"{coord.url}/v1/workers").json()}
    first.kill()
    first.proc.wait(timeout=10)
    again = worker(coord.url, state_dir=first.state_dir)
    progressed = wait_status(coord.url, lambda s: s["round"] >= 3)["round"]
    after = {w["worker_id"]: w["partition"] for w in httpx.get(f"{coord.url}/v1/workers").json()}
    assert after == before  # same ids, same partitions, nobody new
    wait_status(coord.url, lambda s: s["round"] > progressed + 1)
    for w in (again, second):
        w.kill()
    stored = json.loads((first.state_dir / "client-0.json").read_text())["worker_id"]
    assert stored in before


def test_worker_stops_cleanly_on_sigterm(coordinator: Any, worker: Any) -> None:
    import signal

    coord = coordinator("--workers", "3", "--rounds", "2")  # waits for a third worker that never comes
    w = worker(coord.url, clients=2)
    wait_status(coord.url, lambda s: s["workers_registered"] == 2)
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(timeout=15) == 0
    assert "worker.signal signal=SIGTERM" in w.log_text()


def test_worker_gives_up_on_an_unreachable_coordinator(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = fedfleet("--log-level", "ERROR", "worker", "--coordinator", f"http://127.0.0.1:{port}",
                 "--give-up", "1", "--state-dir", str(tmp_path / "w"), timeout=60)
    assert r.returncode == 1
    assert "gave up reaching the coordinator" in r.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_killed_coordinator_resumes_and_workers_reconnect(coordinator: Any, worker: Any) -> None:
    # A fixed port, so that the restarted coordinator is where the workers keep knocking.
    args = ("--workers", "3", "--rounds", "40", "--worker-timeout", "10", "--seed", "5", "--port", str(free_port()))
    first = coordinator(*args)
    workers = [worker(first.url, "--give-up", "120") for _ in range(3)]
    wait_status(first.url, lambda s: s["round"] >= 5)
    first.kill()  # SIGKILL mid-run: no chance to save anything more
    first.proc.wait(timeout=10)
    recorded = read_jsonl(first.data_dir / "metrics.jsonl")
    run_id = json.loads((first.data_dir / "summary.json").read_text())["run_id"] \
        if (first.data_dir / "summary.json").exists() else None
    assert run_id is None  # it really died before finishing

    second = coordinator(*args, data_dir=first.data_dir)
    final = wait_finished(second)
    assert final["state"] == "finished", final
    rounds = read_jsonl(first.data_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, 41))  # none lost, none twice
    assert rounds[: len(recorded)] == recorded  # what was recorded before the kill stands
    assert all(r["participants"] == 3 for r in rounds)
    for w in workers:  # the same worker processes, never restarted
        assert w.proc.wait(timeout=30) == 0
    # Resuming a finished run is refused with a clear message.
    r = fedfleet("coordinator", *args, "--data-dir", str(first.data_dir))
    assert r.returncode == 2 and "has finished" in r.stderr


@pytest.mark.parametrize("strategy,options", [("fedadam", ["--strategy-option", "server_lr=0.05"]),
                                              ("median", []), ("fedprox", ["--strategy-option", "prox_mu=0.1"])])
def test_runs_with_other_strategies(tmp_path: Path, strategy: str, options: list[str]) -> None:
    out = tmp_path / strategy
    r = fedfleet("run", "--workers", "5", "--rounds", "4", "--strategy", strategy, *options, "--out", str(out),
                 "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["strategy"] == strategy
    assert summary["final_accuracy"] > 0.55  # well above the 0.40 majority class
    saved = RunConfig.from_mapping(tomllib.loads((out / "config.toml").read_text()))
    assert saved.strategy_options == tuple(tuple(o.split("=")) for o in options[1::2])


def test_same_seed_same_model_whatever_the_arrival_order(tmp_path: Path) -> None:
    def run(name: str, seed: int) -> tuple[dict[str, np.ndarray], list[float]]:
        out = tmp_path / name
        r = fedfleet("run", "--workers", "6", "--rounds", "3", "--seed", str(seed), "--out", str(out), "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
        return (safetensors.numpy.load_file(out / "model.safetensors"),
                [rec["accuracy"] for rec in read_jsonl(out / "metrics.jsonl")])

    (first, acc1), (second, acc2), (other, _) = run("a", 11), run("b", 11), run("c", 12)
    assert acc1 == acc2
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), name
    assert any(first[k].tobytes() != other[k].tobytes() for k in first)


def test_federated_evaluation_scores_the_global_model_on_each_workers_split(tmp_path: Path) -> None:
    from fedfleet.protocol.messages import PartitionInfo
    from fedfleet.storage.checkpoints import Checkpoints
    from fedfleet.worker.trainer import Trainer

    out = tmp_path / "fe"
    r = fedfleet("run", "--workers", "4", "--rounds", "3", "--partition", "dirichlet:0.5", "--val-fraction", "0.2",
                 "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    rounds = read_jsonl(out / "metrics.jsonl")
    # Round 2's workers scored the model that round 1 produced, before training on it.
    model, _ = Checkpoints(out / "checkpoints").load(1)
    task = SongsTask()
    scores = []
    for index in range(4):
        trainer = Trainer(task, PartitionInfo(name="", index=index, count=4, scheme="dirichlet:0.5", seed=0,
                                              val_fraction=0.2))
        assert trainer.validation is not None
        assert len(trainer.validation) + len(trainer.data) == len(task.load_partition(
            __import__("fedfleet").parse_partition("dirichlet:0.5"), index, 4, 0))
        scores.append((len(trainer.validation), task.evaluate(model, trainer.validation)["accuracy"]))
    n = sum(k for k, _ in scores)
    rec = rounds[1]
    assert rec["fed_examples"] == n
    assert rec["fed_accuracy"] == pytest.approx(sum(k * a for k, a in scores) / n, rel=1e-9)
    assert rec["fed_accuracy_min"] == pytest.approx(min(a for _, a in scores))
    assert rec["fed_accuracy_max"] == pytest.approx(max(a for _, a in scores))
    assert rec["fed_accuracy_min"] < rec["fed_accuracy_max"]  # label skew: workers see the model differently


def test_a_run_ends_early_once_it_reaches_the_target_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "target"
    r = fedfleet("run", "--workers", "2", "--rounds", "50", "--target-accuracy", "0.6", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # It stops at the first round whose model reaches 0.6, and not before.
    assert s["state"] == "finished" and s["rounds"] == len(lines) < 50
    assert lines[-1]["accuracy"] >= 0.6 and all(x["accuracy"] < 0.6 for x in lines[:-1])
    assert f"after {s['rounds']} rounds" in s["message"] and "--target-accuracy 0.6" in s["message"]
