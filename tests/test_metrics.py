"""The coordinator's /metrics and a worker's metrics port, read over HTTP after real rounds.

The coordinator runs in this process (its engine and app on uvicorn in a thread, on a loopback
port), started without ``on_done``: unlike ``fedfleet coordinator`` it keeps serving when the run is
over, so that a test can read what the finished run left in /metrics. Workers are real
``WorkerProcess`` objects in threads (the same code ``fedfleet worker`` runs), so that their own
metrics registry can be read after they stop. Tests with real processes and a real Prometheus
server are in test_prometheus.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from fedfleet.asgi import bind
from fedfleet.config import RunConfig
from fedfleet.coordinator.app import create_app
from fedfleet.coordinator.engine import Engine
from fedfleet.coordinator.metrics import REJECT_REASONS, rejection_reason
from fedfleet.errors import ProtocolError, RequestRejected
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY
from fedfleet.tasks import load_task
from fedfleet.tasks.songs import SongsTask
from fedfleet.worker.agent import WorkerProcess
from fedfleet.worker.metrics import WorkerMetrics, serve
from metrics_support import (
    DASHBOARDS,
    DEPLOY,
    Samples,
    dashboard_queries,
    exported_names,
    metric_names,
    panels_of,
    scrape,
    value,
)

TIMEOUT = 30.0  # per request
RUN_BUDGET = 120.0  # seconds a short run may take before the test fails instead of hanging
OCTET = {"Content-Type": "application/octet-stream"}


@contextlib.contextmanager
def serving(engine: Engine) -> Iterator[str]:
    """The engine's app on uvicorn in a thread on a free loopback port; its URL. Stopped on exit."""
    app = create_app(engine)  # no on_done: keep serving after the run
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="coordinator", daemon=True)
    thread.start()
    end = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "the in-process coordinator did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        engine.close()


def make_engine(tmp_path: Path, **options: Any) -> Engine:
    config = RunConfig.from_mapping({"task": "songs", **options})
    return Engine.open(config, load_task(config.task, config.task_options_dict), tmp_path / "coordinator", linger=0.0)


def wait_state(url: str, state: str) -> dict[str, Any]:
    end = time.monotonic() + RUN_BUDGET
    while True:
        s: dict[str, Any] = httpx.get(f"{url}/v1/status", timeout=TIMEOUT).json()
        if s["state"] == state:
            return s
        assert s["state"] not in ("finished", "failed"), s
        assert time.monotonic() < end, f"run did not reach {state!r} within {RUN_BUDGET:g} s: {s}"
        time.sleep(0.05)


def rejected(samples: Samples) -> dict[str, float]:
    return {r: value(samples, "fedfleet_updates_rejected_total", reason=r) for r in REJECT_REASONS}


# --- a short run, then /metrics ------------------------------------------------------------------
ROUNDS, CLIENTS = 3, 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, WorkerProcess]]:
    """A finished 3-round songs run of 2 workers; yields (coordinator URL, worker metrics URL, worker process)."""
    tmp = tmp_path_factory.mktemp("metrics-run")
    (tmp / "coordinator").mkdir()
    engine = make_engine(tmp, workers=CLIENTS, rounds=ROUNDS)
    with serving(engine) as url:
        proc = WorkerProcess(url, CLIENTS, tmp / "worker", name="test", give_up=30.0)
        server = serve(proc.metrics, "127.0.0.1", 0)  # port 0: any free one (the CLI reserves 0 for "off")
        thread = threading.Thread(target=proc.run, name="workers", daemon=True)
        thread.start()
        try:
            wait_state(url, "finished")
            thread.join(RUN_BUDGET)
            assert not thread.is_alive(), "the workers did not stop after the run"
            assert proc.errors == []
            yield url, f"http://127.0.0.1:{server.server_port}/metrics", proc
        finally:
            proc.stop.set()
            server.shutdown()


