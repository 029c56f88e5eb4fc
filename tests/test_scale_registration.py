"""Many workers registering at once against the coordinator's registration rate limit (issue 16).

A 429 is an answer: the coordinator is alive and asks the worker to come back later. A worker must
never give up on it as if the coordinator were unreachable, or the run waits out --wait-timeout for
a partition nobody holds. Real coordinator and worker processes on 127.0.0.1.
"""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import Fleet

WORKERS = 12


@pytest.mark.slow
def test_workers_rate_limited_longer_than_give_up_all_register_and_the_run_finishes(fleet: Fleet) -> None:
    # 2 registrations at once, then one every 0.5 s: the last of 12 workers is turned away with 429 for
    # about 5 s, more than twice --give-up. Before the fix, workers gave up on 429s as on a dead coordinator
    # ("no answer for 2 s") and the first round waited for their partitions until --wait-timeout.
    c = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", str(WORKERS),
                          "--rounds", "2", "--wait-timeout", "60", "--linger", "1",
                          "--registration-rate", "2", "--registration-burst", "2")
    w = fleet.worker(c.url, "--give-up", "2", clients=WORKERS)
    assert c.proc.wait(timeout=120) == 0, fleet.logs()
    summary = json.loads((c.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["rounds"] == 2, summary
    assert w.proc.wait(timeout=30) == 0, w.log_text()
    log = w.log_text()
    assert "worker.failed" not in log
    # The worker said it was being turned away, and why, rather than retrying in silence.
    assert "worker.busy" in log and "HTTP 429" in log


def test_a_429_carries_retry_after_that_the_client_reads(fleet: Fleet) -> None:
    from fedfleet.protocol.client import CoordinatorBusy, CoordinatorClient

    c = fleet.coordinator("--task", "null", "--task-option", "params=1000", "--workers", "5",
                          "--registration-rate", "0.1", "--registration-burst", "1")
    client = CoordinatorClient(c.url, timeout=10.0)
    try:
        client.register(None, "first")
        with pytest.raises(CoordinatorBusy) as info:
            client.register(None, "second")
        assert info.value.retry_after >= 1.0 and "HTTP 429" in str(info.value)
    finally:
        client.close()
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        assert http.get("/v1/status").json()["workers_registered"] == 1
