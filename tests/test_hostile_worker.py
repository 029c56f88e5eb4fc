"""Issue 12: a hostile worker cannot hang, brick, poison or fake a run.

A hostile participant holds a valid place in the run (the coordinators here need no token), trains
honestly with the task's own code and tampers with one upload per round (``hostile.py``: a real
client of the public /v1 API in this process). The honest workers are real ``fedfleet worker``
processes. Each case of the issue has its own short songs run; the acceptance test runs 8 rounds
with every case, and the same run untampered, and compares them.

What a round record holds (metrics.jsonl lines, ``GET /v1/rounds`` items): the coordinator's own
fields, optional ``fed_*`` fields of federated evaluation, and ``worker_metrics``, the means of the
valid metrics workers sent (names ``[a-z][a-z0-9_]{0,47}``, at most 32, finite, |value| <= 1e15).
No name a worker sent ever appears at the top level.

Four partitions out of four answer an untampered round at once. After a rejected upload the
coordinator may offer the round to the hostile worker again, which then answers honestly (one
tampered upload per round); if it does not, the round closes at its deadline (``--round-timeout``)
with the three others: ``--quorum 0.75``.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import safetensors.numpy

from conftest import Coordinator, Fleet
from fedfleet.tasks.songs import SongsTask
from hostile import (
    LONG_NAMES,
    Honest,
    HostileWorker,
    Sent,
    Tamper,
    every_case,
    faked_scores,
    header_disagrees_with_bytes,
    huge_statistics,
    huge_tensor,
    long_metric_names,
    metric_named_round,
    metric_named_timings,
    overflowing_loss,
    strict_json,
    val_examples_alone,
    wait_until,
)
from metrics_support import parse

RUN = ("--task", "songs", "--workers", "4", "--seed", "11", "--quorum", "0.75", "--round-timeout", "6",
       "--worker-timeout", "20", "--wait-timeout", "60", "--linger", "5")
END_TIMEOUT = 30.0  # seconds a coordinator may take to exit once its workers were told to stop

COORDINATOR_FIELDS = {"round", "accuracy", "loss", "participants", "sampled", "attempts", "seconds", "bytes_in",
                      "bytes_out", "model_version", "timings", "worker_metrics"}
TIMINGS = {"open", "wait_workers", "aggregate", "evaluate", "checkpoint"}
# Optional fields the coordinator may add about a round (counts of what it refused or dropped; with --dp
# central, the epsilon spent and the updates clipped; a classifier's confusion counts on the held-out set; with
# --server-val, the score on the examples the coordinator kept, null without it).
OPTIONAL_FIELDS = {"updates_rejected", "metrics_dropped", "test_metrics", "dp_epsilon", "dp_clipped", "secagg",
                   "dp_clip", "dp_unclipped_fraction", "confusion", "val_accuracy", "val_loss"}
FED_FIELDS = {"fed_accuracy", "fed_loss", "fed_accuracy_std", "fed_accuracy_min", "fed_accuracy_max",
              "fed_examples"}
METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
MAX_WORKER_METRICS = 32
METRIC_BOUND = 1e15
RECORD_LINE_BYTES = 4096


# --- a run: coordinator, honest worker processes, the hostile client -------------------------------
class Play:
    """Starts runs for one test; the fleet stops the processes, ``close`` the hostile clients."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.hostiles: list[HostileWorker] = []

    def start(self, *args: str, rounds: int, honest: int = 3, data_dir: Path | None = None
              ) -> tuple[Coordinator, HostileWorker]:
        coord = self.fleet.coordinator(*RUN, "--rounds", str(rounds), *args, data_dir=data_dir)
        self.fleet.worker(coord.url, clients=honest)
        hostile = HostileWorker(coord.url)
        self.hostiles.append(hostile)
        hostile.register()
        return coord, hostile

    def close(self) -> None:
        for h in self.hostiles:
            h.close()


@pytest.fixture
def play(fleet: Fleet) -> Iterator[Play]:
    p = Play(fleet)
    try:
        yield p
    finally:
        p.close()


def only_train(tamper: Tamper) -> Tamper:
    """``tamper`` for training uploads; statistics go honestly."""
    return lambda h: tamper(h) if h.kind == "train" else None


def only_round(rnd: int, tamper: Tamper) -> Tamper:
    return lambda h: tamper(h) if h.kind == "train" and h.round == rnd else None


