"""Property-based fuzzing of a real coordinator process: every operation of its OpenAPI document
(schemathesis, valid and invalid data), then the binary body of ``POST /v1/updates`` (random bytes,
truncated, bit-flipped and re-labelled safetensors). No request may get a 5xx, break the connection
or end the process; afterwards real workers join and the run finishes as if nothing had happened.

The cases tried are printed (``pytest -s`` shows them) for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from conftest import Coordinator, Fleet, wait_for_train_task
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY, UpdateMeta

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz tests need schemathesis (the dev extra)")

PARAMS = 32  # the null task's model: one float32 tensor of this many values
ROUNDS = 3
EXAMPLES = 60  # hypothesis examples per operation and generation mode (valid, invalid data)
BODY_EXAMPLES = 400  # bodies posted to /v1/updates
TIMEOUT = 30.0  # per request: a hang fails the test instead of stalling the suite
WORKER_TIMEOUT = 3.0  # workers the fuzzer registers are dead (and their partitions free) soon after
# A long-lived event stream: schemathesis reads it until this request timeout, not to its (never coming) end.
STREAMS = {"/v1/events"}
STREAM_TIMEOUT = 0.5
OCTET = {"Content-Type": "application/octet-stream"}
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def coord(module_fleet: Fleet) -> Iterator[Coordinator]:
    # Fuzzed registrations take partitions and may open rounds with workers that never answer: they
    # are dead after WORKER_TIMEOUT, so such a round closes early and the next attempt samples others.
    # --min-workers 2: every round waits for both partitions, so the real workers of the last test both
    # take part (by default a round after the first needs only a quorum, and a worker turned away while
    # a fuzzer's registration still looked alive could miss the whole run and retry until --give-up).
    yield module_fleet.coordinator(
        "--task", "null", "--task-option", f"params={PARAMS}", "--workers", "2", "--min-workers", "2",
        "--rounds", str(ROUNDS),
        "--worker-timeout", str(WORKER_TIMEOUT), "--round-timeout", "60", "--wait-timeout", "600",
        "--max-round-retries", "1000", "--linger", "5")


def alive(coord: Coordinator) -> None:
    assert coord.proc.poll() is None, f"the coordinator exited with {coord.proc.returncode}"
    r = httpx.get(f"{coord.url}/v1/health", timeout=TIMEOUT)
    assert r.status_code == 200, r.text


def fuzz_operation(op: Any, mode: Any, session: requests.Session, timeout: float, tried: Counter[str],
                   statuses: Counter[int], headers: dict[str, str] | None = None,
                   examples: int = EXAMPLES) -> None:
    """Send ``examples`` cases of ``op`` generated in ``mode``; fail on a 5xx or a broken connection."""

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        response = case.call(session=session, timeout=timeout, headers=headers)
        tried[op.label] += 1
        statuses[response.status_code] += 1
        assert response.status_code < 500, (
            f"{response.status_code} from {case.as_curl_command()}: {response.text[:500]}")
        case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])

    fuzz()


def test_schemathesis_finds_no_server_error(coord: Coordinator) -> None:
    schema = schemathesis.openapi.from_url(f"{coord.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    session = requests.Session()

    for op in operations:
        timeout = STREAM_TIMEOUT if op.path in STREAMS else TIMEOUT
        for mode in schemathesis.GenerationMode:
            try:
                fuzz_operation(op, mode, session, timeout, tried, statuses)
            except Unsatisfiable:
                # Nothing to make invalid: an operation without parameters or body has no negative cases.
                assert mode is schemathesis.GenerationMode.NEGATIVE, op.label
        alive(coord)

    total = sum(tried.values())
    print(f"\nschemathesis: {total} cases over {len(operations)} operations; statuses {dict(sorted(statuses.items()))}")
    for label, n in sorted(tried.items()):
        print(f"  {n:5d}  {label}")
    assert {op.label for op in operations} == set(tried)
    assert not [s for s in statuses if s >= 500]


SECURED_EXAMPLES = 8
ADMIN, JOIN = secrets.token_urlsafe(24), secrets.token_urlsafe(24)


def worker_token(url: str) -> str:
    r = httpx.post(f"{url}/v1/workers", json={"name": "fuzzer"}, headers={"Authorization": f"Bearer {JOIN}"},
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def test_schemathesis_finds_no_server_error_behind_tokens(coordinator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with an admin and a join token set: every operation without a token, with wrong ones
    (bearer, worker token, cookie), and with each real token, a worker's included (which get past the
    door to the checks behind it)."""
    monkeypatch.setenv("FEDFLEET_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("FEDFLEET_JOIN_TOKEN", JOIN)
    coord = coordinator("--task", "null", "--task-option", f"params={PARAMS}", "--workers", "2",
                        "--worker-timeout", str(WORKER_TIMEOUT), "--wait-timeout", "600")
    schema = schemathesis.openapi.from_url(f"{coord.url}/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"})
    operations = [result.ok() for result in schema.get_all_operations()]
    # Wrong credentials are turned away before any parameter is looked at: valid data only for them.
    positive = [schemathesis.GenerationMode.POSITIVE]
    credentials: list[tuple[dict[str, str], list[Any]]] = [
        ({}, positive), ({"Authorization": "Bearer " + "x" * 30, "X-Fedfleet-Worker-Token": "nobody~" + "0" * 64,
                          "Cookie": "fedfleet_admin=" + "y" * 30}, positive),
        ({"Authorization": f"Bearer {ADMIN}"}, list(schemathesis.GenerationMode)),
        ({"Authorization": f"Bearer {JOIN}"}, list(schemathesis.GenerationMode)),
        ({"Authorization": f"Bearer {worker_token(coord.url)}"}, list(schemathesis.GenerationMode))]
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    session = requests.Session()
    for op in operations:
        timeout = STREAM_TIMEOUT if op.path in STREAMS else TIMEOUT
        for headers, modes in credentials:
            for mode in modes:
                with contextlib.suppress(Unsatisfiable):
                    fuzz_operation(op, mode, session, timeout, tried, statuses, headers, SECURED_EXAMPLES)
        alive(coord)
    total = sum(tried.values())
    print(f"\nschemathesis behind tokens: {total} cases over {len(operations)} operations x {len(credentials)} "
          f"credentials; statuses {dict(sorted(statuses.items()))}")
    assert statuses[401] > 0 and statuses[403] + statuses[200] > 0
    assert not [s for s in statuses if s >= 500]


