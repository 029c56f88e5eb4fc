"""Bad input to every /v1 endpoint of a real coordinator process gets a 4xx naming the problem,
and changes nothing: the coordinator keeps serving and the open round keeps what it had.

One coordinator (songs task) serves the whole module. Two workers registered by hand ("wa", "wb")
open the statistics round (round 0, kind "stats"); a third ("wc") registers after it opened, so it
is not sampled. That needs --workers 3 --min-workers 2 (with --workers 2 no third worker could
register). Long round and worker timeouts keep the round open while the bad requests go in.

The tests share the coordinator and run in file order: the bad-input tests first, each leaving the
round as it found it (both sampled workers still owe their update), and last
``test_valid_updates_still_accepted_after_bad_input``, which completes the round and checks that
the counts and the resulting model are exactly those of the valid updates.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from conftest import Coordinator, Fleet
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY, UpdateMeta
from fedfleet.tasks.songs import SongsTask
from fedfleet.types import schema_of

A, B, C = "wa", "wb", "wc"  # A and B are sampled for round 0; C registers after it opened
OCTET = {"Content-Type": "application/octet-stream"}
TIMEOUT = 30.0  # per request: a hang fails the test instead of stalling the suite
D = len(SongsTask.features)


@dataclass
class Run:
    coord: Coordinator
    http: httpx.Client
    stats_task: dict[str, Any]

    @property
    def url(self) -> str:
        return self.coord.url


@pytest.fixture(scope="module")
def run(module_fleet: Fleet) -> Iterator[Run]:
    coord = module_fleet.coordinator(
        "--task", "songs", "--workers", "3", "--min-workers", "2", "--rounds", "3",
        "--round-timeout", "600", "--worker-timeout", "600", "--wait-timeout", "600", "--linger", "0")
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as client:
        for wid in (A, B):
            r = client.post("/v1/workers", json={"worker_id": wid, "name": "by hand"})
            assert r.status_code == 200, r.text
        task = poll_task(client, A, lambda t: t["kind"] != "wait")
        assert poll_task(client, B, lambda t: t["kind"] != "wait")["kind"] == "stats"
        r = client.post("/v1/workers", json={"worker_id": C})
        assert r.status_code == 200, r.text
        yield Run(coord, client, task)


def poll_task(client: httpx.Client, wid: str, done: Callable[[dict[str, Any]], bool],
              budget: float = 60.0) -> dict[str, Any]:
    """Long-poll the task of ``wid`` until ``done(task)`` (at most ``budget`` seconds)."""
    end = time.monotonic() + budget
    while True:
        r = client.get(f"/v1/workers/{wid}/task", params={"wait": 5}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        task: dict[str, Any] = r.json()
        if done(task) or time.monotonic() > end:
            return task


# --- building update bodies ----------------------------------------------------------------------
def stats(count: float = 10.0, fill: float = 1.0) -> dict[str, np.ndarray]:
    return {"count": np.array([count]), "sum": np.full(D, fill * count),
            "sumsq": np.full(D, fill * fill * count)}


def meta_json(worker_id: str = A, round: int = 0, attempt: int = 0, num_examples: int = 10, **kw: Any) -> str:
    return json.dumps({"worker_id": worker_id, "round": round, "attempt": attempt,
                       "num_examples": num_examples, **kw})


def update(weights: dict[str, np.ndarray] | None = None, meta: str | None = None, **kw: Any) -> bytes:
    """A safetensors update body: ``weights`` (default: valid stats) with UpdateMeta in its metadata."""
    return codec.encode(stats() if weights is None else weights, {UPDATE_META_KEY: meta or meta_json(**kw)})


def raw_safetensors(header: dict[str, Any], data: bytes = b"") -> bytes:
    """A body with exactly this JSON header, for headers ``codec.encode`` would never write."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def post_update(url: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    # A fresh connection per bad upload: the server may close one whose body it did not read.
    return httpx.post(f"{url}/v1/updates", content=body, headers={**OCTET, **(headers or {})}, timeout=TIMEOUT)