def test_accepted_updates_equal_participants_and_rounds_are_counted(finished_run: tuple[str, str, Any]) -> None:
    url, _, _ = finished_run
    rounds = httpx.get(f"{url}/v1/rounds", timeout=TIMEOUT).json()
    status = httpx.get(f"{url}/v1/status", timeout=TIMEOUT).json()
    m = scrape(f"{url}/metrics")
    assert len(rounds) == ROUNDS
    participants = sum(r["participants"] for r in rounds)
    assert participants == ROUNDS * CLIENTS  # a clean run: every sampled worker answered every round
    assert value(m, "fedfleet_updates_accepted_total", kind="train") == participants
    assert value(m, "fedfleet_updates_accepted_total", kind="stats") == CLIENTS  # the standardisation round
    assert value(m, "fedfleet_rounds_completed_total") == ROUNDS
    assert value(m, "fedfleet_rounds_missed_quorum_total") == 0
    assert value(m, "fedfleet_current_round") == ROUNDS
    assert value(m, "fedfleet_rounds_planned") == ROUNDS
    assert value(m, "fedfleet_round_participants") == rounds[-1]["participants"]
    # The histograms hold exactly the timings the round records hold.
    assert value(m, "fedfleet_round_duration_seconds_count") == ROUNDS
    assert value(m, "fedfleet_round_duration_seconds_sum") == pytest.approx(sum(r["seconds"] for r in rounds))
    for name, key in [("aggregation", "aggregate"), ("evaluation", "evaluate"), ("checkpoint", "checkpoint")]:
        assert value(m, f"fedfleet_{name}_duration_seconds_count") == ROUNDS
        assert value(m, f"fedfleet_{name}_duration_seconds_sum") == pytest.approx(
            sum(r["timings"][key] for r in rounds))
        assert value(m, f"fedfleet_{name}_duration_seconds_bucket", le="+Inf") == ROUNDS
    # Train-round bytes are in the round records; the statistics round adds its small updates.
    assert value(m, "fedfleet_update_received_bytes_total") > sum(r["bytes_in"] for r in rounds) > 0
    assert value(m, "fedfleet_model_sent_bytes_total") >= sum(r["bytes_out"] for r in rounds) > 0
    assert value(m, "fedfleet_global_accuracy_ratio") == status["accuracy"]
    assert value(m, "fedfleet_global_loss") == status["loss"]
    assert 0 < status["accuracy"] <= 1
    assert value(m, "fedfleet_run_state", state="finished") == 1
    assert value(m, "fedfleet_run_state", state="running") == 0
    assert value(m, "fedfleet_workers", state="registered") == CLIENTS
    assert value(m, "fedfleet_workers", state="sampled") == 0  # no round is open
    assert value(m, "fedfleet_workers", state="dropped") == 0
    assert set(rejected(m).values()) == {0.0}
    assert value(m, "process_resident_memory_bytes") > 0


def test_update_after_the_run_counts_as_stale(finished_run: tuple[str, str, Any]) -> None:
    url, _, _ = finished_run
    wid = httpx.get(f"{url}/v1/workers", timeout=TIMEOUT).json()[0]["worker_id"]
    before = scrape(f"{url}/metrics")
    r = post_update(url, stats_update(worker_id=wid, round=1))
    assert r.status_code == 409, r.text
    after = scrape(f"{url}/metrics")
    assert delta(before, after) == {"stale": 1}
    assert value(after, "fedfleet_updates_accepted_total", kind="train") == value(
        before, "fedfleet_updates_accepted_total", kind="train")


def test_worker_metrics_after_the_run(finished_run: tuple[str, str, WorkerProcess]) -> None:
    _, worker_url, _ = finished_run
    m = scrape(worker_url)
    assert value(m, "fedfleet_worker_clients") == CLIENTS
    assert value(m, "fedfleet_worker_train_duration_seconds_count") == ROUNDS * CLIENTS
    assert value(m, "fedfleet_worker_train_examples_per_second_count") == ROUNDS * CLIENTS
    assert value(m, "fedfleet_worker_train_duration_seconds_sum") > 0
    # One download per model version per process, however many logical workers it hosts.
    assert value(m, "fedfleet_worker_model_download_duration_seconds_count") == ROUNDS
    # Statistics and training updates, each accepted; their upload times are the accepted ones.
    assert value(m, "fedfleet_worker_uploads_total", result="accepted") == (ROUNDS + 1) * CLIENTS
    assert value(m, "fedfleet_worker_update_upload_duration_seconds_count") == (ROUNDS + 1) * CLIENTS
    for result in ("rejected", "refused", "failed"):
        assert value(m, "fedfleet_worker_uploads_total", result=result) == 0
    # Each fit is one epoch over the worker's partition less its validation split: the examples
    # split the training set, less the share every worker keeps to score the global model.
    train_rows = len(SongsTask().load_test()) * 4  # the test set is a 20% stratified hold-out
    examples = value(m, "fedfleet_worker_examples_trained_total")
    assert examples / ROUNDS == pytest.approx(train_rows * (1 - RunConfig().val_fraction), rel=0.01)
    assert value(m, "process_cpu_seconds_total") > 0
    assert value(m, "process_resident_memory_bytes") > 0


