"""A hostile participant for tests: a real client of the public /v1 API that holds a valid place in the
run, trains honestly with the task's own code, and can tamper with any upload it sends.

It speaks only HTTP and safetensors (never the worker's or the coordinator's internals): register
(``POST /v1/workers``), long-poll (``GET /v1/workers/{id}/task``, reading the instruction's ``kind``
from the JSON), download the model (``GET /v1/model``), compute what an honest worker would send
(the task's ``local_stats``, or ``evaluate`` on its validation split and ``fit`` on the rest, as
``fedfleet worker`` does), then upload through ``POST /v1/updates`` or, for bodies that must go up
in pieces, ``POST /v1/uploads`` + ``PUT /v1/uploads/{id}``.

What it sends is decided by a ``Tamper``: given the honest update, it returns an ``Upload`` to send
instead, or None to send the honest one. Every upload and its answer is kept in ``sent``::

    hostile = HostileWorker(coord.url)
    hostile.register()
    hostile.run(lambda h: Upload.of(h, "fake accuracy", metrics={**h.metrics, "accuracy": 0.99}))
    assert all(s.status == 200 for s in hostile.sent)
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from fedfleet.partition import parse_partition
from fedfleet.protocol import codec
from fedfleet.tasks import Dataset, Task, TrainParams, load_task
from fedfleet.types import Weights

META_KEY = "fedfleet"  # the safetensors __metadata__ entry that holds the update's metadata (JSON)
OCTET = {"Content-Type": "application/octet-stream"}
TIMEOUT = 30.0  # per request: a hung coordinator fails the test instead of stalling it
POLL_WAIT = 2.0  # seconds one long-poll may be held


@dataclass(frozen=True)
class Honest:
    """What an honest worker sends for one instruction: ``kind`` is "stats" or "train"."""

    worker_id: str
    kind: str
    round: int
    attempt: int
    weights: Weights
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Upload:
    """One upload as sent: a safetensors body, one-shot (``POST /v1/updates``) or resumable."""

    case: str  # what was tampered with ("" for an honest upload)
    body: bytes
    resumable: bool = False

    @classmethod
    def of(cls, honest: Honest, case: str, weights: Weights | None = None, num_examples: int | None = None,
           metrics: Mapping[str, float] | None = None, resumable: bool = False) -> Upload:
        """``honest`` with some of its parts replaced."""
        return cls(case, encode_update(honest.worker_id, honest.round, honest.attempt,
                                       honest.weights if weights is None else weights,
                                       honest.num_examples if num_examples is None else num_examples,
                                       honest.metrics if metrics is None else metrics), resumable)


@dataclass(frozen=True)
class Sent:
    """An upload and the coordinator's answer: HTTP status (0: no answer) and its ``detail``."""

    kind: str
    round: int
    attempt: int
    case: str
    status: int
    detail: str

    @property
    def tampered(self) -> bool:
        return bool(self.case)


Tamper = Callable[[Honest], Upload | None]


def encode_update(worker_id: str, round: int, attempt: int, weights: Weights, num_examples: int,
                  metrics: Mapping[str, float]) -> bytes:
    """A safetensors update body whose ``__metadata__["fedfleet"]`` is the update's metadata as JSON.

    Built from a plain dict, not the protocol's model class, so that it can carry what that class
    would refuse to build (the coordinator must check it on arrival anyway)."""
    meta = {"worker_id": worker_id, "round": round, "attempt": attempt, "num_examples": num_examples,
            "metrics": dict(metrics)}
    arrays = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    return codec.encode(arrays, {META_KEY: json.dumps(meta)})