def assert_rejected(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    for w in words:
        assert w.lower() in detail.lower(), f"{w!r} not in detail {detail!r}"
    return detail


def assert_round_untouched(run: Run) -> None:
    """The coordinator serves, and both sampled workers still owe their update for round 0."""
    h = run.http.get("/v1/health")
    assert h.status_code == 200 and h.json() == {"ok": True, "state": "running"}, h.text
    s = run.http.get("/v1/status").json()
    assert (s["round"], s["model_version"], s["phase"]) == (0, 0, "statistics"), s
    view = {w["worker_id"]: w["status"] for w in run.http.get("/v1/workers").json()}
    assert view == {A: "training", B: "training", C: "idle"}, view


# --- the round the tests work against ----------------------------------------------------------
def test_stats_task_is_round_zero(run: Run) -> None:
    t = run.stats_task
    assert t == {"kind": "stats", "round": 0, "attempt": 0}, t
    # The worker registered after the round opened has nothing to do in it.
    assert run.http.get(f"/v1/workers/{C}/task", params={"wait": 0}).json()["kind"] == "wait"


def test_status_has_state_and_round(run: Run) -> None:
    s = run.http.get("/v1/status").json()
    assert s["state"] == "running" and s["round"] == 0 and s["rounds"] == 3, s
    assert s["task"] == "songs" and s["workers_registered"] == 3 and s["workers_live"] == 3, s
    assert run.http.get("/v1/rounds").json() == []


def test_openapi_lists_the_v1_paths(run: Run) -> None:
    r = run.http.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    expected = {"/v1/health": "get", "/v1/status": "get", "/v1/rounds": "get", "/v1/evaluate": "post",
                "/v1/workers": "post", "/v1/heartbeat": "post", "/v1/workers/{worker_id}/task": "get",
                "/v1/model": "get", "/v1/updates": "post"}
    for path, method in expected.items():
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from {sorted(paths)}"
    assert "application/octet-stream" in paths["/v1/updates"]["post"]["requestBody"]["content"]


def test_model_download_etag_and_304(run: Run) -> None:
    r = run.http.get("/v1/model")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    weights, metadata = codec.decode(r.content)
    assert schema_of(weights) == schema_of(SongsTask().init_weights(0))
    assert metadata["version"] == "0" and metadata["task"] == "songs"
    etag = r.headers["etag"]
    assert etag == '"v0"' and r.headers["x-fedfleet-model-version"] == "0"
    again = run.http.get("/v1/model", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    other = run.http.get("/v1/model", headers={"If-None-Match": '"v99"'})
    assert other.status_code == 200 and other.content == r.content


# --- POST /v1/workers ----------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "words"), [
    ({"worker_id": "bad id!"}, ["worker_id", "pattern"]),
    ({"worker_id": "../../etc/passwd"}, ["worker_id"]),
    ({"worker_id": ""}, ["worker_id"]),
    ({"worker_id": "x" * 65}, ["worker_id"]),
    ({"worker_id": 12345}, ["worker_id"]),
    ({"worker_id": "ok-id", "name": "n" * 201}, ["name"]),
    ({"worker_id": "ok-id", "admin": True}, ["admin", "extra"]),
    ([{"worker_id": "ok-id"}], ["body"]),
], ids=["bad-chars", "path-chars", "empty", "too-long", "not-a-string", "name-too-long", "extra-field",
        "not-an-object"])
def test_register_invalid(run: Run, body: Any, words: list[str]) -> None:
    assert_rejected(run.http.post("/v1/workers", json=body), 422, *words)
    assert_round_untouched(run)
    assert len(run.http.get("/v1/workers").json()) == 3


def test_register_not_json(run: Run) -> None:
    r = run.http.post("/v1/workers", content=b"{worker_id: wa", headers={"Content-Type": "application/json"})
    assert_rejected(r, 422, "JSON")
    assert_round_untouched(run)


