"""The coordinator's training loop and the state the HTTP API reads and feeds.

Everything here runs on the server's event loop; numpy work that takes long (folding an update,
evaluating, writing a checkpoint) goes to a thread so that transfers keep flowing meanwhile.

The loop: wait for enough live workers → (statistics round, if the task has one) → for each round:
sample workers, open the round, wait until every sampled worker answered or the deadline passed,
aggregate, evaluate, checkpoint, record → finish and tell the workers to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedfleet import log
from fedfleet.config import RunConfig
from fedfleet.coordinator.metrics import CoordinatorMetrics
from fedfleet.coordinator.registry import Registry, WorkerState
from fedfleet.coordinator.rounds import Kind, RoundState, new_round, sample
from fedfleet.errors import ConfigError, FedfleetError, RequestRejected, RoundError
from fedfleet.partition import parse_partition
from fedfleet.protocol import codec
from fedfleet.protocol.codec import Header
from fedfleet.protocol.messages import (
    EvalResult,
    PartitionInfo,
    RegisterResponse,
    Status,
    TaskMessage,
    TrainParamsMsg,
    UpdateMeta,
    WorkerView,
)
from fedfleet.storage.checkpoints import Checkpoints
from fedfleet.storage.files import write_atomic, write_text_atomic
from fedfleet.storage.sqlite import Store
from fedfleet.strategies import make_strategy
from fedfleet.strategies.accumulate import WeightedSum
from fedfleet.strategies.server_opt import OptState, state_from_tensors, state_to_tensors
from fedfleet.tasks import Task
from fedfleet.types import Weights, num_parameters, schema_of

State = Literal["waiting", "running", "finished", "failed"]
HEADER_SLACK = 64 * 1024  # room for an update's JSON header beyond its tensor bytes


class Engine:
    def __init__(self, config: RunConfig, task: Task, data_dir: Path, linger: float = 10.0) -> None:
        self.config = config
        self.task = task
        self.data_dir = data_dir
        self.linger = linger
        self.store = Store(data_dir / "state.sqlite")
        self.checkpoints = Checkpoints(data_dir / "checkpoints")
        self.strategy = make_strategy(config.strategy, config.strategy_options_dict)
        self.state: State = "waiting"
        self.phase = "starting"
        self.message = ""
        self.round = 0  # last completed training round
        self.current: RoundState | None = None
        self.accuracy: float | None = None
        self.loss: float | None = None
        self.history: list[dict[str, Any]] = []
        self.done = asyncio.Event()  # set when the run is over and the workers had time to hear it
        # Two broadcast events, so that N workers parked in long-polls are woken only when there may be
        # work for them (a round opens, the run ends), not by each of the N answers of a round: that
        # would be N² wake-ups per round.
        self._work = asyncio.Event()
        self._progress = asyncio.Event()
        self._fold_lock = asyncio.Lock()
        self._test = task.load_test()
        self._started = time.monotonic()
        self._stats_done = False
        self.run_id = self._open_run()
        self.registry = Registry(self.store, config.workers, config.worker_timeout)
        self.poll_seconds = max(1.0, min(20.0, config.worker_timeout / 2))
        self._restore_model()
        self.strategy_state = self._restore_strategy_state()
        self.metrics = CoordinatorMetrics(self)

    # --- start-up ----------------------------------------------------------------------------
    def _open_run(self) -> str:
        """Create the run in the data dir, or pick up the one there if its config matches."""
        row = self.store.run()
        toml = self.config.to_toml()
        if row is None:
            run_id = uuid.uuid4().hex[:12]
            self.store.create_run(run_id, toml)
            write_text_atomic(self.data_dir / "config.toml", toml)
            (self.data_dir / "metrics.jsonl").unlink(missing_ok=True)
            return run_id
        saved = RunConfig.from_mapping(tomllib.loads(row.config))
        diff = saved.differences(self.config)
        if diff:
            name = diff[0]
            raise ConfigError(
                f"{self.data_dir} holds run {row.id} whose '{name}' is {getattr(saved, name)!r}, not "
                f"{getattr(self.config, name)!r}; use the same config to resume it or a new --data-dir",
                option=name)
        if row.state in ("finished", "failed"):
            raise ConfigError(f"{self.data_dir} holds run {row.id}, which has {row.state}; "
                              "use a new --data-dir for a new run", option="data_dir")
        return row.id

    def _restore_model(self) -> None:
        """Pick up after a crash: the model after the last round recorded in SQLite, which is the truth.

        A round's checkpoint is written before its record, so the recorded round always has one;
        a checkpoint newer than the last record belongs to a round that is simply run again.
        """
        self.history = self.store.rounds()
        # Updates of a round that never closed were lost with that life's running sum, whatever
        # attempt they were for; the round runs again from attempt 0 and its updates count then.
        self.store.forget_updates_after(int(self.history[-1]["round"]) if self.history else -1)
        if not self.history:
            self._set_model(self.task.init_weights(self.config.seed), 0)
            return
        last = self.history[-1]
        weights, meta = self.checkpoints.load(int(last["round"]))
        self.round = int(last["round"])
        self.accuracy, self.loss = last.get("accuracy"), last.get("loss")
        self._stats_done = True
        self._set_model(weights, int(meta.get("version", last["model_version"])))
        # metrics.jsonl is a view of the records: rewrite it so that it matches them exactly.
        write_text_atomic(self.data_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        log.event("run.resumed", run=self.run_id, round=self.round, version=self.model_version)

    def _restore_strategy_state(self) -> OptState:
        """The server optimiser's state as of the restored round (fresh if the run starts now)."""
        saved = self.checkpoints.load_state(self.round) if self.history else None
        return state_from_tensors(*saved) if saved is not None else self.strategy.init(self.model)

    def _set_model(self, weights: Weights, version: int) -> None:
        self.model_version = version
        self.schema = schema_of(weights)
        meta = {"version": str(version), "round": str(self.round), "run_id": self.run_id,
                "task": self.config.task}
        # The model is held once: serialised into one buffer that is served as it is (memoryview slices
        # for Range requests), with ``self.model`` read-only arrays viewing it. A large model would
        # otherwise sit in memory twice (arrays and bytes), besides the round's running sum.
        parts = codec.encode_parts(weights, meta)
        blob = bytearray(sum(len(p) for p in parts))
        pos = 0
        for part in parts:
            blob[pos:pos + len(part)] = part
            pos += len(part)
        header = codec.parse_header(bytes(parts[0]))
        del parts
        view = memoryview(blob).toreadonly()
        self.model = codec.views(header, view[header.size:])
        self.model_bytes = view
        self.model_parts: list[bytes | memoryview] = [view]

    # --- notifications -------------------------------------------------------------------------
    def _notify(self, work: bool = False) -> None:
        """Wake the loop (something progressed) and, with ``work``, the long-polling workers too."""
        self._progress.set()
        self._progress = asyncio.Event()
        if work:
            self._work.set()
            self._work = asyncio.Event()

    def progress_event(self) -> asyncio.Event:
        """Set at the next change (a round opens or closes, an update or a worker arrives, the run ends).

        The dashboard pushes its events on it: take the event before reading the state, and no change
        made after the read can be missed."""
        return self._progress

    async def _wait_change(self, timeout: float, work: bool = False) -> None:
        event = self._work if work else self._progress
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

    # --- API: workers ----------------------------------------------------------------------------
    def register(self, worker_id: str | None, name: str) -> RegisterResponse:
        w = self.registry.register(worker_id, name)
        spec = parse_partition(self.config.partition)
        log.event("worker.registered", run=self.run_id, worker=w.worker_id, partition=w.partition, name=name)
        self._notify()
        return RegisterResponse(
            worker_id=w.worker_id, run_id=self.run_id, task=self.config.task,
            task_options=self.config.task_options_dict,
            partition=PartitionInfo(name=self.registry.partition_label(w), index=w.partition,
                                    count=self.config.workers, scheme=str(spec), seed=self.config.seed,
                                    val_fraction=self.config.val_fraction),
            poll_seconds=self.poll_seconds)

    def heartbeat(self, worker_ids: list[str]) -> int:
        """Mark workers as alive (a worker busy training sends these); returns how many are known."""
        known = 0
        for wid in worker_ids:
            if wid in self.registry.workers:
                self.registry.touch(wid)
                known += 1
        return known

    def task_for(self, w: WorkerState) -> TaskMessage:
        if self.state in ("finished", "failed"):
            return TaskMessage(kind="stop", reason=self.message or f"run {self.state}")
        rs = self.current
        if rs is None or rs.closed or w.worker_id not in rs.sampled or w.worker_id in rs.answered \
                or w.worker_id in rs.in_flight:
            return TaskMessage(kind="wait")
        params = None
        if rs.kind == "train":
            seed = int(np.random.SeedSequence([self.config.seed, rs.round, rs.attempt, w.partition])
                       .generate_state(1)[0])
            params = TrainParamsMsg(local_epochs=self.config.local_epochs, batch_size=self.config.batch_size,
                                    lr=self.config.lr, seed=seed, prox_mu=self.strategy.prox_mu)
        return TaskMessage(kind=rs.kind, round=rs.round, attempt=rs.attempt,
                           model_version=self.model_version, params=params)

    async def next_task(self, worker_id: str, wait: float) -> TaskMessage:
        """Long-poll: return as soon as there is something for this worker, or ``wait`` seconds passed."""
        w = self.registry.touch(worker_id)
        end = time.monotonic() + min(max(wait, 0.0), self.poll_seconds)
        w.polling += 1
        try:
            while True:
                msg = self.task_for(w)
                remaining = end - time.monotonic()
                if msg.kind != "wait" or remaining <= 0:
                    break
                await self._wait_change(remaining, work=True)
        finally:
            w.polling -= 1
            w.last_seen = time.monotonic()
        if msg.kind == "stop" and not w.stopped:
            w.stopped = True
            self._notify()
        return msg

    def model_download(self) -> tuple[int, memoryview]:
        """The model's version and safetensors bytes (read-only; serve slices of it, do not copy)."""
        return self.model_version, self.model_bytes

    def model_sent(self, nbytes: int) -> None:
        """Count a model body sent (not a 304) towards the open round and the metrics."""
        if self.current is not None and not self.current.closed:
            self.current.bytes_out += nbytes
        self.metrics.model_sent(nbytes)

    # --- API: updates ----------------------------------------------------------------------------
    def max_update_bytes(self) -> int:
        rs = self.current
        size = sum(s.nbytes for s in rs.schema) if rs is not None else sum(s.nbytes for s in self.schema)
        return size + HEADER_SLACK

    def check_update(self, meta: UpdateMeta, header: Header | None) -> RoundState:
        """The open round, if it can take this update (409 if not) and ``header`` fits its schema (422)."""
        self.registry.touch(meta.worker_id)
        rs = self.current
        problem = self._update_problem(meta, rs)
        if problem is not None:
            reason, message = problem
            raise RequestRejected(message, round=meta.round, worker=meta.worker_id, reason=reason)
        assert rs is not None
        if header is not None:
            codec.check_schema(header, rs.schema)
        return rs

    def begin_update(self, meta: UpdateMeta, header: Header) -> RoundState:
        """Check that the current round can take this update and reserve its slot; raise if not."""
        rs = self.check_update(meta, header)
        rs.in_flight.add(meta.worker_id)
        return rs

    def _update_problem(self, meta: UpdateMeta, rs: RoundState | None) -> tuple[str, str] | None:
        """Why the open round cannot take this update (HTTP 409) as (metrics reason, message), or None."""
        if rs is None or self.state != "running":
            return "stale", f"no round is open (run is {self.state}); update for round {meta.round} is not needed"
        if (meta.round, meta.attempt) != (rs.round, rs.attempt):
            return "stale", (f"update is for round {meta.round} attempt {meta.attempt}, but the open round is "
                    f"{rs.round} attempt {rs.attempt}")
        if rs.closed:
            return "stale", f"round {rs.round} has closed; update came too late"
        if meta.worker_id not in rs.sampled:
            return "not_sampled", f"worker {meta.worker_id} was not sampled for round {rs.round}"
        if meta.worker_id in rs.answered or meta.worker_id in rs.in_flight:
            return "duplicate", f"worker {meta.worker_id} already sent its update for round {rs.round}"
        return None

    def abort_update(self, rs: RoundState, worker_id: str) -> None:
        rs.in_flight.discard(worker_id)
        self._notify()

    async def commit_update(self, rs: RoundState, meta: UpdateMeta, weights: Weights, nbytes: int) -> None:
        """Check values and fold the update into the round's running sum (it may be modified in place)."""
        await _compute(nbytes, codec.check_finite, weights)
        await self.commit_checked(rs, meta, nbytes, lambda weight: rs.accumulator.add(weights, weight, True))

    async def commit_checked(self, rs: RoundState, meta: UpdateMeta, nbytes: int,
                             fold: Callable[[float], None]) -> None:
        """Fold an update whose values were checked already, with ``fold(weight)``, and account for it.

        ``fold`` runs in a thread for large updates; it must leave the sum untouched if it raises."""
        weight = float(meta.num_examples) if rs.kind == "train" else 1.0
        async with self._fold_lock:
            if rs.closed:
                raise RequestRejected(f"round {rs.round} closed while the update was arriving",
                                      round=rs.round, worker=meta.worker_id, reason="stale")
            await _compute(nbytes, fold, weight)
            self.store.record_update(rs.round, rs.attempt, meta.worker_id, meta.num_examples, meta.metrics)
            rs.answered[meta.worker_id] = (meta.num_examples, dict(meta.metrics))
            if "train_s" in meta.metrics and meta.worker_id in self.registry.workers:
                self.registry.workers[meta.worker_id].last_train_s = meta.metrics["train_s"]
            rs.bytes_in += nbytes
            rs.last_answer = time.monotonic()
        rs.in_flight.discard(meta.worker_id)
        self.metrics.update_accepted(rs.kind, nbytes)
        log.event("update.accepted", logging.DEBUG, run=self.run_id, round=rs.round, worker=meta.worker_id,
                  examples=meta.num_examples)
        self._notify()

    # --- API: views ------------------------------------------------------------------------------
    def status(self) -> Status:
        # Round, accuracy and loss of the last *recorded* round, so that status never runs ahead of
        # /v1/rounds, metrics.jsonl and the checkpoint (the new model exists a little before them).
        last = self.history[-1] if self.history else {}
        return Status(run_id=self.run_id, state=self.state, phase=self.phase, task=self.config.task,
                      round=int(last.get("round", 0)), rounds=self.config.rounds, model_version=self.model_version,
                      workers_registered=len(self.registry.workers), workers_live=len(self.registry.live()),
                      accuracy=last.get("accuracy"), loss=last.get("loss"), message=self.message)

    def workers_view(self) -> list[WorkerView]:
        now = time.monotonic()
        rs = self.current
        out = []
        for w in sorted(self.registry.workers.values(), key=lambda w: w.partition):
            busy = rs is not None and not rs.closed and w.worker_id in rs.sampled \
                and w.worker_id not in rs.answered
            status: Literal["idle", "training", "dead"] = (
                "dead" if not self.registry.alive(w) else "training" if busy else "idle")
            out.append(WorkerView(worker_id=w.worker_id, name=w.name, partition=self.registry.partition_label(w),
                                  status=status, last_seen_s=round(now - w.last_seen, 3),
                                  rounds_served=w.rounds_served, last_train_s=w.last_train_s))
        return out

    async def evaluate(self) -> EvalResult:
        model, version, rnd = self.model, self.model_version, self.round
        metrics = await asyncio.to_thread(self.task.evaluate, model, self._test)
        return EvalResult(round=rnd, model_version=version, loss=metrics["loss"], accuracy=metrics["accuracy"],
                          examples=len(self._test))

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            self.state = "running" if self.round > 0 else "waiting"
            if not self._stats_done and self.task.stats_schema() is not None:
                await self._statistics()
            while self.round < self.config.rounds and not self._target_reached():
                await self._train_round(self.round + 1)
            target = self.config.target_accuracy
            self._finish("finished", f"reached test accuracy {self.accuracy:.4f} (--target-accuracy {target:g}) "
                                     f"after {self.round} rounds" if self._target_reached() and target is not None
                         else f"{self.config.rounds} rounds done")
        except FedfleetError as exc:
            self._finish("failed", str(exc))
        except Exception as exc:  # a bug must still end the run visibly, not hang it
            logging.getLogger("fedfleet").exception("coordinator loop crashed")
            self._finish("failed", f"internal error: {exc!r}")
        await self._linger()

    def _target_reached(self) -> bool:
        target = self.config.target_accuracy
        return target is not None and self.accuracy is not None and self.accuracy >= target

    async def _wait_for_workers(self) -> list[str]:
        needed = self.config.needed_workers
        deadline = time.monotonic() + self.config.wait_timeout
        while True:
            live = self.registry.live()
            if len(live) >= needed:
                return [w.worker_id for w in live]
            if time.monotonic() >= deadline:
                raise RoundError(f"only {len(live)} of the {needed} workers needed were alive after waiting "
                                 f"{self.config.wait_timeout:g} s (--wait-timeout); run failed",
                                 round=self.round + 1)
            self.phase = f"waiting for workers ({len(live)}/{needed} live)"
            await self._wait_change(min(1.0, deadline - time.monotonic()))

    async def _open_and_wait(self, kind: Kind, rnd: int, base: Weights | None) -> RoundState:
        """Run attempts of round ``rnd`` until one reaches its quorum; raise after too many misses."""
        cfg = self.config
        schema = self.schema if kind == "train" else self.task.stats_schema()
        assert schema is not None
        for attempt in range(cfg.max_round_retries + 1):
            live = await self._wait_for_workers()
            self.state = "running"
            if kind == "stats":
                sampled = live
            else:
                sampled = sample(live, cfg.fraction, cfg.min_workers or 1, cfg.seed, rnd, attempt)
            acc = self.strategy.accumulator(schema, base) if base is not None else WeightedSum(schema)
            rs = new_round(rnd, attempt, kind, sampled, cfg.quorum, schema, acc, cfg.round_timeout)
            self.current = rs
            self.phase = "statistics" if kind == "stats" else "training"
            log.event("round.open", run=self.run_id, round=rnd, attempt=attempt, kind=kind,
                      sampled=len(sampled), needed=rs.needed)
            self._notify(work=True)
            reached = await self._await_answers(rs)
            self.metrics.attempt_closed(rs, reached)
            if reached:
                return rs
            log.event("round.missed_quorum", logging.WARNING, run=self.run_id, round=rnd, attempt=attempt,
                      answered=len(rs.answered), needed=rs.needed)
        raise RoundError(f"round {rnd} missed its quorum {cfg.max_round_retries + 1} times in a row "
                         f"(--max-round-retries {cfg.max_round_retries}): too few sampled workers answered "
                         f"within --round-timeout {cfg.round_timeout:g} s", round=rnd)

    async def _await_answers(self, rs: RoundState) -> bool:
        """Wait until the round can close; True if it reached its quorum."""
        try:
            while True:
                pending = rs.pending
                if not pending and not rs.in_flight:
                    return True
                reachable = [p for p in pending if p in rs.in_flight or self.registry.alive(self.registry.get(p))]
                if not reachable and not rs.in_flight:
                    # Everyone who has not answered is dead: waiting longer cannot help.
                    return len(rs.answered) >= rs.needed
                now = time.monotonic()
                if now >= rs.deadline:
                    return len(rs.answered) >= rs.needed
                await self._wait_change(min(1.0, rs.deadline - now))
        finally:
            rs.closed = True
            self._notify()

    async def _statistics(self) -> None:
        rs = await self._open_and_wait("stats", 0, None)
        assert isinstance(rs.accumulator, WeightedSum)  # statistics are always summed
        async with self._fold_lock:
            sums = rs.accumulator.sum()
        self._set_model(self.task.apply_stats(self.model, sums), self.model_version + 1)
        self._stats_done = True
        log.event("statistics.done", run=self.run_id, workers=len(rs.answered))

    async def _train_round(self, rnd: int) -> None:
        t0 = time.monotonic()
        rs = await self._open_and_wait("train", rnd, self.model)
        t_closed = time.monotonic()
        self.phase = "aggregating"
        async with self._fold_lock:
            delta = await asyncio.to_thread(self.strategy.aggregate, rs.accumulator, rnd)
            # The round is closed and aggregated: its sum (2× the model in float64), its reference to the
            # old model and its spare upload buffers are not needed while the new model is made.
            rs.accumulator.release()
            rs.pool.release()
        new, self.strategy_state = await asyncio.to_thread(
            self.strategy.apply, self.strategy_state, self.model, delta)
        del delta
        self.round = rnd
        self._set_model(new, self.model_version + 1)
        del new
        t_agg = time.monotonic()
        self.phase = "evaluating"
        metrics = await asyncio.to_thread(self.task.evaluate, self.model, self._test)
        self.accuracy, self.loss = float(metrics["accuracy"]), float(metrics["loss"])
        t_eval = time.monotonic()
        self.phase = "checkpointing"
        saved_state = state_to_tensors(self.strategy_state)
        state_parts = codec.encode_parts(*saved_state) if saved_state is not None else None
        await asyncio.to_thread(self.checkpoints.save, rnd, self.model_parts, state_parts)
        t_ckpt = time.monotonic()
        record: dict[str, Any] = {
            "round": rnd, "accuracy": self.accuracy, "loss": self.loss,
            "participants": len(rs.answered), "sampled": len(rs.sampled), "attempts": rs.attempt + 1,
            "seconds": t_ckpt - t0, "bytes_in": rs.bytes_in, "bytes_out": rs.bytes_out,
            "model_version": self.model_version,
            "timings": {"open": t_closed - rs.started, "wait_workers": rs.started - t0,
                        "aggregate": t_agg - t_closed, "evaluate": t_eval - t_agg,
                        "checkpoint": t_ckpt - t_eval},
            **rs.train_metrics(), **rs.federated_eval(),
        }
        self.store.record_round(record, list(rs.answered))
        for wid in rs.answered:
            if wid in self.registry.workers:
                self.registry.workers[wid].rounds_served += 1
        self.history.append(record)
        self.metrics.round_completed(record)
        with (self.data_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        log.event("round.closed", run=self.run_id, round=rnd, participants=len(rs.answered),
                  accuracy=self.accuracy, loss=self.loss, seconds=record["seconds"])
        self._notify()

    def _finish(self, state: State, message: str) -> None:
        self.state = state
        self.phase = "done"
        self.message = message
        self.current = None
        write_atomic(self.data_dir / "model.safetensors", self.model_parts)
        summary = self.summary()
        write_text_atomic(self.data_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.store.set_state(state, message)
        log.event(f"run.{state}", logging.INFO if state == "finished" else logging.ERROR,
                  run=self.run_id, message=message, accuracy=self.accuracy)
        self._notify(work=True)

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "state": self.state, "message": self.message, "task": self.config.task,
            "partition": self.config.partition, "workers": self.config.workers,
            "rounds": self.round, "rounds_planned": self.config.rounds,
            "final_accuracy": self.accuracy, "final_loss": self.loss,
            "seconds": time.monotonic() - self._started, "parameters": num_parameters(self.model),
            "model_version": self.model_version, "config": self.config.to_dict(),
            "round_timings": [{"round": r["round"], "seconds": r["seconds"], **r["timings"]}
                              for r in self.history],
        }

    async def _linger(self) -> None:
        """Keep answering polls until every live worker heard the run is over, or ``linger`` passed."""
        end = time.monotonic() + self.linger
        while time.monotonic() < end:
            if all(w.stopped for w in self.registry.live()):
                break
            await self._wait_change(min(0.5, end - time.monotonic()))
        self.done.set()


INLINE_BYTES = 1 << 20


async def _compute(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run numpy work on ``nbytes`` of data: in a thread when large, so transfers go on meanwhile (numpy
    releases the GIL); inline when small, where the hop to a thread would cost more than the work."""
    if nbytes >= INLINE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)
