"""Views that used to list every worker are paged (issue 16): ``/v1/workers?offset=&limit=`` with the
total in ``X-Total-Count``, the dashboard's state with a page of workers and ``workers_page``, and a
waiting round names at most 50 workers in status. A real coordinator on 127.0.0.1; workers registered
over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import Coordinator, Fleet

REGISTERED = 55


@pytest.fixture(scope="module")
def coord(module_fleet: Fleet) -> Iterator[Coordinator]:
    # One partition more than workers registered: the first round waits, and the workers go quiet (dead).
    c = module_fleet.coordinator("--task", "null", "--task-option", "params=10", "--workers", str(REGISTERED + 1),
                                 "--rounds", "1", "--worker-timeout", "1", "--wait-timeout", "600")
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        for i in range(REGISTERED):
            assert http.post("/v1/workers", json={"name": f"w{i}"}).status_code == 200
    yield c


@pytest.fixture(scope="module")
def http(coord: Coordinator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=coord.url, timeout=10.0) as client:
        yield client


def test_workers_are_paged_by_partition_with_the_total_in_a_header(http: httpx.Client) -> None:
    everyone = http.get("/v1/workers")
    assert everyone.status_code == 200 and len(everyone.json()) == REGISTERED  # no limit: all, as before
    assert everyone.headers["x-total-count"] == str(REGISTERED)
    page = http.get("/v1/workers", params={"offset": 10, "limit": 5})
    assert page.headers["x-total-count"] == str(REGISTERED)
    assert [w["partition"] for w in page.json()] == [w["partition"] for w in everyone.json()[10:15]]
    tail = http.get("/v1/workers", params={"offset": 50, "limit": 100}).json()
    assert len(tail) == REGISTERED - 50
    assert http.get("/v1/workers", params={"offset": 1000}).json() == []


@pytest.mark.parametrize(("params", "named"), [({"limit": 0}, "limit"), ({"offset": -1}, "offset"),
                                               ({"limit": "ten"}, "limit")])
def test_a_bad_page_is_a_422_naming_the_parameter(http: httpx.Client, params: dict[str, object], named: str) -> None:
    r = http.get("/v1/workers", params=params)
    assert r.status_code == 422 and named in r.json()["detail"], r.text


def test_the_dashboard_carries_one_page_of_workers_and_says_how_many_there_are(http: httpx.Client) -> None:
    body = http.get("/v1/dashboard", params={"workers_limit": 20, "workers_offset": 40}).json()
    assert len(body["workers"]) == REGISTERED - 40
    assert body["workers_page"] == {"offset": 40, "limit": 20, "total": REGISTERED}
    default = http.get("/v1/dashboard").json()
    assert len(default["workers"]) == REGISTERED and default["workers_page"]["total"] == REGISTERED
    r = http.get("/v1/dashboard", params={"workers_limit": 0})
    assert r.status_code == 422 and "workers_limit" in r.json()["detail"]


def test_the_events_stream_sends_the_page_it_was_asked_for(http: httpx.Client) -> None:
    with http.stream("GET", "/v1/events", params={"workers_limit": 3}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert '"workers_page":{"offset":0,"limit":3,"total":55}' in line
                break


def test_a_waiting_round_names_at_most_50_workers_and_counts_the_rest(http: httpx.Client) -> None:
    end = time.monotonic() + 30
    while True:
        waiting = http.get("/v1/status").json()["waiting"]
        # Every registered worker went quiet after --worker-timeout 1 s: all are missing, with the empty partition.
        if (waiting and waiting["live"] == 0 and len(waiting["waiting_for"]) == 52) or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert waiting is not None and waiting["live"] == 0, waiting
    missing = waiting["waiting_for"]
    assert len(missing) == 52, missing
    assert missing[50:] == [f"{REGISTERED - 50} more registered workers", "1 partition with no worker yet"]
