"""The engine and its update intake without HTTP: round transitions, records, and what an untrusted
worker's update may and may not change. Workers are simulated in-process through the engine's own
commands (register, next_instruction) and the intake's one-shot path, on one event loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import ProtocolError, RequestRejected
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY, TrainInstruction, UpdateAck, UpdateMeta
from fedfleet.storage.records import RoundRecord
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import load_task
from fedfleet.types import Weights

PARAMS = 8


def open_engine(tmp_path: Path, **options: Any) -> Engine:
    config = RunConfig.from_mapping({"task": "null", "task_options": {"params": str(PARAMS)}, "workers": 3,
                                     "rounds": 2, "round_timeout": 5.0, **options})
    return Engine.open(config, load_task(config.task, config.task_options_dict), tmp_path / "run", linger=0.0)


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def send(engine: Engine, worker: str, instruction: TrainInstruction, weights: Weights,
               num_examples: int = 10, metrics: dict[str, float] | None = None) -> UpdateAck:
    meta = UpdateMeta(worker_id=worker, round=instruction.round, attempt=instruction.attempt,
                      num_examples=num_examples, metrics=metrics or {})
    body = codec.encode(weights, {UPDATE_META_KEY: meta.model_dump_json()})
    return await engine.intake.receive(chunks(body), str(len(body)), lambda worker_id: None)


def plus(engine: Engine, value: float) -> Weights:
    return {"w": np.asarray(engine.model().weights["w"] + np.float32(value), dtype=np.float32)}


Tamper = Callable[[Engine, str, TrainInstruction], Awaitable[None]]


async def drive(engine: Engine, tamper: Tamper | None = None) -> list[BaseException]:
    """Run the engine to its end with three in-process workers; worker "w0" calls ``tamper`` instead of
    answering honestly, once per round. Returns what the tampering raised."""
    ids = [engine.register(f"w{i}", f"worker {i}").worker_id for i in range(3)]
    loop = asyncio.create_task(engine.run())
    refused: list[BaseException] = []

    async def worker(wid: str) -> None:
        done: set[tuple[int, int]] = set()
        while True:
            msg = await engine.next_instruction(wid, 1.0)
            if msg.kind == "stop":
                return
            if not isinstance(msg, TrainInstruction) or (msg.round, msg.attempt) in done:
                await asyncio.sleep(0.01)  # refused: the round goes on without this worker
                continue
            done.add((msg.round, msg.attempt))
            if wid == "w0" and tamper is not None:
                try:
                    await tamper(engine, wid, msg)
                except ProtocolError as exc:
                    refused.append(exc)
                continue
            await send(engine, wid, msg, plus(engine, 1.0), metrics={"train_loss": 0.5})

    await asyncio.wait_for(asyncio.gather(loop, *(worker(w) for w in ids)), 60)
    return refused


def run(engine: Engine, tamper: Tamper | None = None) -> list[BaseException]:
    try:
        return asyncio.run(drive(engine, tamper))
    finally:
        engine.close()


def strict_lines(path: Path) -> list[dict[str, Any]]:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_run_of_honest_workers_writes_typed_records(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    assert run(engine) == []
    assert engine.state == "finished"
    run_dir = RunDir(tmp_path / "run")
    records = run_dir.read_rounds()
    assert [r.round for r in records] == [1, 2]
    assert all(r.participants == 3 and r.worker_metrics == {"train_loss": 0.5} for r in records)
    np.testing.assert_allclose(engine.model().weights["w"], np.full(PARAMS, 2.0))
    summary = run_dir.read_summary()
    assert summary is not None and summary.state == "finished" and summary.rounds == 2
    assert strict_lines(run_dir.metrics_path)[0]["worker_metrics"] == {"train_loss": 0.5}


@pytest.mark.parametrize("metrics", [
    {"timings": 1.0}, {"round": 12.0}, {"accuracy": 0.99, "loss": 0.01}, {"participants": 1e9},
    {f"k{i}_{'x' * 40}": 1.0 for i in range(50)},
    {"Accuracy": 1.0, "x" * 900: 1.0, "train_loss": float("nan"), "big": 1e300, "val_examples": 1.0},
])
def test_worker_metrics_never_reach_the_coordinators_own_fields(tmp_path: Path, metrics: dict[str, float]) -> None:
    engine = open_engine(tmp_path)

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 1.0), num_examples=20, metrics=metrics)

    assert run(engine, tamper) == []
    records = RunDir(tmp_path / "run").read_rounds()
    assert [r.round for r in records] == [1, 2]
    for record in records:
        assert record.participants == 3 and record.accuracy == 0.0 and record.loss is not None
        assert len(record.worker_metrics) <= 32
        assert all(len(name) <= 48 for name in record.worker_metrics)
        assert set(record.model_dump()) == set(RoundRecord.model_fields)
    line = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0]
    assert len(line) < 4096
    strict_lines(tmp_path / "run" / "metrics.jsonl")


def test_dropped_metrics_are_counted_in_the_record_and_the_metrics(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, rounds=1)

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 1.0), metrics={"Bad Name": 1.0, "nan": float("nan"),
                                                                  "ok": 2.0})

    run(engine, tamper)
    record = RunDir(tmp_path / "run").read_rounds()[0]
    assert record.metrics_dropped == 2
    assert record.worker_metrics == {"ok": 2.0, "train_loss": 0.5}
    text = engine.metrics.render(None)[0].decode()
    assert 'fedfleet_worker_metrics_dropped_total{reason="name"} 1.0' in text
    assert 'fedfleet_worker_metrics_dropped_total{reason="range"} 1.0' in text


def test_an_update_over_the_norm_bound_is_refused_with_its_norm_and_the_bound(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, max_update_norm=100.0)

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 1e35))

    refused = run(engine, tamper)
    assert len(refused) == 2
    assert all(isinstance(e, ProtocolError) and e.status == 422 and e.reason == "norm" for e in refused)
    assert "norm 2.82843e+35" in str(refused[0]) and "bound 100" in str(refused[0])
    weights = engine.model().weights["w"]
    np.testing.assert_allclose(weights, np.full(PARAMS, 2.0))  # the two honest workers' rounds
    records = RunDir(tmp_path / "run").read_rounds()
    assert [r.participants for r in records] == [2, 2] and [r.updates_rejected for r in records] == [1, 1]
    assert 'fedfleet_updates_rejected_total{reason="norm"} 2.0' in engine.metrics.render(None)[0].decode()


def test_a_huge_finite_update_leaves_the_fedavg_model_finite(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, rounds=1)

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 3e38), num_examples=10_000)

    assert run(engine, tamper) == []
    assert np.isfinite(engine.model().weights["w"]).all()
    assert np.isfinite(codec.decode((tmp_path / "run" / "model.safetensors").read_bytes())[0]["w"]).all()


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum"])
def test_robust_strategies_hold_against_a_huge_update(tmp_path: Path, strategy: str) -> None:
    options = {"trim_fraction": "0.34"} if strategy == "trimmed_mean" else {}
    engine = open_engine(tmp_path, strategy=strategy, strategy_options=options, workers=5)
    ids = None

    async def scenario() -> None:
        nonlocal ids
        ids = [engine.register(f"w{i}", "").worker_id for i in range(5)]
        loop = asyncio.create_task(engine.run())

        async def worker(wid: str) -> None:
            while (msg := await engine.next_instruction(wid, 1.0)).kind != "stop":
                if isinstance(msg, TrainInstruction):
                    value = 1e35 if wid == "w0" else 1.0 + 0.01 * int(wid[1:])
                    await send(engine, wid, msg, plus(engine, value))

        await asyncio.wait_for(asyncio.gather(loop, *(worker(w) for w in ids)), 60)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    w = engine.model().weights["w"]
    assert np.isfinite(w).all() and np.all(np.abs(w) < 3.0), w


def test_non_finite_values_and_stale_updates_are_refused_and_counted(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, rounds=1)

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        bad = plus(engine, 1.0)
        bad["w"][3] = np.inf
        with pytest.raises(ProtocolError, match="contains NaN or Inf") as non_finite:
            await send(engine, wid, msg, bad)
        assert non_finite.value.status == 422
        stale = TrainInstruction(round=msg.round + 5, attempt=0, model_version=0, params=msg.params)
        with pytest.raises(RequestRejected, match="round 6"):
            await send(engine, wid, stale, plus(engine, 1.0))
        # Neither refusal took the worker's slot: its honest update still counts.
        await send(engine, wid, msg, plus(engine, 1.0))

    assert run(engine, tamper) == []
    assert RunDir(tmp_path / "run").read_rounds()[0].participants == 3
    text = engine.metrics.render(None)[0].decode()
    assert 'fedfleet_updates_rejected_total{reason="non_finite"} 1.0' in text
    assert 'fedfleet_updates_rejected_total{reason="stale"} 1.0' in text


def test_engine_open_resumes_from_the_recorded_round(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, rounds=2)
    run(engine)
    records = RunDir(tmp_path / "run").read_rounds()
    # A finished run is not resumed; the records and summary stay as they were.
    with pytest.raises(Exception, match="has finished"):
        open_engine(tmp_path, rounds=2)
    assert RunDir(tmp_path / "run").read_rounds() == records


def test_an_aggregate_that_is_not_finite_is_not_applied_and_the_round_runs_without_its_cause(tmp_path: Path) -> None:
    # server_lr 2 doubles a mean delta of 3.4e38: Inf in float32. The round must not take it.
    engine = open_engine(tmp_path, strategy="fedavg", strategy_options={"server_lr": "2"})

    async def tamper(engine: Engine, wid: str, msg: TrainInstruction) -> None:
        await send(engine, wid, msg, plus(engine, 3.4e38), num_examples=10**12)

    assert run(engine, tamper) == []
    assert engine.state == "finished"
    w = engine.model().weights["w"]
    np.testing.assert_allclose(w, np.full(PARAMS, 4.0))  # two rounds of the honest +1, doubled
    records = RunDir(tmp_path / "run").read_rounds()
    assert [(r.attempts, r.participants) for r in records] == [(2, 2), (2, 2)]
    text = engine.metrics.render(None)[0].decode()
    assert 'fedfleet_rounds_not_applied_total{kind="train"} 2.0' in text


def test_while_workers_are_missing_status_says_for_whom_and_until_when(tmp_path: Path) -> None:
    engine = open_engine(tmp_path, wait_timeout=60.0)

    async def scenario() -> None:
        engine.register("w0", "host-a/0")
        engine.register("w1", "host-b/0")
        loop = asyncio.create_task(engine.run())
        await asyncio.sleep(0.1)
        waiting = engine.status().waiting
        assert waiting is not None
        assert (waiting.live, waiting.needed) == (2, 3)  # the first round waits for every partition
        assert waiting.waiting_for == ["1 partition with no worker yet"]
        assert 50 < waiting.fails_at - time.time() <= 60
        loop.cancel()

    try:
        asyncio.run(scenario())
    finally:
        engine.close()


def test_after_the_first_round_a_dead_worker_does_not_stall_the_run(tmp_path: Path) -> None:
    # quorum 0.5 of 3 workers: after round 1, two live workers are enough to open a round.
    engine = open_engine(tmp_path, rounds=3, worker_timeout=1.0, wait_timeout=600.0)

    async def scenario() -> None:
        ids = [engine.register(f"w{i}", "").worker_id for i in range(3)]
        loop = asyncio.create_task(engine.run())

        async def worker(wid: str) -> None:
            while (msg := await engine.next_instruction(wid, 0.5)).kind != "stop":
                if isinstance(msg, TrainInstruction):
                    await send(engine, wid, msg, plus(engine, 1.0))
                    if wid == "w2":
                        return  # dies after its first update: no more polls

        await asyncio.wait_for(asyncio.gather(loop, *(worker(w) for w in ids)), 60)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.state == "finished"
    records = RunDir(tmp_path / "run").read_rounds()
    assert records[0].participants == 3 and records[-1].participants == 2