def update_body(worker_id: str, round_: int, attempt: int, values: np.ndarray, overrides: dict[str, Any]) -> bytes:
    m = UpdateMeta(worker_id=worker_id, round=round_, attempt=attempt, num_examples=10).model_dump()
    m.update(overrides)
    return codec.encode({"w": values}, {UPDATE_META_KEY: json.dumps(m)})


def bodies(worker_id: str, round_: int, attempt: int) -> st.SearchStrategy[bytes]:
    """Update bodies that are wrong in every way a fuzzer can think of, and now and then right."""
    values = st.one_of(
        st.just(np.ones(PARAMS, dtype=np.float32)),
        st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=PARAMS, max_size=PARAMS)
        .map(lambda xs: np.asarray(xs, dtype=np.float32)),
        st.integers(0, 3 * PARAMS).map(lambda n: np.zeros(n, dtype=np.float32)),  # wrong shape
        st.sampled_from([np.float64, np.float16, np.int32, np.uint8, np.bool_])  # wrong dtype
        .map(lambda t: np.zeros(PARAMS, dtype=t)),
        st.just(np.zeros((4, PARAMS // 4), dtype=np.float32)),
    )
    meta = st.fixed_dictionaries({}, optional={
        "round": st.integers(-2, round_ + 2), "attempt": st.integers(-1, 3),
        "num_examples": st.one_of(st.integers(-5, 10**13), st.floats(), st.text(max_size=5)),
        "worker_id": st.one_of(st.just(worker_id), st.text(max_size=80)),
        "metrics": st.dictionaries(st.text(max_size=10), st.one_of(st.floats(), st.text(max_size=5)), max_size=70),
        "extra": st.integers()})
    valid = st.builds(lambda v, m: update_body(worker_id, round_, attempt, v, m), values, meta)

    def truncated(body: bytes, cut: float) -> bytes:
        return body[: int(len(body) * cut)]

    def flipped(body: bytes, at: list[tuple[float, int]]) -> bytes:
        b = bytearray(body)
        for pos, byte in at:
            b[min(int(pos * len(b)), len(b) - 1)] = byte
        return bytes(b)

    def header(length: int, text: bytes) -> bytes:
        return struct.pack("<Q", length) + text

    headers = st.one_of(
        st.sampled_from([b'{}', b'[]', b'null', b'{"w": 1}', b'{"__metadata__": {"fedfleet": "{}"}}',
                         b'{"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 999999999999]}}',
                         b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                         b'{"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}',
                         b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                         b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                         b'\xff\xfe\x00']),
        st.integers(1, 100_000).map(lambda n: b"[" * n),  # nested too deeply for a JSON parser's stack
        st.binary(max_size=300))
    return st.one_of(
        st.binary(max_size=2000),
        valid,
        st.builds(truncated, valid, st.floats(0, 1, exclude_max=True)),
        st.builds(flipped, valid, st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=8)),
        st.builds(lambda h: header(len(h), h), headers),
        st.builds(header, st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 7, 2**63, 2**64 - 1])), headers),
    )


