"""A worker whose own fit diverges (NaN weights, a NaN train_loss) or raises reports it and works on.

Issue 12, item 5: a NaN train_loss made every worker exit 1. Here one worker of two runs a task that
goes wrong in its first three fits; the other carries those rounds (quorum 1 of 2, a short deadline),
and the run finishes with the diverging worker alive to the end.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from conftest import Fleet
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import Dataset, FitResult, TrainParams
from fedfleet.types import Weights
from fedfleet.worker.agent import WorkerProcess

TESTS = Path(__file__).resolve().parent
TASK = f"{__name__}:DivergingTask"
DIVERGE = "FEDFLEET_TEST_DIVERGE"  # set in a worker's environment: its fits go wrong
ROUNDS = 5


class DivergingTask:
    """Estimates the mean of each worker's numbers (as examples/mean_task.py). In a process whose
    environment has FEDFLEET_TEST_DIVERGE, fit 1 gives NaN weights, fit 2 a NaN train_loss (and an
    infinite extra metric) and fit 3 raises; the later ones are honest."""

    name = "diverging"

    def __init__(self) -> None:
        self.fits = 0

    def init_weights(self, seed: int) -> Weights:
        return {"mu": np.zeros(2, dtype=np.float32)}

    def load_test(self) -> Dataset:
        return Dataset(np.zeros((4, 1)), np.zeros(4, dtype=np.int64))

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        return Dataset(np.full((10, 1), float(index + 1)), np.zeros(10, dtype=np.int64))

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        self.fits += 1
        mu = np.full(2, data.x.mean(), dtype=np.float32)
        metrics = {"train_loss": 0.25, "spread": 1.0}
        if os.environ.get(DIVERGE):
            if self.fits == 1:
                mu[1] = np.nan
            elif self.fits == 2:
                metrics = {"train_loss": float("nan"), "spread": float("inf")}
            elif self.fits == 3:
                raise RuntimeError("the task's own bug, in one round")
        return FitResult({"mu": mu}, len(data), metrics)

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return {"loss": float(np.abs(weights["mu"]).sum()), "accuracy": 0.0}


def start_run(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, round_timeout: float = 1) -> tuple[Path, str]:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the task's module, for the coordinator and the workers
    monkeypatch.delenv(DIVERGE, raising=False)
    c = fleet.coordinator("--task", TASK, "--workers", "2", "--rounds", str(ROUNDS), "--quorum", "0.5",
                          "--round-timeout", f"{round_timeout:g}", "--val-fraction", "0", "--linger", "2")
    fleet.worker(c.url, "--allow-task", TASK, name="honest")
    return c.data_dir, c.url


def assert_finished(fleet: Fleet, data_dir: Path) -> None:
    coordinator = fleet.coordinators[0]
    assert coordinator.proc.wait(timeout=120) == 0, fleet.logs()
    summary = json.loads((data_dir / "summary.json").read_text())
    assert (summary["state"], summary["rounds"]) == ("finished", ROUNDS), summary
    mu = safetensors.numpy.load_file(data_dir / "model.safetensors")["mu"]
    assert np.isfinite(mu).all()
    assert mu.tolist() == [1.5, 1.5]  # both workers (means 1 and 2, ten numbers each) in the last round


def test_a_diverging_worker_process_reports_it_and_stays_to_the_end(fleet: Fleet,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, url = start_run(fleet, monkeypatch)
    monkeypatch.setenv(DIVERGE, "1")
    diverging = fleet.worker(url, "--allow-task", TASK, name="diverging", log_level="DEBUG")
    assert diverging.proc.wait(timeout=120) == 0, diverging.log_text()  # told to stop: it never gave up
    assert_finished(fleet, data_dir)

    lines = diverging.log_text().splitlines()
    diverged = [line for line in lines if "worker.diverged" in line]
    # One fit per round: the coordinator repeats round 1's instruction until its deadline, and a worker
    # that re-fitted it would spin (and here would report fit 2's NaN metrics under round 1).
    assert len(diverged) == 2, lines
    assert "round=1 " in diverged[0] and "nonfinite='tensor mu'" in diverged[0]
    assert "action='update not sent'" in diverged[0]
    assert "round=2 " in diverged[1] and "nonfinite='metric train_loss, metric spread'" in diverged[1]
    assert "action='sent without those metrics'" in diverged[1]
    failed = [line for line in lines if " update.failed " in line]
    assert len(failed) == 1 and "round=3 " in failed[0] and "own bug, in one round" in failed[0]
    assert any("Traceback" in line for line in lines)  # not one of fedfleet's errors: its traceback is logged
    sent = {int(part.removeprefix("round="))
            for line in lines if "update.sent" in line for part in line.split() if part.startswith("round=")}
    assert sent == {2, 4, 5}
    assert "worker.failed" not in diverging.log_text()


def test_divergence_is_counted_in_the_worker_metrics(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, url = start_run(fleet, monkeypatch)
    monkeypatch.setenv(DIVERGE, "1")  # read by the task in this process only: the honest worker already started
    proc = WorkerProcess(url, 1, fleet.directory / "in-process", name="diverging", give_up=30.0,
                         allowed_tasks=(TASK,))
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(proc.run()), daemon=True)
    thread.start()
    try:
        thread.join(timeout=120)
    finally:
        proc.stop.set()
    assert code == [0], proc.errors
    assert_finished(fleet, data_dir)

    def uploads(result: str) -> float | None:
        return proc.metrics.registry.get_sample_value("fedfleet_worker_uploads_total", {"result": result})

    assert (uploads("diverged"), uploads("error"), uploads("accepted")) == (1.0, 1.0, ROUNDS - 2.0)
    assert proc.metrics.registry.get_sample_value("fedfleet_worker_nonfinite_metrics_total") == 2.0


def test_a_worker_that_cannot_answer_declines_and_the_round_does_not_wait_for_its_deadline(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rounds of a 10-minute deadline, and 2 minutes to finish all 5: only the declines (after fit 1's NaN weights
    # and fit 3's exception) let rounds 1 and 3 close without the diverging worker.
    data_dir, url = start_run(fleet, monkeypatch, round_timeout=600)
    monkeypatch.setenv(DIVERGE, "1")
    diverging = fleet.worker(url, "--allow-task", TASK, name="diverging")
    assert diverging.proc.wait(timeout=120) == 0, diverging.log_text()
    coordinator = fleet.coordinators[0]
    assert coordinator.proc.wait(timeout=60) == 0, fleet.logs()
    records = [json.loads(line) for line in (data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in records] == [1, 2, 1, 2, 2]
    declined = [line for line in coordinator.log_text().splitlines() if "worker.declined" in line]
    assert len(declined) == 2, declined
    assert "round=1 " in declined[0] and "fit diverged: non-finite mu" in declined[0]
    assert "round=3 " in declined[1] and "own bug, in one round" in declined[1]


def test_a_decline_is_checked_like_any_request(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    _, url = start_run(fleet, monkeypatch)
    with httpx.Client(base_url=url, timeout=10) as http:
        wid = http.post("/v1/workers", json={"name": "probe"}).json()["worker_id"]
        for body, words in [({"round": 1, "attempt": 0, "reason": "a\nforged log line"}, "reason"),
                            ({"round": -1, "attempt": 0}, "round"), ({"round": 1, "attempt": 0, "reason": "x" * 301},
                                                                     "reason")]:
            r = http.post(f"/v1/workers/{wid}/decline", json=body)
            assert r.status_code == 422 and words in r.json()["detail"], r.text
        r = http.post("/v1/workers/nobody/decline", json={"round": 1, "attempt": 0})
        assert r.status_code == 404 and "register first" in r.json()["detail"]
        # A worker not sampled in an open attempt: nothing to decline, and nothing changes.
        r = http.post(f"/v1/workers/{wid}/decline", json={"round": 7, "attempt": 0, "reason": "not mine"})
        assert r.status_code == 200 and r.json() == {"declined": False}