def test_register_body_over_1mb(run: Run) -> None:
    body = json.dumps({"worker_id": "big", "name": "x" * (1024 * 1024)}).encode()
    r = httpx.post(f"{run.url}/v1/workers", content=body, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert_rejected(r, 413, "limit")
    assert_round_untouched(run)


def test_register_chunked_body_over_1mb(run: Run) -> None:
    """No Content-Length (chunked): the limit must hold for the bytes as they stream in."""
    body = json.dumps({"worker_id": "big", "name": "x" * (1024 * 1024)}).encode()
    chunks = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
    r = httpx.post(f"{run.url}/v1/workers", content=chunks, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert_rejected(r, 413, "limit")
    assert_round_untouched(run)


def test_register_when_all_partitions_are_live(run: Run) -> None:
    r = run.http.post("/v1/workers", json={"worker_id": "wd"})
    assert_rejected(r, 409, "partitions", "--workers")
    assert_round_untouched(run)


# --- GET /v1/workers/{id}/task -------------------------------------------------------------------
def test_task_poll_unknown_worker(run: Run) -> None:
    r = run.http.get("/v1/workers/nobody/task", params={"wait": 0})
    assert_rejected(r, 404, "unknown worker", "nobody", "register")


@pytest.mark.parametrize(("path", "params", "words"), [
    (f"/v1/workers/{A}/task", {"wait": 301}, ["wait"]),
    (f"/v1/workers/{A}/task", {"wait": -1}, ["wait"]),
    (f"/v1/workers/{A}/task", {"wait": "soon"}, ["wait"]),
    (f"/v1/workers/{A}/task", {"wait": "nan"}, ["wait"]),
    ("/v1/workers/bad$id/task", {"wait": 0}, ["worker_id"]),
    (f"/v1/workers/{'x' * 65}/task", {"wait": 0}, ["worker_id"]),
], ids=["wait-too-long", "wait-negative", "wait-not-a-number", "wait-nan", "id-bad-chars", "id-too-long"])
def test_task_poll_invalid(run: Run, path: str, params: dict[str, Any], words: list[str]) -> None:
    assert_rejected(run.http.get(path, params=params, timeout=10.0), 422, *words)
    assert_round_untouched(run)


# --- POST /v1/heartbeat --------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "words"), [
    ({}, ["worker_ids", "required"]),
    ({"worker_ids": A}, ["worker_ids"]),
    ({"worker_ids": [A, "bad id!"]}, ["worker_ids.1"]),
    ({"worker_ids": [A, 7]}, ["worker_ids.1"]),
    ({"worker_ids": ["a"] * 100_001}, ["worker_ids"]),
    (["wa"], ["body"]),
], ids=["missing", "not-a-list", "bad-id", "not-a-string", "too-many", "not-an-object"])
def test_heartbeat_invalid(run: Run, body: Any, words: list[str]) -> None:
    assert_rejected(run.http.post("/v1/heartbeat", json=body), 422, *words)
    assert_round_untouched(run)


def test_heartbeat_not_json_and_too_large(run: Run) -> None:
    r = run.http.post("/v1/heartbeat", content=b'{"worker_ids": [wa, wb', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "json" in r.json()["detail"].lower(), r.text
    big = b'{"worker_ids": ["' + b"a" * (1024 * 1024) + b'"]}'
    r = httpx.post(f"{run.url}/v1/heartbeat", content=big, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert_rejected(r, 413, "limit")
    assert_round_untouched(run)


def test_heartbeat_unknown_ids_are_not_counted(run: Run) -> None:
    r = run.http.post("/v1/heartbeat", json={"worker_ids": [A, "nobody", B]})
    assert r.status_code == 200 and r.json() == {"known": 2}, r.text


# --- other endpoints: wrong method, wrong path -----------------------------------------------------
@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/updates", 405), ("POST", "/v1/model", 405), ("DELETE", "/v1/workers", 405),
    ("GET", "/v1/evaluate", 405), ("PUT", "/v1/heartbeat", 405), ("GET", "/v1/nothing-here", 404),
])
def test_wrong_method_or_path(run: Run, method: str, path: str, status: int) -> None:
    r = run.http.request(method, path)
    assert r.status_code == status and r.json()["detail"], r.text


def test_evaluate_and_rounds_serve(run: Run) -> None:
    r = run.http.post("/v1/evaluate")
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["round"] == 0 and e["model_version"] == 0 and e["examples"] > 0 and 0.0 <= e["accuracy"] <= 1.0


# --- POST /v1/updates ----------------------------------------------------------------------------
def _good_header() -> dict[str, Any]:
    return {"__metadata__": {UPDATE_META_KEY: meta_json()},
            "count": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]},
            "sum": {"dtype": "F64", "shape": [D], "data_offsets": [8, 8 + 8 * D]},
            "sumsq": {"dtype": "F64", "shape": [D], "data_offsets": [8 + 8 * D, 8 + 16 * D]}}