class KeepAlive:
    """Heartbeats for hand-registered workers, so that their round stays open while bodies go in."""

    def __init__(self, url: str, ids: list[str]) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, ids), daemon=True)
        self.thread.start()

    def _run(self, url: str, ids: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            while not self.stop.wait(0.3):
                with contextlib.suppress(httpx.TransportError):
                    client.post("/v1/heartbeat", json={"worker_ids": ids})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=TIMEOUT)


def register(client: httpx.Client, wid: str) -> None:
    # Partitions the schemathesis test's workers hold free up once those are dead (WORKER_TIMEOUT).
    end = time.monotonic() + 60
    while True:
        r = client.post("/v1/workers", json={"worker_id": wid, "name": "fuzzer"})
        if r.status_code == 200 or time.monotonic() > end:
            break
        assert r.status_code == 409, r.text
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_update_bodies_get_4xx(coord: Coordinator) -> None:
    ids = ["fuzz-a", "fuzz-b"]
    statuses: Counter[int] = Counter()
    details: Counter[str] = Counter()
    with httpx.Client(base_url=coord.url, timeout=TIMEOUT) as client:
        for wid in ids:
            register(client, wid)
        keep = KeepAlive(coord.url, ids)
        try:
            # A round that samples both is open once a long-poll hands it out.
            task = wait_for_train_task(client, ids[0])
            round_, attempt = int(task["round"]), int(task["attempt"])

            @settings(max_examples=BODY_EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(body=bodies(ids[0], round_, attempt))
            def post(body: bytes) -> None:
                r = client.post("/v1/updates", content=body, headers=OCTET)
                statuses[r.status_code] += 1
                assert r.status_code < 500, f"{r.status_code} for {body[:200]!r}...: {r.text[:500]}"
                if r.status_code != 200:
                    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text
                    details[r.json()["detail"].split(":")[0][:60]] += 1

            post()
        finally:
            keep.close()
    alive(coord)
    total = sum(statuses.values())
    print(f"\n/v1/updates bodies: {total} cases; statuses {dict(sorted(statuses.items()))}")
    for d, n in details.most_common(12):
        print(f"  {n:5d}  {d}")
    assert total == BODY_EXAMPLES or total > BODY_EXAMPLES // 2
    assert statuses[200] <= 1  # fuzz-a may send one acceptable update; every later one is a duplicate


def test_run_finishes_after_the_fuzzing(coord: Coordinator, module_fleet: Fleet) -> None:
    # A worker turned away (409: every partition held by a live worker) gives up, so real workers
    # join once the fuzzer's own are dead.
    end = time.monotonic() + 60
    while any(w["status"] != "dead" for w in httpx.get(f"{coord.url}/v1/workers", timeout=TIMEOUT).json()):
        assert time.monotonic() < end, "the fuzzer's workers never went dead"
        time.sleep(0.2)
    workers = [module_fleet.worker(coord.url, "--give-up", "60") for _ in range(2)]
    assert coord.proc.wait(timeout=120) == 0, coord.log_text()[-3000:]
    summary = json.loads((coord.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished", summary
    assert summary["rounds"] == ROUNDS
    rounds = [json.loads(line) for line in (coord.data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for w in workers:
        assert w.proc.wait(timeout=30) == 0, w.log_text()[-2000:]
    assert "Traceback" not in coord.log_text()
