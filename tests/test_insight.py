"""Per-worker insight and the confusion matrix: ``GET /v1/dashboard/workers``, workers' label counts,
``RoundRecord.confusion`` and the "silent" worker status.

The end-to-end tests read one real ``fedfleet run`` of the songs task on a skewed partition (each worker
a real process), asked while it runs (its live coordinator) and once it ended (a real ``fedfleet serve``).
The others drive the engine in process with hostile metrics, or SIGKILL a real worker while it trains.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import ADDRESS_FILE, Coordinator, Worker, stop_process
from fedfleet.coordinator.engine import Engine, confusion_of
from fedfleet.coordinator.rounds import mean_metrics
from fedfleet.protocol.messages import TrainInstruction
from fedfleet.storage.history import worker_history
from fedfleet.storage.records import RoundRecord, clean_worker_metrics
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import load_task
from fedfleet.tasks.base import TrainParams, class_names, evaluate_with_confusion, label_counts
from fedfleet.tasks.songs import ERAS, SongsTask
from test_engine import open_engine, plus, run, send
from test_tabular import CLASSES as TABULAR_CLASSES
from test_tabular import classification_rows, plan_of, write
from test_tabular import task as tabular_task
from test_web import serve_client

TIMEOUT = 30.0
WORKERS = 3
ROUNDS = 6


# --- one real skewed run, asked live and served finished ---------------------------------------------------

def _poll_live(url: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """/v1/dashboard/workers of the running coordinator, once it has a completed round."""
    end = time.monotonic() + 120
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        while time.monotonic() < end and proc.poll() is None:
            body: dict[str, Any] = http.get("/v1/dashboard/workers").json()
            if body["rounds"]:
                return body
            time.sleep(0.1)
    pytest.fail("the live coordinator had no completed round to show before the run ended", pytrace=False)


def _address(out: Path, proc: subprocess.Popen[bytes]) -> str:
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None:
        try:
            return str(json.loads((out / ADDRESS_FILE).read_text())["url"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    pytest.fail("fedfleet run's coordinator never wrote its address", pytrace=False)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished ``fedfleet run`` (songs, 3 workers, dirichlet:0.3) and what its live coordinator answered
    on /v1/dashboard/workers while it ran."""
    out = tmp_path_factory.mktemp("insight") / "run"
    # Local epochs make the rounds long enough to be asked during the run on a busy machine.
    proc = subprocess.Popen([sys.executable, "-m", "fedfleet", "run", "--task", "songs", "--workers", str(WORKERS),
                             "--rounds", str(ROUNDS), "--partition", "dirichlet:0.3", "--local-epochs", "3",
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        live = _poll_live(_address(out, proc), proc)
        output, _ = proc.communicate(timeout=240)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, output.decode(errors="replace")
    return out, live


@pytest.fixture(scope="module")
def served(skewed: tuple[Path, dict[str, Any]]) -> Iterator[httpx.Client]:
    with serve_client(skewed[0]) as http:
        yield http


def test_the_live_coordinator_answers_each_worker_s_history(skewed: tuple[Path, dict[str, Any]]) -> None:
    live = skewed[1]
    assert live["total"] == WORKERS and live["classes"] == list(ERAS) and len(live["workers"]) == WORKERS
    assert [w["partition"] for w in live["workers"]] == [f"part-00{i}-of-00{WORKERS}" for i in range(WORKERS)]
    for w in live["workers"]:
        assert len(w["val_accuracy"]) == len(live["rounds"]) and w["val_accuracy"][0] is not None
        assert sum(w["label_counts"]) == w["examples"] > 0


def test_served_run_gives_each_worker_its_own_learning(served: httpx.Client,
                                                       skewed: tuple[Path, dict[str, Any]]) -> None:
    body = served.get("/v1/dashboard/workers").json()
    assert body["rounds"] == list(range(1, ROUNDS + 1))
    assert (body["total"], body["offset"], body["limit"], body["classes"]) == (WORKERS, 0, 100, list(ERAS))
    workers = body["workers"]
    assert [w["partition"] for w in workers] == [f"part-00{i}-of-00{WORKERS}" for i in range(WORKERS)]
    for w in workers:
        for series in ("val_accuracy", "val_loss", "train_loss", "train_accuracy", "train_s"):
            assert len(w[series]) == ROUNDS and all(v is not None for v in w[series]), (w["name"], series)
        assert all(0 <= v <= 1 for v in w["val_accuracy"])
        # The label mix: counts per era, adding up to the examples the worker trained on.
        assert len(w["label_counts"]) == len(ERAS) and sum(w["label_counts"]) == w["examples"]
    # A skewed partition: each worker scores the global model on its own data, differently, and holds a
    # different mix of eras.
    last = [w["val_accuracy"][-1] for w in workers]
    assert len(set(last)) == WORKERS, last
    assert len({tuple(w["label_counts"]) for w in workers}) == WORKERS
    # The same numbers as the run's state database holds for each worker's updates.
    store = RunDir(skewed[0]).read_store()
    assert store is not None
    rows = store.updates()
    store.close()
    mine = [r for r in rows if r.worker_id == workers[0]["worker_id"]]
    assert [r.metrics["val_accuracy"] for r in mine] == workers[0]["val_accuracy"]


def test_the_workers_history_is_paged_by_partition(served: httpx.Client) -> None:
    everyone = served.get("/v1/dashboard/workers").json()["workers"]
    page = served.get("/v1/dashboard/workers", params={"offset": 1, "limit": 1}).json()
    assert (page["total"], page["offset"], page["limit"]) == (WORKERS, 1, 1)
    assert page["workers"] == everyone[1:2]
    beyond = served.get("/v1/dashboard/workers", params={"offset": 10}).json()
    assert beyond["workers"] == [] and beyond["total"] == WORKERS


@pytest.mark.parametrize(("params", "words"), [
    ({"limit": 0}, "query.limit"), ({"limit": 10_001}, "query.limit"), ({"offset": -1}, "query.offset"),
    ({"offset": "first"}, "query.offset"),
])
def test_bad_paging_is_refused_naming_the_parameter(served: httpx.Client, params: dict[str, Any],
                                                    words: str) -> None:
    r = served.get("/v1/dashboard/workers", params=params)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_the_confusion_matrix_adds_up_to_the_test_set(served: httpx.Client,
                                                      skewed: tuple[Path, dict[str, Any]]) -> None:
    rounds = served.get("/v1/dashboard").json()["rounds"]
    assert len(rounds) == ROUNDS
    test_size = len(SongsTask().load_test())
    for record in rounds:
        confusion = record["confusion"]
        assert confusion["classes"] == list(ERAS)
        counts = np.array(confusion["counts"])
        assert counts.shape == (3, 3) and counts.sum() == test_size
        assert np.trace(counts) / counts.sum() == pytest.approx(record["accuracy"], abs=1e-12)
    # Per-class recall from the matrix; each era's true examples are its row, the same in every round.
    rows = np.array(rounds[-1]["confusion"]["counts"]).sum(axis=1)
    truth = np.bincount(SongsTask().load_test().y, minlength=3)
    assert rows.tolist() == truth.tolist()
    # metrics.jsonl carries the same records.
    on_disk = RunDir(skewed[0]).read_rounds()
    assert on_disk[-1].confusion is not None and on_disk[-1].confusion.counts == rounds[-1]["confusion"]["counts"]


# --- label counts: untrusted, kept with the update only ---------------------------------------------------

HOSTILE = {**{f"m{i:02d}": 1.0 for i in range(31)}, "train_loss": 0.5,
           **{f"label_count_{k}": 10.0 for k in range(20)},
           "label_count_20": -3.0, "label_count_21": 1e13, "label_count_22": 2.5, "label_count_007": 1.0}


def test_label_counts_neither_crowd_out_nor_join_the_round_metrics(tmp_path: Path) -> None:
    """One worker sends 32 metrics of its own, 20 good label counts and four bad ones (negative, huge, a
    fraction, a padded index): the 32 names are all kept, the 20 counts are kept with its update only, the
    bad ones are dropped, and the round's means hold no label count."""
    async def hostile(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 1.0), metrics=HOSTILE)

    engine = open_engine(tmp_path)
    assert run(engine, hostile) == []
    records = RunDir(tmp_path / "run").read_rounds()
    assert len(records) == 2
    for record in records:
        assert not any(name.startswith("label_count") for name in record.worker_metrics)
        assert {f"m{i:02d}" for i in range(31)} <= set(record.worker_metrics)
        assert record.worker_metrics["train_loss"] == 0.5 and record.metrics_dropped == 4
    store = RunDir(tmp_path / "run").read_store()
    assert store is not None
    rows = [r for r in store.updates() if r.worker_id == "w0"]
    store.close()
    assert len(rows) == 2
    assert sorted(k for k in rows[0].metrics if k.startswith("label")) == sorted(f"label_count_{k}" for k in range(20))
    history = worker_history(rows, [1, 2], ["w0", "w1"])
    assert history.workers[0].label_counts == [10] * 20 and history.workers[1].label_counts is None


def test_clean_worker_metrics_keeps_label_counts_out_of_the_cap() -> None:
    kept, dropped = clean_worker_metrics(HOSTILE)
    assert len([k for k in kept if not k.startswith("label_count_")]) == 32
    assert [k for k in kept if k.startswith("label_count_")] == sorted(f"label_count_{k}" for k in range(20))
    assert dropped == {"range": 3, "name": 1}
    assert mean_metrics([(5, kept)]) == {k: v for k, v in kept.items() if not k.startswith("label_count_")}


@pytest.mark.parametrize("options", [
    pytest.param({}, id="plain"),
    pytest.param({"dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 0.5}, id="central-dp"),
])
def test_workers_are_asked_for_label_counts_only_without_differential_privacy(
        tmp_path: Path, options: dict[str, Any]) -> None:
    engine = open_engine(tmp_path, workers=3, **options)
    try:
        async def first_instruction() -> Any:
            for i in range(3):
                engine.register(f"w{i}", f"worker {i}")
            loop = asyncio.create_task(engine.run())
            try:
                end = time.monotonic() + TIMEOUT
                while time.monotonic() < end:
                    msg = await engine.next_instruction("w0", 1.0)
                    if isinstance(msg, TrainInstruction):
                        return msg
                pytest.fail("no training instruction within the timeout")
            finally:
                engine.stop("test over")
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        msg = asyncio.run(first_instruction())
    finally:
        engine.close()
    assert msg.params.report_labels is (not options)


# --- the task side: class names, label counts, confusion from the same pass -------------------------------

def test_songs_confusion_comes_from_the_scoring_pass() -> None:
    task = load_task("songs", {})
    test = task.load_test()
    weights = SongsTask().fit_central(epochs=1, lr=0.05, batch_size=64)
    scores, counts = evaluate_with_confusion(task, weights, test)
    assert scores == task.evaluate(weights, test)
    assert counts is not None and counts.sum() == len(test)
    assert np.trace(counts) / counts.sum() == pytest.approx(scores["accuracy"], abs=1e-12)
    assert class_names(task) == list(ERAS)
    assert label_counts(task, test) == np.bincount(test.y, minlength=3).tolist()
    record = confusion_of(counts, class_names(task))
    assert record is not None and record.classes == list(ERAS)


def test_tabular_classification_counts_its_confusion_and_label_mix(tmp_path: Path) -> None:
    site = write(classification_rows(1500, 1), tmp_path / "site.csv")
    test_file = write(classification_rows(900, 3), tmp_path / "test.csv")
    planned = tabular_task().with_plan(plan_of(tabular_task(), site))
    data, _ = planned.load_site([site], 0.0, 0)
    test, _ = planned.load_site([test_file], 0.0, 0)
    weights = planned.fit(planned.init_weights(0), data, TrainParams(2, 64, 0.1, 0)).weights
    scores, counts = evaluate_with_confusion(planned, weights, test)
    # The same scores as evaluate's (to rounding: a sum over threads may be added in another order under load).
    again = planned.evaluate(weights, test)
    assert scores.keys() == again.keys() and all(scores[k] == pytest.approx(again[k], rel=1e-9) for k in again)
    assert counts is not None and counts.sum() == 900 and class_names(planned) == TABULAR_CLASSES
    assert np.trace(counts) / counts.sum() == pytest.approx(scores["accuracy"], abs=1e-12)
    # The recall the task already reported is the matrix's diagonal over its rows.
    for k in range(3):
        assert scores[f"recall_{k}"] == pytest.approx(counts[k, k] / counts[k].sum(), abs=1e-12)
    labels = classification_rows(1500, 1).column("y").to_pylist()
    assert label_counts(planned, data) == [labels.count(c) for c in TABULAR_CLASSES]


def test_a_torch_task_that_names_its_classes_counts_its_confusion(tmp_path: Path) -> None:
    """A TorchTask (the images task's base) counts the confusion when it names its classes, and not otherwise."""
    torch = pytest.importorskip("torch")
    from fedfleet.tasks.torch_task import TorchTask

    class Named(TorchTask):
        name = "named"
        classes = ("north", "east", "west")

        def build_model(self) -> Any:
            return torch.nn.Sequential(torch.nn.Linear(2, 3))

        def load_data(self, source: Any) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng(0)
            y = rng.integers(0, 3, 300)
            return np.array([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])[y] + rng.normal(size=(300, 2)), y

    class Unnamed(Named):
        classes = ()

    for cls, named in ((Named, True), (Unnamed, False)):
        task = cls()
        data, _ = task.load_site([tmp_path], 0.0, 0)
        weights = task.fit(task.init_weights(0), data, TrainParams(3, 16, 0.1, 0)).weights
        scores, counts = evaluate_with_confusion(task, weights, data)
        assert scores == task.evaluate(weights, data)
        if named:
            assert counts is not None and counts.sum() == 300
            assert label_counts(task, data) == counts.sum(axis=1).tolist()
            assert np.trace(counts) / 300 == pytest.approx(scores["accuracy"], abs=1e-12)
        else:
            assert counts is None and label_counts(task, data) is None


def test_a_task_that_does_not_classify_has_no_confusion_or_classes() -> None:
    task = load_task("null", {"params": "4"})
    test = task.load_test()
    scores, counts = evaluate_with_confusion(task, task.init_weights(0), test)
    assert counts is None and class_names(task) is None and label_counts(task, test) is None
    assert "accuracy" in scores


def test_old_round_records_load_and_bad_matrices_are_refused() -> None:
    old = {"round": 1, "accuracy": 0.5, "loss": 1.0, "participants": 1, "sampled": 1, "attempts": 1, "seconds": 1.0,
           "bytes_in": 0, "bytes_out": 0, "model_version": 1,
           "timings": {"wait_workers": 0, "open": 0, "aggregate": 0, "evaluate": 0, "checkpoint": 0}}
    assert RoundRecord.model_validate(old).confusion is None
    good = RoundRecord.model_validate({**old, "confusion": {"classes": ["a", "b"], "counts": [[1, 0], [2, 3]]}})
    assert good.confusion is not None and good.confusion.counts == [[1, 0], [2, 3]]
    for bad in ({"classes": ["a", "b"], "counts": [[1, 0]]}, {"classes": ["a"], "counts": [[-1]]},
                {"classes": [], "counts": []}):
        with pytest.raises(ValueError, match="confusion"):
            RoundRecord.model_validate({**old, "confusion": bad})


# --- "silent": a worker killed while it trains -------------------------------------------------------------

def _worker_view(http: httpx.Client) -> dict[str, Any] | None:
    """The one worker of the run as the dashboard shows it; None before it registered."""
    workers = http.get("/v1/dashboard").json()["workers"]
    assert len(workers) <= 1, workers
    return workers[0] if workers else None


def _until(http: httpx.Client, done: Callable[[dict[str, Any]], bool], what: str,
           timeout: float = 60.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        view = _worker_view(http)
        if view is not None and done(view):
            return view
        time.sleep(0.1)
    pytest.fail(f"the worker never {what} within {timeout:g} s", pytrace=False)


def test_a_worker_killed_while_training_reads_silent_before_dead(coordinator: Callable[..., Coordinator],
                                                                 worker: Callable[..., Worker]) -> None:
    """A worker whose fit takes long stays "training" (its heartbeats keep it so); SIGKILLed mid-fit, it reads
    "silent" while it is not yet dead (not heard from for less than --worker-timeout), then "dead"."""
    timeout = 12.0
    # Batches of one and many epochs: a fit that lasts minutes, which the test ends by killing the worker.
    coord = coordinator("--task", "songs", "--workers", "1", "--rounds", "1", "--local-epochs", "2000",
                        "--batch-size", "1", "--worker-timeout", str(timeout), "--round-timeout", "600")
    w = worker(coord.url)
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as http:
        _until(http, lambda v: v["status"] == "training", "started training")
        # Heartbeats: while it trains it is heard from again (last_seen_s goes back down) and stays "training".
        quiet = [0.0]

        def beat(view: dict[str, Any]) -> bool:
            assert view["status"] == "training", view
            heard, quiet[0] = view["last_seen_s"] < quiet[0], view["last_seen_s"]
            return heard

        _until(http, beat, "sent a heartbeat while training")
        w.kill()
        silent = _until(http, lambda v: v["status"] != "training", "stopped reading training")
        assert silent["status"] == "silent", silent
        assert silent["last_seen_s"] < timeout
        dead = _until(http, lambda v: v["status"] == "dead", "became dead")
        assert dead["last_seen_s"] >= timeout