def _header_with(**changes: Any) -> dict[str, Any]:
    h = _good_header()
    for name, entry in changes.items():
        h[name] = entry
    return h


_DATA = np.ones(1 + 2 * D).tobytes()
_GOOD = update()
_STATS_NAN = stats()
_STATS_NAN["sum"][3] = np.nan
_STATS_INF = stats()
_STATS_INF["sumsq"][0] = np.inf
_RENAMED = {"n": np.array([1.0]), "s": np.ones(D), "ss": np.ones(D)}
_EXTRA = {**stats(), "bogus": np.zeros(2)}
_MISSING = {k: v for k, v in stats().items() if k != "sumsq"}
_SHAPE = {**stats(), "sum": np.ones(D - 1)}
_DTYPE = {**stats(), "sumsq": np.ones(D, dtype=np.float32)}
_INT = {**stats(), "count": np.array([10], dtype=np.int64)}

BAD_UPDATES: list[tuple[str, bytes, int, list[str]]] = [
    # not safetensors at all
    ("empty", b"", 400, ["not safetensors", "8-byte"]),
    ("random-bytes", np.random.default_rng(0).bytes(4096), 400, ["not safetensors", "header length"]),
    ("json-not-safetensors", b'{"worker_id": "wa", "round": 0}', 400, ["not safetensors"]),
    ("header-length-zero", struct.pack("<Q", 0) + b"{}", 400, ["header length 0"]),
    ("header-length-huge", struct.pack("<Q", 2**63) + b"{}", 400, ["header length"]),
    ("header-over-limit", struct.pack("<Q", 1_000_000) + b"{" * 100, 413, ["header", "limit"]),
    ("header-truncated", struct.pack("<Q", 200) + b'{"count": ', 400, ["truncated header"]),
    ("header-not-json", struct.pack("<Q", 8) + b"not json", 400, ["not JSON"]),
    ("header-not-object", struct.pack("<Q", 8) + b"[1, 2]  " + _DATA, 400, ["not a JSON object"]),
    ("header-bad-utf8", struct.pack("<Q", 8) + b"\xff\xfe\xfd{}   " + _DATA, 400, ["not JSON"]),
    # malformed tensor entries
    ("unsupported-dtype", raw_safetensors(_header_with(count={"dtype": "BF16", "shape": [1],
                                                              "data_offsets": [0, 8]}), _DATA),
     400, ["count", "dtype"]),
    ("entry-extra-key", raw_safetensors(_header_with(count={"dtype": "F64", "shape": [1],
                                                            "data_offsets": [0, 8], "x": 1}), _DATA),
     400, ["count", "data_offsets"]),
    ("shape-negative", raw_safetensors(_header_with(count={"dtype": "F64", "shape": [-1],
                                                           "data_offsets": [0, 8]}), _DATA),
     400, ["count", "shape"]),
    ("offsets-gap", raw_safetensors(_header_with(count={"dtype": "F64", "shape": [1],
                                                        "data_offsets": [8, 16]}), _DATA),
     400, ["data_offsets"]),
    ("offsets-size-mismatch", raw_safetensors(_header_with(count={"dtype": "F64", "shape": [2],
                                                                  "data_offsets": [0, 8]}), _DATA),
     400, ["count", "bytes"]),
    ("metadata-not-strings", raw_safetensors({**_good_header(), "__metadata__": {UPDATE_META_KEY: 5}}, _DATA),
     400, ["__metadata__"]),
    # metadata (UpdateMeta) missing or invalid
    ("no-metadata", codec.encode(stats()), 422, [f"'{UPDATE_META_KEY}'", "__metadata__"]),
    ("metadata-other-key", codec.encode(stats(), {"other": meta_json()}), 422, [f"'{UPDATE_META_KEY}'"]),
    ("metadata-not-json", update(meta="{worker_id: wa"), 422, ["metadata is invalid"]),
    ("metadata-not-object", update(meta="[1, 2]"), 422, ["metadata is invalid"]),
    ("num-examples-negative", update(num_examples=-5), 422, ["metadata is invalid", "num_examples"]),
    ("num-examples-zero", update(num_examples=0), 422, ["num_examples"]),
    ("num-examples-huge", update(num_examples=10**13), 422, ["num_examples"]),
    ("round-negative", update(round=-1), 422, ["round"]),
    ("meta-extra-field", update(meta=meta_json(admin=True)), 422, ["admin"]),
    ("meta-missing-field", update(meta=json.dumps({"worker_id": A, "round": 0, "num_examples": 1})),
     422, ["attempt"]),
    ("meta-bad-worker-id", update(worker_id="bad id!"), 422, ["worker_id"]),
    # (a metric that is NaN or badly named is dropped, not the update: see test_engine.py)
    ("meta-text-metric", update(meta=meta_json(metrics={"loss": "low"})), 422, ["metrics.loss"]),
    # the wrong tensors for this round
    ("wrong-names", update(_RENAMED), 422, ["missing tensor 'count'"]),
    ("extra-tensor", update(_EXTRA), 422, ["unexpected tensor 'bogus'"]),
    ("missing-tensor", update(_MISSING), 422, ["missing tensor 'sumsq'"]),
    ("wrong-shape", update(_SHAPE), 422, ["'sum'", "shape", f"[{D - 1}]", f"[{D}]"]),
    ("wrong-dtype", update(_DTYPE), 422, ["'sumsq'", "float32", "float64"]),
    ("wrong-dtype-int", update(_INT), 422, ["'count'", "int64"]),
    ("nan", update(_STATS_NAN), 422, ["'sum'", "NaN"]),
    ("inf", update(_STATS_INF), 422, ["'sumsq'", "Inf"]),
    ("model-tensors", update(SongsTask().init_weights(0)), 422, ["missing tensor"]),
    # body length does not match its header
    ("truncated-data", _GOOD[:-20], 400, ["truncated", f"{len(_GOOD) - 20 - (len(_GOOD) - 8 * (1 + 2 * D))}"]),
    ("data-missing", _GOOD[: len(_GOOD) - 8 * (1 + 2 * D)], 400, ["truncated", "0 of"]),
    ("longer-than-header", _GOOD + b"\0" * 16, 413, ["longer than"]),
    # well-formed, but not an update this round can take
    ("unknown-worker", update(worker_id="nobody"), 404, ["unknown worker", "nobody"]),
    ("wrong-round", update(round=1), 409, ["round 1", "round is 0"]),
    ("wrong-attempt", update(attempt=1), 409, ["attempt 1", "attempt 0"]),
    ("not-sampled", update(worker_id=C), 409, [C, "not sampled"]),
]