def header_longer_than_body(total: int = 100, claimed: int = 1000) -> bytes:
    """``total`` bytes whose safetensors prefix declares a JSON header of ``claimed`` bytes: the header
    can never be complete, so it disagrees with the bytes that come."""
    return struct.pack("<Q", claimed) + b"{" + b" " * (total - 9)


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as every other JSON parser does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class HostileWorker:
    """One participant of a run, driven from the test process (see the module docstring)."""

    def __init__(self, url: str, worker_id: str = "hostile", name: str = "hostile") -> None:
        self.url = url
        self.worker_id = worker_id
        self.name = name
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT)
        self.token: str | None = None
        self.registration: dict[str, Any] = {}
        self.sent: list[Sent] = []
        self.stopped = False  # told "stop" by the coordinator
        self._task: Task | None = None
        self._split: tuple[Dataset, Dataset | None] | None = None

    def close(self) -> None:
        self.http.close()

    # --- the API ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def register(self) -> dict[str, Any]:
        r = self.http.post("/v1/workers", json={"worker_id": self.worker_id, "name": self.name})
        _expect_ok(r, "registering the hostile worker")
        self.registration = r.json()
        self.token = self.registration.get("token")
        return self.registration

    def next_instruction(self, wait: float = POLL_WAIT) -> dict[str, Any]:
        r = self.http.get(f"/v1/workers/{self.worker_id}/task", params={"wait": wait}, headers=self._headers(),
                          timeout=wait + TIMEOUT)
        if r.status_code == 404:  # a restarted coordinator that forgot us: join again
            self.register()
            return {"kind": "wait"}
        _expect_ok(r, "long-poll")
        msg: dict[str, Any] = r.json()
        return msg

    def model(self) -> Weights:
        r = self.http.get("/v1/model", headers=self._headers())
        _expect_ok(r, "model download")
        weights, _ = codec.decode(r.content)
        return {k: np.array(v) for k, v in weights.items()}

    def post_update(self, body: bytes) -> tuple[int, str]:
        r = self.http.post("/v1/updates", content=body, headers={**OCTET, **self._headers()})
        return r.status_code, _detail(r)

    def post_resumable(self, body: bytes, round: int, attempt: int) -> tuple[int, str]:
        """Send ``body`` through a resumable upload, in one chunk; the answer of the step that ended it."""
        r = self.http.post("/v1/uploads", headers=self._headers(), json={
            "worker_id": self.worker_id, "round": round, "attempt": attempt, "total_bytes": len(body)})
        if r.status_code >= 300:
            return r.status_code, _detail(r)
        upload_id = r.json()["upload_id"]
        r = self.http.put(f"/v1/uploads/{upload_id}", content=body, headers={
            **OCTET, **self._headers(), "Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"})
        return r.status_code, _detail(r)

    def send(self, honest: Honest, upload: Upload) -> Sent:
        try:
            if upload.resumable:
                status, detail = self.post_resumable(upload.body, honest.round, honest.attempt)
            else:
                status, detail = self.post_update(upload.body)
        except httpx.TransportError as exc:
            status, detail = 0, repr(exc)
        sent = Sent(honest.kind, honest.round, honest.attempt, upload.case, status, detail)
        self.sent.append(sent)
        return sent

    # --- honest work -------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        if self._task is None:
            reg = self.registration
            self._task = load_task(reg["task"], reg.get("task_options") or {})
        return self._task

    def data(self) -> tuple[Dataset, Dataset | None]:
        """(examples it trains on, its validation split), split as ``fedfleet worker`` splits them."""
        if self._split is None:
            self._split = _split(self.task, self.registration["partition"])
        return self._split

    def others_examples(self) -> int:
        """The training examples of every other partition of the run, split as their workers split them."""
        p = self.registration["partition"]
        total = 0
        for index in range(p["count"]):
            if index != p["index"]:
                total += len(_split(self.task, {**p, "index": index})[0])
        return total

    def honest(self, msg: Mapping[str, Any]) -> Honest:
        """What an honest worker would send for instruction ``msg`` (kind "stats" or "train")."""
        train, val = self.data()
        if msg["kind"] == "stats":
            return Honest(self.worker_id, "stats", int(msg["round"]), int(msg["attempt"]), self.task.local_stats(train),
                          len(train), {})
        t0 = time.perf_counter()
        base = self.model()
        metrics: dict[str, float] = {}
        if val is not None:
            m = self.task.evaluate(base, val)
            metrics = {"val_loss": float(m["loss"]), "val_accuracy": float(m["accuracy"]),
                       "val_examples": float(len(val))}
        t1 = time.perf_counter()
        p = msg.get("params") or msg
        result = self.task.fit(base, train, TrainParams(int(p["local_epochs"]), int(p["batch_size"]), float(p["lr"]),
                                                       int(p["seed"]), float(p.get("prox_mu", 0.0))))
        metrics = {**result.metrics, **metrics, "download_s": t1 - t0, "train_s": time.perf_counter() - t1}
        return Honest(self.worker_id, "train", int(msg["round"]), int(msg["attempt"]), result.weights,
                      max(result.num_examples, 1), metrics)

    # --- the loop ----------------------------------------------------------------------------------
    def run(self, tamper: Tamper | None = None, budget: float = 120.0, halt: threading.Event | None = None,
            before_upload: Callable[[Honest], None] | None = None, once_per_round: bool = True) -> list[Sent]:
        """Work until the coordinator says stop, ``halt`` is set or ``budget`` seconds passed.

        ``tamper`` sees every honest update (with ``once_per_round``, only the first of each round, so
        that a round the coordinator runs again gets an honest answer) and returns what to send
        instead, or None. ``before_upload`` runs before each upload, while the round is still open.
        Transport errors (a coordinator being restarted) are retried until the budget is spent."""
        end = time.monotonic() + budget
        seen: set[tuple[str, int]] = set()
        while time.monotonic() < end and not (halt is not None and halt.is_set()):
            try:
                msg = self.next_instruction()
                kind = msg["kind"]
                if kind == "stop":
                    self.stopped = True
                    return self.sent
                if kind not in ("stats", "train"):
                    continue
                honest = self.honest(msg)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            upload = None
            if tamper is not None and (not once_per_round or (honest.kind, honest.round) not in seen):
                seen.add((honest.kind, honest.round))
                upload = tamper(honest)
            if before_upload is not None:
                before_upload(honest)
            self.send(honest, upload or Upload.of(honest, ""))
        return self.sent


