"""Fewer requests per worker and round (issue 16): a long-poll that says which model version the worker
holds (``have=``) is answered with the newer model too when it is small, so training needs no download
request of its own. Real coordinator and worker processes on 127.0.0.1, every request through a
recording TCP proxy."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from conftest import Fleet, wait_for_train_task
from fedfleet.protocol import codec
from fedfleet.protocol.messages import INSTRUCTION_BYTES_HEADER
from tcp_proxy import CutProxy

ROUNDS = 3


@pytest.mark.slow
def test_workers_get_the_model_with_their_instruction_and_never_download_it(fleet: Fleet) -> None:
    c = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", "3", "--rounds",
                          str(ROUNDS), "--linger", "1")
    port = urlsplit(c.url).port
    assert port is not None
    proxy = CutProxy(port, record=True)
    try:
        w = fleet.worker(proxy.url, clients=3)
        assert c.proc.wait(timeout=120) == 0, fleet.logs()
        assert w.proc.wait(timeout=30) == 0, w.log_text()
        sent = b"".join(proxy.sent())
    finally:
        proxy.close()
    summary = json.loads((c.data_dir / "summary.json").read_text())
    # The null task's loss is the model's mean, +1 a round: each round trained on the model it was sent.
    assert summary["state"] == "finished" and summary["final_loss"] == pytest.approx(ROUNDS), summary
    assert b"GET /v1/model" not in sent
    assert sent.count(b"/task?wait=") == sent.count(b"&have=") > 0


def test_a_poll_gets_the_model_only_when_its_version_is_older(fleet: Fleet) -> None:
    c = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", "1", "--rounds", "1")
    with httpx.Client(base_url=c.url, timeout=30.0) as http:
        wid = http.post("/v1/workers", json={"name": "w"}).json()["worker_id"]
        task = wait_for_train_task(http, wid)
        version = task["model_version"]
        r = http.get(f"/v1/workers/{wid}/task", params={"wait": 0, "have": -1})
        head = int(r.headers[INSTRUCTION_BYTES_HEADER])
        assert json.loads(r.content[:head]) == task
        weights, _ = codec.decode(r.content[head:])
        assert np.array_equal(weights["w"], codec.decode(http.get("/v1/model").content)[0]["w"])
        assert r.headers["x-fedfleet-model-version"] == str(version)
        # Holding that version already, or not saying: the instruction alone, as JSON.
        for params in ({"wait": 0, "have": version}, {"wait": 0}):
            r = http.get(f"/v1/workers/{wid}/task", params=params)
            assert INSTRUCTION_BYTES_HEADER.lower() not in r.headers and r.json() == task
        r = http.get(f"/v1/workers/{wid}/task", params={"wait": 0, "have": "new"})
        assert r.status_code == 422 and "have" in r.json()["detail"]


def test_idle_workers_send_no_heartbeats_and_stay_alive(fleet: Fleet) -> None:
    # Four partitions, three workers: the first round waits, the workers idle in long-polls. With
    # --worker-timeout 2 a worker process would beat every 0.5 s; a held long-poll keeps a worker alive
    # instead, so idle workers cost no heartbeats (before: one a beat for all of the process's workers).
    c = fleet.coordinator("--task", "null", "--task-option", "params=10", "--workers", "4", "--rounds", "1",
                          "--worker-timeout", "2", "--wait-timeout", "600")
    port = urlsplit(c.url).port
    assert port is not None
    proxy = CutProxy(port, record=True)
    try:
        fleet.worker(proxy.url, clients=3)
        with httpx.Client(base_url=c.url, timeout=10.0) as http:
            end = time.monotonic() + 60
            while http.get("/v1/status").json()["workers_registered"] < 3 and time.monotonic() < end:
                time.sleep(0.2)
            time.sleep(5.0)  # well past --worker-timeout
            status = http.get("/v1/status").json()
        sent = b"".join(proxy.sent())
    finally:
        proxy.close()
    assert status["workers_registered"] == 3 and status["workers_live"] == 3, status
    assert sent.count(b"/task?wait=") >= 3
    assert b"POST /v1/heartbeat" not in sent
