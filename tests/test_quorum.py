"""Below quorum the coordinator waits, up to its configured timeouts, then fails the run with a message
that says why: never a silent hang. Real coordinator and worker processes on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable

import httpx

from conftest import Fleet

NULL = ("--task", "null", "--task-option", "params=1000", "--val-fraction", "0", "--linger", "1")


def summary(fleet: Fleet) -> dict[str, object]:
    return json.loads((fleet.coordinators[-1].data_dir / "summary.json").read_text())  # type: ignore[no-any-return]


Rounds = list[dict[str, object]]


def rounds_when(http: httpx.Client, done: Callable[[Rounds], bool], timeout: float = 60.0) -> Rounds:
    """/v1/rounds once ``done`` holds for it (or ``timeout`` passed: the caller's asserts then say what)."""
    end = time.monotonic() + timeout
    while True:
        history: Rounds = http.get("/v1/rounds").json()
        if done(history) or time.monotonic() > end:
            return history
        time.sleep(0.1)


def test_too_few_workers_fail_the_run_after_the_wait_timeout(fleet: Fleet) -> None:
    # Long enough for the one worker to start and register even on a loaded machine.
    c = fleet.coordinator(*NULL, "--workers", "3", "--rounds", "2", "--wait-timeout", "20")
    fleet.worker(c.url)  # one of the three it needs
    assert c.proc.wait(timeout=60) == 1
    s = summary(fleet)
    assert s["state"] == "failed" and s["rounds"] == 0
    assert "only 1 of the 3 workers needed were alive after waiting 20 s (--wait-timeout)" in str(s["message"])


def test_a_frozen_worker_makes_rounds_miss_their_quorum_until_the_run_fails(fleet: Fleet) -> None:
    # A SIGSTOPped worker (a paused VM, a swapped-out host) is still counted alive for --worker-timeout,
    # so it is sampled and never answers: with quorum 1.0 every attempt of the round misses.
    c = fleet.coordinator(*NULL, "--workers", "2", "--rounds", "1000", "--quorum", "1.0", "--round-timeout", "2",
                          "--worker-timeout", "120", "--max-round-retries", "2")
    a, b = fleet.worker(c.url), fleet.worker(c.url)
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        end = time.monotonic() + 60
        while http.get("/v1/status").json()["round"] < 2 and time.monotonic() < end:
            time.sleep(0.1)
        b.kill(signal.SIGSTOP)
        assert c.proc.wait(timeout=90) == 1
    b.kill(signal.SIGKILL)
    s = summary(fleet)
    assert s["state"] == "failed" and 2 <= int(str(s["rounds"])) < 1000
    message = str(s["message"])
    assert "missed its quorum 3 times in a row (--max-round-retries 2)" in message
    assert "--round-timeout 2 s" in message
    # The worker that kept answering is told the run is over and stops by itself.
    assert a.proc.wait(timeout=60) == 0, a.log_text()


def test_rounds_close_at_their_deadline_without_a_slow_worker_and_it_rejoins(fleet: Fleet) -> None:
    # Quorum 0.5 of 2: while one worker is frozen (as slow as can be), each round closes at its 2 s
    # deadline with the other's update; woken up, the slow one is sampled and answers again.
    c = fleet.coordinator(*NULL, "--workers", "2", "--rounds", "1000", "--quorum", "0.5", "--round-timeout", "2",
                          "--worker-timeout", "120")
    fast, slow = fleet.worker(c.url), fleet.worker(c.url)
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        rounds_when(http, lambda h: len(h) >= 2)
        slow.kill(signal.SIGSTOP)
        frozen_from = len(rounds_when(http, lambda h: True))
        woken_at = len(rounds_when(http, lambda h: len(h) >= frozen_from + 3))
        slow.kill(signal.SIGCONT)
        history = rounds_when(http, lambda h: any(r["participants"] == 2 for r in h[woken_at:]))
    # Frozen: every round closed with the one answer it could get, none waited forever.
    frozen = history[frozen_from + 1:woken_at]
    assert len(frozen) >= 2 and all(r["participants"] == 1 for r in frozen), frozen
    # Woken: it takes part again.
    assert any(r["participants"] == 2 for r in history[woken_at:]), history[woken_at:]
    assert fast.proc.poll() is None and slow.proc.poll() is None


def test_a_worker_joining_mid_run_gets_the_free_partition_and_work(fleet: Fleet) -> None:
    c = fleet.coordinator(*NULL, "--workers", "3", "--min-workers", "2", "--rounds", "1000", "--round-timeout", "30")
    fleet.worker(c.url, clients=2)
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        before = rounds_when(http, lambda h: len(h) >= 2)
        assert all(r["sampled"] == 2 for r in before)
        joined_at = len(before)
        fleet.worker(c.url)
        after = rounds_when(http, lambda h: any(r["participants"] == 3 for r in h[joined_at:]))
        assert any(r["participants"] == 3 and r["sampled"] == 3 for r in after[joined_at:])
        workers = http.get("/v1/workers").json()
    assert sorted(w["partition"] for w in workers) == ["part-000-of-003", "part-001-of-003", "part-002-of-003"]