@pytest.mark.parametrize(("body", "status", "words"), [c[1:] for c in BAD_UPDATES],
                         ids=[c[0] for c in BAD_UPDATES])
def test_update_invalid(run: Run, body: bytes, status: int, words: list[str]) -> None:
    assert_rejected(post_update(run.url, body), status, *words)
    assert_round_untouched(run)


def test_update_chunked_longer_than_header(run: Run) -> None:
    """Without Content-Length the surplus arrives as a later chunk, and is still refused."""
    chunks = iter([_GOOD, b"\0" * 64])
    r = httpx.post(f"{run.url}/v1/updates", content=chunks, headers=OCTET, timeout=TIMEOUT)
    assert_rejected(r, 413, "longer than")
    assert_round_untouched(run)


def test_update_content_length_over_limit(run: Run) -> None:
    """A declared size over the limit is refused before a byte of the body is read."""
    host, port = _host_port(run.url)
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", "/v1/updates")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(10**9))
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 413, body
    assert "over the limit" in json.loads(body)["detail"]
    assert_round_untouched(run)


def test_update_client_disconnects_mid_body(run: Run) -> None:
    """A client that declares the whole body, sends part of it and hangs up leaves no trace: while
    its upload is under way the worker's slot is taken (a second upload is a duplicate), and once it
    hangs up the slot is released, so the same worker's next upload is judged on its own."""
    host, port = _host_port(run.url)
    head = (f"POST /v1/updates HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(_GOOD)}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(head + _GOOD[: len(_GOOD) - 40])
        # The server reads the header and reserves A's slot as soon as these bytes arrive.
        r = _poll_update(run.url, update(_SHAPE), until=lambda r: r.status_code == 409)
        assert_rejected(r, 409, "already sent")
    r = _poll_update(run.url, update(_SHAPE), until=lambda r: r.status_code != 409)
    assert_rejected(r, 422, "shape")
    assert_round_untouched(run)


def _poll_update(url: str, body: bytes, until: Callable[[httpx.Response], bool],
                 budget: float = 15.0) -> httpx.Response:
    """Send ``body`` until the answer satisfies ``until`` or ``budget`` seconds passed; the last answer."""
    end = time.monotonic() + budget
    while not until(r := post_update(url, body)) and time.monotonic() < end:
        time.sleep(0.05)
    return r


def test_update_header_with_overflowing_shape(run: Run) -> None:
    """A dimension too large for int64 is malformed input (400), not a server error."""
    body = raw_safetensors(_header_with(count={"dtype": "F64", "shape": [2**64], "data_offsets": [0, 8]}),
                           _DATA)
    assert_rejected(post_update(run.url, body), 400, "count", "shape")
    assert_round_untouched(run)


def test_update_header_deeply_nested_json(run: Run) -> None:
    """A header nested deeper than the JSON parser's recursion limit is malformed input (400), not a 500."""
    nested = b"[" * 5000 + b"]" * 5000
    body = struct.pack("<Q", len(nested)) + nested
    assert_rejected(post_update(run.url, body), 400, "not safetensors")
    assert_round_untouched(run)


def test_update_metadata_deeply_nested_json(run: Run) -> None:
    """Likewise for the UpdateMeta JSON inside __metadata__: 422, not a 500."""
    body = update(meta="[" * 5000 + "]" * 5000)
    assert_rejected(post_update(run.url, body), 422, "metadata is invalid")
    assert_round_untouched(run)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    return parts.hostname, parts.port


# --- last: the round still completes, with exactly the valid updates -----------------------------
def test_valid_updates_still_accepted_after_bad_input(run: Run) -> None:
    assert_round_untouched(run)
    a, b = stats(count=30.0, fill=2.0), stats(count=10.0, fill=6.0)

    r = post_update(run.url, update(a, worker_id=A, num_examples=30))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": True, "round": 0, "received": 1, "expected": 2}

    # The same worker again: refused, and not counted twice.
    assert_rejected(post_update(run.url, update(a, worker_id=A, num_examples=30)), 409, "already sent")
    # B's bad updates do not use up its slot.
    assert_rejected(post_update(run.url, update(_STATS_NAN, worker_id=B)), 422, "NaN")
    assert_rejected(post_update(run.url, update(b, worker_id=B, attempt=3)), 409, "attempt 3")
    view = {w["worker_id"]: w["status"] for w in run.http.get("/v1/workers").json()}
    assert view == {A: "idle", B: "training", C: "idle"}, view

    r = post_update(run.url, update(b, worker_id=B, num_examples=10))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": True, "round": 0, "received": 2, "expected": 2}

    # Both answered: the statistics are applied (model version 1) and training round 1 opens.
    end = time.monotonic() + 30
    while (s := run.http.get("/v1/status").json())["model_version"] < 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert s["model_version"] == 1 and s["state"] == "running", s
    task = poll_task(run.http, A, lambda t: t["kind"] == "train", budget=30)
    assert (task["kind"], task["round"], task["model_version"]) == ("train", 1, 1), task

    # The model's standardisation is exactly that of the two accepted updates: nothing else leaked in.
    r = run.http.get("/v1/model", headers={"If-None-Match": '"v0"'})
    assert r.status_code == 200 and r.headers["etag"] == '"v1"'
    weights, _ = codec.decode(r.content)
    n = 30.0 + 10.0
    mean = (a["sum"] + b["sum"]) / n
    scale = np.sqrt((a["sumsq"] + b["sumsq"]) / n - mean**2)
    np.testing.assert_allclose(weights["scaler.mean"], mean.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(weights["scaler.scale"], scale.astype(np.float32), rtol=1e-6)

    # A late update for the closed statistics round is refused.
    assert_rejected(post_update(run.url, update(stats(), worker_id=B)), 409, "round 0")
    assert run.http.get("/v1/health").json() == {"ok": True, "state": "running"}


def test_update_meta_model_is_what_the_client_sends() -> None:
    """The metadata the tests build by hand is what UpdateMeta itself accepts (guards the fixtures)."""
    body = update(stats(), worker_id=A, num_examples=7)
    _, metadata = codec.decode(body)
    meta = UpdateMeta.from_metadata(metadata)
    assert (meta.worker_id, meta.round, meta.attempt, meta.num_examples) == (A, 0, 0, 7)
