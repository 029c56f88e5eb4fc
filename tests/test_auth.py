"""Tokens: an admin token for control and read endpoints, a join token to register, and per-worker
tokens so that one worker cannot act for another. Real coordinator processes on 127.0.0.1."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Coordinator, Fleet
from conftest import run_fedfleet as fedfleet
from fedfleet.coordinator.limits import Limits, RateLimit
from fedfleet.coordinator.security import SEPARATOR, Access, read_token, scope_of
from fedfleet.errors import ConfigError
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY, UpdateMeta

ADMIN = "admin-" + "a" * 40
JOIN = "join-" + "j" * 40
NULL_TASK = ("--task", "null", "--task-option", "params=1000", "--workers", "3", "--rounds", "2")


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def secured(fleet: Fleet, *args: str) -> Coordinator:
    admin = write_token(fleet.directory / "admin.token", ADMIN)
    join = write_token(fleet.directory / "join.token", JOIN)
    return fleet.coordinator(*args, "--admin-token-file", str(admin), "--join-token-file", str(join))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def coord(module_fleet: Fleet) -> Iterator[Coordinator]:
    # No workers started: the run waits, and every test here registers its own.
    yield secured(module_fleet, *NULL_TASK, "--workers", "30")


@pytest.fixture(scope="module")
def http(coord: Coordinator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=coord.url, timeout=10.0) as client:
        yield client


def register(http: httpx.Client, worker_id: str | None = None, **headers: str) -> httpx.Response:
    body = {"name": "test"} if worker_id is None else {"name": "test", "worker_id": worker_id}
    return http.post("/v1/workers", json=body, headers={"Authorization": f"Bearer {JOIN}", **headers})


# --- pure parts ---------------------------------------------------------------------------------
def test_worker_tokens_are_bound_to_their_worker_and_secret() -> None:
    access = Access(join_token=JOIN, secret=b"s" * 32)
    token = access.worker_token("w1")
    assert token is not None and token.startswith("w1" + SEPARATOR)
    assert access.worker_of(token) == "w1"
    assert access.worker_of(token.replace("w1", "w2", 1)) is None  # the MAC covers the id
    assert access.worker_of(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert Access(join_token=JOIN, secret=b"t" * 32).worker_of(token) is None  # another run's secret
    assert access.worker_of("no-separator") is None
    assert Access().worker_token("w1") is None  # an open coordinator issues none


def test_each_endpoint_needs_the_credential_of_its_kind() -> None:
    assert scope_of("GET", "/v1/health") == "public"
    assert scope_of("POST", "/v1/workers") == "join"
    assert scope_of("GET", "/v1/workers") == "admin"
    assert scope_of("GET", "/v1/workers/abc/task") == "worker"
    assert scope_of("POST", "/v1/updates") == "worker"
    assert scope_of("POST", "/v1/heartbeat") == "worker"
    assert scope_of("GET", "/v1/model") == "model"
    for path in ("/", "/predict", "/metrics", "/v1/status", "/v1/rounds", "/v1/events", "/v1/anything-new"):
        assert scope_of("GET", path) == "admin", path


def test_tokens_come_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDFLEET_TEST_TOKEN", raising=False)
    assert read_token(None, "FEDFLEET_TEST_TOKEN", "join token") is None
    monkeypatch.setenv("FEDFLEET_TEST_TOKEN", JOIN)
    assert read_token(None, "FEDFLEET_TEST_TOKEN", "join token") == JOIN
    assert read_token(write_token(tmp_path / "t", ADMIN), "FEDFLEET_TEST_TOKEN", "admin token") == ADMIN
    with pytest.raises(ConfigError, match="at least 16 characters"):
        read_token(write_token(tmp_path / "short", "abc"), "X", "admin token")
    with pytest.raises(ConfigError, match="cannot read the admin token file"):
        read_token(tmp_path / "missing", "X", "admin token")


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    bucket = RateLimit(rate=1000.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0  # the burst is spent; the next one must wait a little
    with pytest.raises(ConfigError, match="registration_rate"):
        Limits(registration_rate=0)
    with pytest.raises(ConfigError, match="max_body_bytes"):
        Limits(json_body_bytes=10)


# --- a live secured coordinator -----------------------------------------------------------------
def test_health_and_schema_are_public_and_everything_else_is_not(http: httpx.Client) -> None:
    assert http.get("/v1/health").status_code == 200
    assert http.get("/openapi.json").status_code == 200
    for method, path in (("GET", "/v1/status"), ("GET", "/v1/rounds"), ("GET", "/v1/workers"),
                         ("POST", "/v1/evaluate"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/v1/dashboard"),
                         ("GET", "/v1/model"), ("GET", "/v1/workers/x/task"), ("POST", "/v1/heartbeat")):
        r = http.request(method, path)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "token" in r.json()["detail"]


def test_admin_token_opens_control_endpoints_and_a_wrong_one_does_not(http: httpx.Client) -> None:
    assert http.get("/v1/status", headers=bearer(ADMIN)).json()["state"] == "waiting"
    assert http.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert http.get("/v1/workers", headers=bearer(ADMIN)).status_code == 200
    r = http.get("/v1/status", headers=bearer(ADMIN + "x"))
    assert r.status_code == 401 and "not the admin token" in r.json()["detail"]
    assert http.get("/v1/status", headers=bearer(JOIN)).status_code == 401  # the join token is not the admin's


def test_registration_needs_the_join_token(http: httpx.Client) -> None:
    assert http.post("/v1/workers", json={"name": "x"}).status_code == 401
    r = http.post("/v1/workers", json={"name": "x"}, headers=bearer(ADMIN))
    assert r.status_code == 401 and "join token" in r.json()["detail"]


def test_a_worker_token_acts_for_its_worker_only(http: httpx.Client) -> None:
    a, b = register(http).json(), register(http).json()
    ta, tb = a["token"], b["token"]
    assert ta and tb and ta != tb
    # Its own long-poll works; another's is forbidden; a worker token is no admin token.
    assert http.get(f"/v1/workers/{a['worker_id']}/task?wait=0", headers=bearer(ta)).status_code == 200
    r = http.get(f"/v1/workers/{b['worker_id']}/task?wait=0", headers=bearer(ta))
    assert r.status_code == 403 and "may only act for itself" in r.json()["detail"]
    r = http.get("/v1/status", headers=bearer(ta))
    assert r.status_code == 403 and "worker token may not be used here" in r.json()["detail"]
    assert http.get("/v1/model", headers=bearer(ta)).status_code == 200
    assert http.get("/v1/model", headers=bearer(ADMIN)).status_code == 200
    # Heartbeats carry each id's token.
    r = http.post("/v1/heartbeat", json={"worker_ids": [a["worker_id"]]}, headers=bearer(ta))
    assert r.status_code == 401 and "needs its worker token" in r.json()["detail"]
    r = http.post("/v1/heartbeat", json={"worker_ids": [a["worker_id"]], "tokens": [tb]}, headers=bearer(tb))
    assert r.status_code == 403 and "belongs to worker" in r.json()["detail"]
    r = http.post("/v1/heartbeat", json={"worker_ids": [a["worker_id"], b["worker_id"]], "tokens": [ta, tb]},
                  headers=bearer(ta))
    assert r.status_code == 200 and r.json()["known"] == 2


def test_an_update_in_another_workers_name_is_forbidden(http: httpx.Client) -> None:
    a, b = register(http).json(), register(http).json()
    meta = UpdateMeta(worker_id=b["worker_id"], round=0, attempt=0, num_examples=1)
    body = codec.encode({"w": np.zeros(1000, np.float32)}, {UPDATE_META_KEY: meta.model_dump_json()})
    r = http.post("/v1/updates", content=body, headers=bearer(a["token"]))
    assert r.status_code == 403 and b["worker_id"] in r.json()["detail"]
    # Nor may it open a resumable upload in B's name, nor anyone without a token.
    opening = {"worker_id": b["worker_id"], "round": 0, "attempt": 0, "total_bytes": len(body)}
    r = http.post("/v1/uploads", json=opening, headers=bearer(a["token"]))
    assert r.status_code == 403 and b["worker_id"] in r.json()["detail"]
    assert http.post("/v1/uploads", json=opening).status_code == 401
    assert http.get("/v1/uploads/0123456789abcdef0123456789abcdef").status_code == 401


def test_a_known_worker_id_is_taken_back_only_with_its_token(http: httpx.Client) -> None:
    first = register(http).json()
    r = register(http, first["worker_id"])
    assert r.status_code == 403 and "registered already" in r.json()["detail"]
    again = register(http, first["worker_id"], **{"X-Fedfleet-Worker-Token": first["token"]})
    assert again.status_code == 200
    assert again.json()["partition"] == first["partition"] and again.json()["token"] == first["token"]


def test_the_dashboard_signs_in_with_the_admin_token_as_a_cookie(http: httpx.Client) -> None:
    page = http.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and "<form" in page.text
    assert http.post("/login", data={"token": "wrong-" + "x" * 20}).status_code == 401
    r = http.post("/login", data={"token": ADMIN})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with httpx.Client(base_url=str(http.base_url), cookies=r.cookies, timeout=10.0) as browser:
        assert browser.get("/").status_code == 200
        assert browser.get("/v1/dashboard").status_code == 200


def test_refusals_are_counted_and_tokens_never_logged(coord: Coordinator, http: httpx.Client) -> None:
    http.get("/v1/status")  # at least one refusal, whatever ran before
    text = http.get("/metrics", headers=bearer(ADMIN)).text
    refused = sum(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith('fedfleet_requests_refused_total{reason="unauthorized"}'))
    assert refused >= 1
    log = coord.log_text()
    assert ADMIN not in log and JOIN not in log and SEPARATOR not in log


# --- whole runs -----------------------------------------------------------------------------------
def test_a_secured_run_finishes_and_a_worker_without_the_join_token_is_told_why(fleet: Fleet) -> None:
    c = secured(fleet, *NULL_TASK, "--min-workers", "2", "--linger", "2")
    join = str(fleet.directory / "join.token")
    outsider = fleet.worker(c.url, "--give-up", "5")
    assert outsider.proc.wait(timeout=60) == 1
    assert "HTTP 401" in outsider.log_text() and "join token" in outsider.log_text()
    w = fleet.worker(c.url, "--join-token-file", join, clients=2)
    assert w.proc.wait(timeout=120) == 0, w.log_text()
    assert c.proc.wait(timeout=60) == 0, c.log_text()
    summary = json.loads((c.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["rounds"] == 2
    # The worker keeps its token where only its user can read it, for a restart.
    state = w.state_dir / "client-0.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600 and json.loads(state.read_text())["token"]
    assert stat.S_IMODE((c.data_dir / "auth.key").stat().st_mode) == 0o600


def test_a_model_big_enough_for_chunked_uploads_goes_through_with_tokens(fleet: Fleet) -> None:
    # 17M float32 = 68 MB: above the size from which workers upload in resumable chunks (64 MiB).
    c = secured(fleet, "--task", "null", "--task-option", "params=17000000", "--workers", "1", "--rounds", "1",
                "--linger", "1")
    w = fleet.worker(c.url, "--join-token-file", str(fleet.directory / "join.token"))
    assert w.proc.wait(timeout=180) == 0, w.log_text()
    assert c.proc.wait(timeout=60) == 0, c.log_text()
    assert json.loads((c.data_dir / "summary.json").read_text())["state"] == "finished"
    assert not any((c.data_dir / "uploads").glob("*"))  # nothing left half-uploaded


def test_registrations_over_the_rate_get_429_with_retry_after(fleet: Fleet) -> None:
    c = secured(fleet, *NULL_TASK, "--registration-rate", "0.1", "--registration-burst", "2")
    with httpx.Client(base_url=c.url, timeout=10.0) as http:
        codes = [register(http).status_code for _ in range(3)]
        assert codes[:2] == [200, 200]
        r = register(http)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "too many registrations" in r.json()["detail"]


def test_serving_beyond_loopback_without_a_join_token_is_refused(tmp_path: Path) -> None:
    r = fedfleet("coordinator", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d"),
                 env={"FEDFLEET_JOIN_TOKEN": ""})
    assert r.returncode == 2
    assert "refusing to serve on 0.0.0.0 without a join token" in r.stderr and "--insecure" in r.stderr


def test_a_short_token_is_a_cli_error(tmp_path: Path) -> None:
    r = fedfleet("coordinator", "--port", "0", "--data-dir", str(tmp_path / "d"),
                 "--admin-token-file", str(write_token(tmp_path / "t", "short")))
    assert r.returncode == 2 and "admin token must be at least 16 characters" in r.stderr