def play_out(coord: Coordinator, hostile: HostileWorker, tamper: Tamper | None, budget: float = 75.0,
             before_upload: Callable[[Honest], None] | None = None) -> None:
    """Run the hostile client until the run ends, then wait for the coordinator to exit."""
    hostile.run(tamper, budget=budget, before_upload=before_upload)
    assert hostile.stopped, f"the hostile worker was not told to stop within {budget:g} s; /v1/status says " \
                            f"{status_text(coord.url)}"
    wait_exit(coord)


def wait_exit(coord: Coordinator, timeout: float = END_TIMEOUT) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        coord.proc.wait(timeout=timeout)
    if coord.proc.returncode is None:
        pytest.fail(f"the coordinator had not exited {timeout:g} s after its workers were told to stop (it hangs); "
                    f"/v1/status says {status_text(coord.url)}", pytrace=False)


def read_summary(data_dir: Path) -> dict[str, Any]:
    """summary.json, parsed strictly (no NaN or Infinity)."""
    text = (data_dir / "summary.json").read_text()
    try:
        summary: dict[str, Any] = strict_json(text)
    except ValueError as exc:
        raise AssertionError(f"summary.json is not strict JSON ({exc}): {text[:400]}") from exc
    return summary


def status_text(url: str) -> str:
    try:
        return httpx.get(f"{url}/v1/status", timeout=5.0).text[:500]
    except httpx.TransportError as exc:
        return repr(exc)


def assert_finished(summary: dict[str, Any], rounds: int) -> None:
    assert summary["state"] == "finished", f"the run {summary['state']}: {summary['message']}"
    assert summary["rounds"] == rounds, summary