def _split(task: Task, p: Mapping[str, Any]) -> tuple[Dataset, Dataset | None]:
    """Partition ``p`` (as registration describes it) less its validation share, and that share: the
    split ``fedfleet worker`` makes (worker/trainer.py)."""
    data = task.load_partition(parse_partition(p["scheme"]), p["index"], p["count"], p["seed"])
    n_val = round(p.get("val_fraction", 0.0) * len(data))
    if n_val < 1 or n_val >= len(data):
        return data, None
    order = np.random.default_rng([p["seed"], p["index"], 0x7A1]).permutation(len(data))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return Dataset(data.x[train], data.y[train]), Dataset(data.x[val], data.y[val])


def _expect_ok(r: httpx.Response, what: str) -> None:
    # Not ``assert``: this module is not rewritten by pytest, and ``python -O`` would drop it.
    if r.status_code != 200:
        raise AssertionError(f"{what}: HTTP {r.status_code}: {r.text[:300]}")


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail", "")
    except (ValueError, AttributeError):
        return r.text[:500]
    return detail if isinstance(detail, str) else json.dumps(detail)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass (AssertionError)."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


# --- the tampering of issue 12, one upload each ------------------------------------------------------
LONG_NAMES = {f"m{i:02d}_" + "x" * 896: float(i) for i in range(50)}  # 50 names of 900 characters
HUGE = 1e35  # finite in float32, but overflows it once multiplied by a number of examples
HUGE_STATS = 1e300  # finite in float64, but not once a mean of it is cast to float32


def metric_named_timings(h: Honest) -> Upload:
    return Upload.of(h, "metric named 'timings'", metrics={**h.metrics, "timings": 1.0})


def metric_named_round(others: int) -> Tamper:
    """A metric "round" of 12 on an update weighted like the ``others`` examples of the honest workers
    together: a mean of "round" over the round's updates is then exactly 6."""
    return lambda h: Upload.of(h, "metric named 'round'", num_examples=others, metrics={**h.metrics, "round": 12.0})


def faked_scores(h: Honest) -> Upload:
    return Upload.of(h, "faked accuracy and loss", metrics={**h.metrics, "accuracy": 0.99, "loss": 0.01})


def long_metric_names(h: Honest) -> Upload:
    return Upload.of(h, "50 metric names of 900 characters", metrics={**h.metrics, **LONG_NAMES})


def val_examples_alone(h: Honest) -> Upload:
    metrics = {k: v for k, v in h.metrics.items() if k not in ("val_accuracy", "val_loss")}
    return Upload.of(h, "val_examples without val_accuracy", metrics={**metrics, "val_examples": 1.0})


def huge_tensor(h: Honest) -> Upload:
    """The largest floating tensor set to 1e35, with the honest number of examples."""
    name = max((k for k, v in h.weights.items() if v.dtype.kind == "f"), key=lambda k: h.weights[k].size)
    return Upload.of(h, f"tensor {name!r} of 1e35 values",
                     weights={**h.weights, name: np.full_like(h.weights[name], HUGE)})


def huge_statistics(h: Honest) -> Upload:
    """Statistics whose sums (every tensor but the count) are 1e300."""
    weights = {k: v if k == "count" else np.full_like(v, HUGE_STATS) for k, v in h.weights.items()}
    return Upload.of(h, "statistics sums of 1e300", weights=weights)


def overflowing_loss(h: Honest) -> Upload:
    return Upload.of(h, "train_loss 1e308 over 1e12 examples", num_examples=10**12,
                     metrics={**h.metrics, "train_loss": 1e308})


def header_disagrees_with_bytes(h: Honest) -> Upload:
    return Upload("resumable upload whose header is longer than its bytes", header_longer_than_body(),
                  resumable=True)


def every_case(others: int) -> tuple[Tamper, ...]:
    """Each tampering of a training upload, in the order the acceptance run sends them (round r gets the
    (r-1)th); ``others`` is the honest workers' number of examples (``HostileWorker.others_examples``)."""
    return (metric_named_timings, metric_named_round(others), faked_scores, long_metric_names, val_examples_alone,
            huge_tensor, overflowing_loss, header_disagrees_with_bytes)