def test_metrics_endpoint_formats_and_documentation(finished_run: tuple[str, str, Any]) -> None:
    url, _, _ = finished_run
    om = httpx.get(f"{url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                   timeout=TIMEOUT)
    assert om.status_code == 200
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    # A request body is no business of /metrics: the JSON body limit (1 MiB) does not apply to it.
    big = httpx.request("GET", f"{url}/metrics", content=b"x" * (2 * 1024 * 1024), timeout=TIMEOUT)
    assert big.status_code == 200 and "fedfleet_rounds_completed_total" in big.text
    spec = httpx.get(f"{url}/openapi.json", timeout=TIMEOUT).json()
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


# --- rejections by reason, against an open round -------------------------------------------------
A, B, C = "wa", "wb", "wc"  # A and B are sampled for the statistics round; C registers after it opened
D = len(SongsTask.features)


def stats_update(worker_id: str = A, round: int = 0, fill: float = 1.0,
                 weights: dict[str, np.ndarray] | None = None, meta: dict[str, str] | None = None) -> bytes:
    if weights is None:
        weights = {"count": np.array([10.0]), "sum": np.full(D, fill * 10), "sumsq": np.full(D, fill * fill * 10)}
    if meta is None:
        meta = {UPDATE_META_KEY: (f'{{"worker_id": "{worker_id}", "round": {round}, "attempt": 0, '
                                  '"num_examples": 10}')}
    return codec.encode(weights, meta)


def post_update(url: str, body: bytes) -> httpx.Response:
    # A fresh connection per upload: the server may close one whose body it did not read.
    return httpx.post(f"{url}/v1/updates", content=body, headers=OCTET, timeout=TIMEOUT)


def delta(before: Samples, after: Samples) -> dict[str, float]:
    """How the rejected counters moved, by reason (reasons that did not move are left out)."""
    b, a = rejected(before), rejected(after)
    return {r: a[r] - b[r] for r in REJECT_REASONS if a[r] != b[r]}


@pytest.fixture(scope="module")
def open_round(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A coordinator whose statistics round is open for A and B (C registered late); yields its URL."""
    tmp = tmp_path_factory.mktemp("metrics-open")
    (tmp / "coordinator").mkdir()
    engine = make_engine(tmp, workers=3, min_workers=2, rounds=3, round_timeout=600, worker_timeout=600,
                         wait_timeout=600)
    with serving(engine) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        for wid in (A, B):
            assert client.post("/v1/workers", json={"worker_id": wid}).status_code == 200
        end = time.monotonic() + RUN_BUDGET
        while client.get(f"/v1/workers/{A}/task", params={"wait": 5}).json()["kind"] != "stats":
            assert time.monotonic() < end, "the statistics round did not open"
        assert client.post("/v1/workers", json={"worker_id": C}).status_code == 200
        yield url


NAN = {"count": np.array([10.0]), "sum": np.full(D, np.nan), "sumsq": np.full(D, 10.0)}
WRONG_NAMES = {"count": np.array([10.0]), "total": np.full(D, 10.0), "sumsq": np.full(D, 10.0)}


@pytest.mark.parametrize(("body", "status", "reason"), [
    (stats_update(worker_id="nobody"), 404, "unknown_worker"),
    (stats_update(worker_id=C), 409, "not_sampled"),
    (stats_update(round=5), 409, "stale"),
    (b"this is not safetensors", 400, "bad_body"),
    (stats_update(meta={}), 422, "bad_metadata"),
    (stats_update(meta={UPDATE_META_KEY: '{"worker_id": "wa"}'}), 422, "bad_metadata"),
    (stats_update(weights=WRONG_NAMES), 422, "bad_schema"),
    (stats_update(weights=NAN), 422, "non_finite"),
    (b"\0" * (2 * 1024 * 1024), 413, "too_large"),
], ids=["unknown-worker", "not-sampled", "stale", "not-safetensors", "no-metadata", "bad-metadata",
        "wrong-tensors", "nan", "too-large"])
def test_rejected_update_counts_under_its_reason(open_round: str, body: bytes, status: int, reason: str) -> None:
    before = scrape(f"{open_round}/metrics")
    r = post_update(open_round, body)
    assert r.status_code == status, r.text
    after = scrape(f"{open_round}/metrics")
    assert delta(before, after) == {reason: 1}
    for kind in ("stats", "train"):
        assert value(after, "fedfleet_updates_accepted_total", kind=kind) == 0


def test_accepted_then_duplicate_update(open_round: str) -> None:
    before = scrape(f"{open_round}/metrics")
    assert value(before, "fedfleet_workers", state="registered") == 3
    assert value(before, "fedfleet_workers", state="live") == 3
    assert value(before, "fedfleet_workers", state="sampled") == 2
    assert value(before, "fedfleet_workers", state="answered") == 0
    body = stats_update(worker_id=A)
    assert post_update(open_round, body).status_code == 200
    accepted = scrape(f"{open_round}/metrics")
    assert value(accepted, "fedfleet_updates_accepted_total", kind="stats") == 1
    assert value(accepted, "fedfleet_update_received_bytes_total") == value(
        before, "fedfleet_update_received_bytes_total") + len(body)
    assert value(accepted, "fedfleet_workers", state="answered") == 1
    assert delta(before, accepted) == {}
    again = post_update(open_round, body)
    assert again.status_code == 409, again.text
    after = scrape(f"{open_round}/metrics")
    assert delta(accepted, after) == {"duplicate": 1}
    assert value(after, "fedfleet_updates_accepted_total", kind="stats") == 1


def test_model_bytes_sent_count_bodies_not_304s(open_round: str) -> None:
    before = value(scrape(f"{open_round}/metrics"), "fedfleet_model_sent_bytes_total")
    r = httpx.get(f"{open_round}/v1/model", timeout=TIMEOUT)
    assert r.status_code == 200
    assert value(scrape(f"{open_round}/metrics"), "fedfleet_model_sent_bytes_total") == before + len(r.content)
    again = httpx.get(f"{open_round}/v1/model", headers={"If-None-Match": r.headers["etag"]}, timeout=TIMEOUT)
    assert again.status_code == 304
    assert value(scrape(f"{open_round}/metrics"), "fedfleet_model_sent_bytes_total") == before + len(r.content)


def test_rejection_reason_of_errors() -> None:
    assert rejection_reason(RequestRejected("x", reason="duplicate")) == "duplicate"
    assert rejection_reason(RequestRejected("x", status=404)) == "unknown_worker"
    assert rejection_reason(ProtocolError("x", status=413)) == "too_large"
    assert rejection_reason(ProtocolError("x", status=500)) == "other"
    # A reason outside the fixed set must not create a new time series.
    assert rejection_reason(ProtocolError("x", reason="made-up")) == "other"
    assert rejection_reason(RuntimeError("bug")) == "other"


def test_worker_metrics_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "fedfleet", "worker", "--coordinator", "http://127.0.0.1:9",
                            "--state-dir", str(tmp_path), "--metrics-port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"fedfleet: error: The 'metrics-port' option: cannot serve metrics on 127.0.0.1:{port}" in r.stderr


# --- the dashboards name only metrics the code exports --------------------------------------------
def test_every_dashboard_query_names_an_exported_metric(tmp_path: Path) -> None:
    (tmp_path / "coordinator").mkdir()
    engine = make_engine(tmp_path, task_options={"params": "10"}, task="null")
    try:
        exported = exported_names(engine.metrics.registry) | exported_names(WorkerMetrics().registry)
    finally:
        engine.close()
    queries = dashboard_queries()
    assert len(DASHBOARDS) == 2 and len(queries) >= 20
    for q in queries:
        names = metric_names(q.expr)
        assert names, f"{q.dashboard} / {q.panel}: no metric name found in {q.expr!r}"
        missing = names - exported
        assert not missing, f"{q.dashboard} / {q.panel}: {sorted(missing)} not exported by fedfleet ({q.expr})"
    used = set().union(*(metric_names(q.expr) for q in queries))
    # Both sides are on show: the coordinator's run and the workers'.
    assert "fedfleet_global_accuracy_ratio" in used and "fedfleet_worker_train_duration_seconds_bucket" in used


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$i"}[$__rate_interval])))') == {
        "a_bucket"}
    assert metric_names("rate(b_total[5m]) / on (instance) group_left c * 1e3 > bool 0") == {"b_total", "c"}
    assert metric_names('label_values(d_info{job="x"}, instance)') == {"d_info"}
    assert metric_names("sum without (le) (e) offset 5m and f unless g") == {"e", "f", "g"}


def test_dashboards_use_the_provisioned_datasource() -> None:
    import yaml

    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    providers = yaml.safe_load((provisioning / "dashboards" / "fedfleet.yaml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    seen_uids = set()
    for path in DASHBOARDS:
        board = yaml.safe_load(path.read_text())  # JSON is YAML; one parser for both
        assert board["uid"] not in seen_uids
        seen_uids.add(board["uid"])
        for panel in panels_of(path):
            assert panel["datasource"]["uid"] in uids, f"{path.name} / {panel['title']}"
            for t in panel["targets"]:
                assert t["datasource"]["uid"] in uids, f"{path.name} / {panel['title']}"
        ids = [p["id"] for p in panels_of(path)]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
    assert seen_uids == {"fedfleet-run", "fedfleet-workers"}