# --- what every record must look like ---------------------------------------------------------------
def read_records(data_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, every line strict JSON (no NaN or Infinity) and under 4 KB."""
    out = []
    for i, line in enumerate((data_dir / "metrics.jsonl").read_text().splitlines(), 1):
        assert len(line.encode()) < RECORD_LINE_BYTES, f"metrics.jsonl line {i} has {len(line.encode())} bytes"
        try:
            out.append(strict_json(line))
        except ValueError as exc:
            raise AssertionError(f"metrics.jsonl line {i} is not strict JSON ({exc}): {line[:300]}") from exc
    return out


def check_record(rec: dict[str, Any], rnd: int) -> None:
    """The coordinator's fields, of their types and nothing a worker named; valid worker metrics."""
    assert rec.get("round") == rnd and type(rec["round"]) is int, f"record {rnd} says round {rec.get('round')!r}"
    assert isinstance(rec.get("timings"), dict) and set(rec["timings"]) == TIMINGS, \
        f"record {rnd}: timings is {rec.get('timings')!r}"
    missing = COORDINATOR_FIELDS - set(rec)
    assert not missing, f"record {rnd} lacks {sorted(missing)}"
    foreign = set(rec) - COORDINATOR_FIELDS - OPTIONAL_FIELDS - FED_FIELDS
    assert not foreign, f"record {rnd} has names a worker sent at its top level: {sorted(foreign)[:5]}"
    # These runs keep no --server-val set, so a worker's own val_accuracy/val_loss must not surface as the run's.
    assert rec.get("val_accuracy") is None and rec.get("val_loss") is None, \
        f"record {rnd}: val_accuracy {rec.get('val_accuracy')!r}, val_loss {rec.get('val_loss')!r} without --server-val"
    for name in ("participants", "sampled", "attempts", "bytes_in", "bytes_out", "model_version"):
        assert type(rec[name]) is int and rec[name] >= 0, f"record {rnd}: {name} = {rec[name]!r}"
    assert 1 <= rec["participants"] <= rec["sampled"], rec
    assert 0.0 <= rec["accuracy"] <= 1.0 and math.isfinite(rec["loss"]) and rec["loss"] >= 0, rec
    wm = rec["worker_metrics"]
    assert isinstance(wm, dict) and len(wm) <= MAX_WORKER_METRICS, f"record {rnd}: {len(wm)} worker metrics"
    for name, value in wm.items():
        assert METRIC_NAME.match(name), f"record {rnd}: worker metric name {name[:60]!r} kept"
        assert isinstance(value, int | float) and math.isfinite(value) and abs(value) <= METRIC_BOUND, \
            f"record {rnd}: worker metric {name} = {value!r} kept"


def check_records(data_dir: Path, rounds: int) -> list[dict[str, Any]]:
    records = read_records(data_dir)
    assert [r.get("round") for r in records] == list(range(1, rounds + 1)), \
        f"records' round fields are {[r.get('round') for r in records]}"
    for i, rec in enumerate(records, 1):
        check_record(rec, i)
    return records


def final_model(data_dir: Path) -> dict[str, np.ndarray]:
    model = safetensors.numpy.load_file(data_dir / "model.safetensors")
    bad = [k for k, v in model.items() if not np.isfinite(v).all()]
    assert not bad, f"model.safetensors holds NaN or Inf in {bad}"
    return model


def songs_accuracy(model: dict[str, np.ndarray]) -> float:
    """The model's accuracy on the songs test set, computed here."""
    task = SongsTask()
    return float(task.evaluate(model, task.load_test())["accuracy"])


def counter(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((f"{name}_total", tuple(sorted(labels.items()))), 0.0)


def assert_4xx(sent: Sent, *words: str) -> None:
    assert 400 <= sent.status < 500, f"{sent.case}: expected a 4xx, got {sent.status}: {sent.detail[:300]}"
    for w in words:
        assert w.lower() in sent.detail.lower(), f"{sent.case}: {w!r} not in {sent.detail!r}"


def tampered(hostile: HostileWorker) -> list[Sent]:
    return [s for s in hostile.sent if s.tampered]


class Views:
    """What the coordinator's own views say while round ``r`` is open (so after round r-1 was recorded)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: dict[int, dict[str, Any]] = {}

    def __call__(self, h: Honest) -> None:
        if h.kind != "train" or h.round in self.seen:
            return
        with httpx.Client(base_url=self.url, timeout=10.0) as c:
            views: dict[str, Any] = {}
            for name, method, path in (("status", "GET", "/v1/status"), ("evaluate", "POST", "/v1/evaluate"),
                                       ("rounds", "GET", "/v1/rounds"), ("dashboard", "GET", "/v1/dashboard"),
                                       ("metrics", "GET", "/metrics")):
                r = c.request(method, path)
                views[name] = (r.status_code, r.text)
        self.seen[h.round] = views

    def json(self, rnd: int, name: str) -> Any:
        status, text = self.seen[rnd][name]
        assert status == 200, f"{name} while round {rnd} was open: HTTP {status}: {text[:300]}"
        try:
            return strict_json(text)
        except ValueError as exc:
            raise AssertionError(f"{name} while round {rnd} was open is not strict JSON ({exc})") from exc

    def check_scores(self, rnd: int) -> None:
        """/v1/status reports the coordinator's own test-set scores of the last recorded round."""
        status, ev = self.json(rnd, "status"), self.json(rnd, "evaluate")
        assert status["round"] == rnd - 1 == ev["round"], (status, ev)
        assert status["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9) and \
            status["loss"] == pytest.approx(ev["loss"], abs=1e-9), \
            f"/v1/status says accuracy {status['accuracy']} loss {status['loss']} after round {rnd - 1}; the " \
            f"coordinator's own test set says {ev['accuracy']} and {ev['loss']}"
        rounds = self.json(rnd, "rounds")
        assert rounds[-1]["accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9), rounds[-1]


# --- 1. worker metric names that are the coordinator's -------------------------------------------
def test_metric_named_timings_does_not_fail_the_run(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    play_out(coord, hostile, only_round(1, metric_named_timings))
    summary = read_summary(coord.data_dir)
    assert_finished(summary, 2)
    assert [s.status for s in tampered(hostile)] == [200], hostile.sent
    check_records(coord.data_dir, 2)
    assert [t["round"] for t in summary["round_timings"]] == [1, 2], summary["round_timings"]


def test_metric_named_round_keeps_round_numbers_and_a_killed_run_resumes(play: Play, fleet: Fleet) -> None:
    # Every training upload of the hostile worker says round 12, weighted like the three others together.
    rounds = 5
    coord, hostile = play.start(rounds=rounds)
    port = urlsplit(coord.url).port
    halt = threading.Event()
    thread = threading.Thread(target=hostile.run, daemon=True, kwargs={
        "tamper": only_train(metric_named_round(hostile.others_examples())), "budget": 90.0, "halt": halt,
        "once_per_round": False})
    thread.start()
    try:
        metrics = coord.data_dir / "metrics.jsonl"

        def recorded() -> list[Any]:
            return [strict_json(line).get("round") for line in metrics.read_text().splitlines()] \
                if metrics.exists() else []

        wait_until(lambda: len(recorded()) >= 2 or not thread.is_alive(), 45, "two rounds recorded")
        before = recorded()
        assert len(before) >= 2, f"the run ended with the records {before}; /v1/status: {status_text(coord.url)}"
        coord.kill(signal.SIGKILL)
        coord.proc.wait(timeout=30)
        restarted: Coordinator | str
        try:
            restarted = fleet.coordinator(*RUN, "--rounds", str(rounds), "--port", str(port), data_dir=coord.data_dir)
        except pytest.fail.Exception as exc:
            restarted = str(exc)
        if isinstance(restarted, str):
            pytest.fail(f"after a SIGKILL the coordinator does not start again on its data dir (records' round "
                        f"fields before the kill: {before}):\n{restarted}", pytrace=False)
        coord = restarted
        thread.join(timeout=90)
        assert hostile.stopped, f"the run did not end after the restart; /v1/status: {status_text(coord.url)}"
        wait_exit(coord)
    finally:
        halt.set()
        thread.join(timeout=15)
    assert_finished(read_summary(coord.data_dir), rounds)
    check_records(coord.data_dir, rounds)
    # 0: sent while the coordinator was down; 409: for a round the restart ran again.
    assert all(s.status in (0, 200, 409) for s in tampered(hostile)), hostile.sent


def test_faked_accuracy_and_loss_are_not_reported(play: Play) -> None:
    coord, hostile = play.start(rounds=3)
    views = Views(coord.url)
    play_out(coord, hostile, only_train(faked_scores), before_upload=views)
    summary = read_summary(coord.data_dir)
    assert_finished(summary, 3)
    for rnd in (2, 3):
        views.check_scores(rnd)
    accuracy = songs_accuracy(final_model(coord.data_dir))
    assert summary["final_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    records = check_records(coord.data_dir, 3)
    assert records[-1]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_long_metric_names_are_dropped_and_records_stay_small(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    views = Views(coord.url)
    play_out(coord, hostile, only_round(1, long_metric_names), before_upload=views)
    assert [s.status for s in tampered(hostile)] == [200], hostile.sent
    records = read_records(coord.data_dir)  # each line under 4 KB
    dashboard = views.seen[2]["dashboard"][1]
    assert len(dashboard) < 16 * 1024, f"/v1/dashboard after one round has {len(dashboard)} bytes"
    assert len(views.seen[2]["rounds"][1]) < RECORD_LINE_BYTES, "/v1/rounds after one round is over 4 KB"
    assert_finished(read_summary(coord.data_dir), 2)
    check_records(coord.data_dir, 2)
    assert not set(LONG_NAMES) & set(records[0]["worker_metrics"])
    dropped = parse(views.seen[2]["metrics"][1])
    assert counter(dropped, "fedfleet_worker_metrics_dropped", reason="name") >= len(LONG_NAMES), \
        sorted(k for k in dropped if "dropped" in k[0])


def test_val_examples_without_val_accuracy_does_not_fail_the_run(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    play_out(coord, hostile, only_round(1, val_examples_alone))
    assert_finished(read_summary(coord.data_dir), 2)
    assert [s.status for s in tampered(hostile)] == [200], hostile.sent
    check_records(coord.data_dir, 2)


# --- 2. finite updates that overflow -------------------------------------------------------------
def test_update_over_the_norm_bound_is_rejected(play: Play) -> None:
    coord, hostile = play.start("--max-update-norm", "100", rounds=2)
    views = Views(coord.url)
    play_out(coord, hostile, only_round(1, huge_tensor), before_upload=views)
    [sent] = tampered(hostile)
    assert_4xx(sent, "norm", "100")
    assert counter(parse(views.seen[2]["metrics"][1]), "fedfleet_updates_rejected", reason="norm") == 1
    final_model(coord.data_dir)
    assert_finished(read_summary(coord.data_dir), 2)
    check_records(coord.data_dir, 2)


ROBUST = {
    "median": ((), 3),
    # 1 of 4 trimmed at each end: the default 0.1 trims nothing from 4 deltas.
    "trimmed_mean": (("--strategy-option", "trim_fraction=0.25"), 3),
    # Krum withstanding f = 1 needs 2f + 3 = 5 deltas: one more honest worker.
    "krum": (("--workers", "5"), 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(ROBUST))
def test_robust_strategy_holds_against_a_huge_update(play: Play, strategy: str) -> None:
    extra, honest = ROBUST[strategy]
    args = ("--strategy", strategy, "--quorum", "1.0", *extra)
    accuracy, dirs = {}, {}
    for name, tamper in (("clean", None), ("attacked", only_train(huge_tensor))):
        coord, hostile = play.start(*args, rounds=3, honest=honest, data_dir=play.fleet.directory / name)
        play_out(coord, hostile, tamper)
        accuracy[name] = songs_accuracy(final_model(coord.data_dir))
        dirs[name] = coord.data_dir
    assert abs(accuracy["attacked"] - accuracy["clean"]) <= 0.02, accuracy
    for d in dirs.values():
        assert_finished(read_summary(d), 3)
        check_records(d, 3)


def test_fedavg_without_a_bound_never_makes_the_model_non_finite(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    play_out(coord, hostile, only_round(1, huge_tensor))
    final_model(coord.data_dir)
    assert_finished(read_summary(coord.data_dir), 2)
    check_records(coord.data_dir, 2)


def test_implausible_statistics_never_reach_the_model(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    play_out(coord, hostile, lambda h: huge_statistics(h) if h.kind == "stats" else None)
    [sent] = tampered(hostile)
    assert sent.kind == "stats" and (sent.status == 200 or 400 <= sent.status < 500), sent
    model = final_model(coord.data_dir)
    assert_finished(read_summary(coord.data_dir), 2)
    assert songs_accuracy(model) > 0.5
    check_records(coord.data_dir, 2)


def test_overflowing_metric_mean_never_writes_infinity(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    views = Views(coord.url)
    play_out(coord, hostile, only_round(1, overflowing_loss), before_upload=views)
    read_records(coord.data_dir)  # every line strict JSON
    views.json(2, "rounds")
    views.json(2, "dashboard")
    assert_finished(read_summary(coord.data_dir), 2)
    check_records(coord.data_dir, 2)


# --- 3. the resumable upload path ----------------------------------------------------------------
def test_resumable_upload_whose_header_disagrees_with_its_bytes_is_a_4xx(play: Play) -> None:
    coord, hostile = play.start(rounds=2)
    play_out(coord, hostile, only_round(1, header_disagrees_with_bytes))
    [sent] = tampered(hostile)
    assert_4xx(sent, "header")
    assert_finished(read_summary(coord.data_dir), 2)
    check_records(coord.data_dir, 2)


# --- acceptance ----------------------------------------------------------------------------------
def every_upload(cases: tuple[Tamper, ...]) -> Tamper:
    """The statistics get ``huge_statistics``; training round r the (r-1)th of ``cases``, cycling."""
    return lambda h: huge_statistics(h) if h.kind == "stats" else cases[(h.round - 1) % len(cases)](h)


@pytest.mark.slow
def test_acceptance_a_hostile_worker_tampering_every_round_changes_nothing(play: Play) -> None:
    rounds = 8
    args = ("--max-update-norm", "100")
    runs: dict[str, tuple[Coordinator, HostileWorker, Views]] = {}
    for name in ("clean", "tampered"):
        coord, hostile = play.start(*args, rounds=rounds, data_dir=play.fleet.directory / name)
        views = Views(coord.url)
        tamper = every_upload(every_case(hostile.others_examples())) if name == "tampered" else None
        play_out(coord, hostile, tamper, budget=120.0, before_upload=views)
        runs[name] = (coord, hostile, views)
    coord, hostile, views = runs["tampered"]
    report = "\n".join(f"  {s.kind} round {s.round}: {s.case or 'honest'} -> {s.status} {s.detail[:120]}"
                       for s in hostile.sent)
    print(f"hostile worker's uploads:\n{report}")  # for docs/reliability.md (pytest -s)
    # Every tampered upload: a 4xx that says why, or a 200 (with what was invalid stripped: see the records).
    sent = tampered(hostile)
    assert len(sent) == rounds + 1, report
    for s in sent:
        assert s.status == 200 or (400 <= s.status < 500 and s.detail), f"{s.case}: {s.status}\n{report}"
    summary = read_summary(coord.data_dir)
    assert_finished(summary, rounds)
    model = final_model(coord.data_dir)
    accuracy = songs_accuracy(model)
    clean_coord = runs["clean"][0]
    assert_finished(read_summary(clean_coord.data_dir), rounds)
    clean_accuracy = songs_accuracy(final_model(clean_coord.data_dir))
    assert abs(accuracy - clean_accuracy) <= 0.01, f"tampered {accuracy:.4f}, clean {clean_accuracy:.4f}\n{report}"
    for rnd in range(2, rounds + 1):
        views.check_scores(rnd)
    assert summary["final_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    records = check_records(coord.data_dir, rounds)
    assert records[-1]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert counter(parse(views.seen[rounds]["metrics"][1]), "fedfleet_updates_rejected", reason="norm") == 1
