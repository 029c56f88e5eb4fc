"""The coordinator's round loop, and the narrow API the HTTP layer drives it with.

The loop: wait for enough live workers → (the plan, agreed from every site's description of its data,
if the task has one: ``tasks.base.SiteTask``) → (statistics round, if the task has one) → for each round:
sample workers, open the round, wait until every sampled worker answered or the deadline passed,
aggregate, check, evaluate, checkpoint, record → finish and tell the workers to stop. ``stop`` ends it
early instead (a signal to the coordinator), resumable: the workers are not told to stop, since a
coordinator started again on the same data dir carries the run on with them.

What the outside may do: ``Engine.open`` (all the start-up I/O: the run folder, the state database, the
checkpoint to resume from), the worker commands (``register``, ``heartbeat``, ``next_instruction``,
``model_download``/``model_sent``), ``stop``, updates through ``intake`` (coordinator.intake, the only way into a
round), and views: ``snapshot()``, ``status()``, ``workers_view()``, ``rounds()``, ``model()``,
``progress_event()``. The round state, the registry and the history are the engine's own.

Everything here runs on the server's event loop; numpy work that takes long (folding an update,
evaluating, writing a checkpoint) goes to a thread so that transfers keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import tomllib
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedfleet import log
from fedfleet.config import RunConfig
from fedfleet.coordinator.intake import UpdateIntake
from fedfleet.coordinator.metrics import CoordinatorMetrics
from fedfleet.coordinator.privacy import PrivacyPlan, initial_model, plan_privacy, task_problem
from fedfleet.coordinator.registry import Registry, WorkerState
from fedfleet.coordinator.rounds import Kind, RoundState, new_round, round_lr, sample
from fedfleet.coordinator.secure import SecureAggregation, settings_of
from fedfleet.errors import ConfigError, FedfleetError, ProtocolError, RequestRejected, RoundError, TaskError
from fedfleet.partition import partition_name
from fedfleet.protocol import codec
from fedfleet.protocol.messages import (
    DescribeInstruction,
    EvalResult,
    Instruction,
    PartitionInfo,
    RegisterResponse,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    StatsInstruction,
    Status,
    StopInstruction,
    TrainInstruction,
    TrainParamsMsg,
    Waiting,
    WaitInstruction,
    WorkerView,
)
from fedfleet.secagg.server import MaskedSum, SecAggFailure
from fedfleet.storage.checkpoints import Checkpoints
from fedfleet.storage.records import (
    Confusion,
    RoundRecord,
    RoundTiming,
    RoundTimings,
    RunSummary,
    clean_worker_metrics,
    finite_or_none,
)
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import Store
from fedfleet.strategies import Strategy, make_strategy
from fedfleet.strategies.accumulate import Stack, WeightedSum
from fedfleet.strategies.privacy import poisson_sample, round_rng
from fedfleet.strategies.server_opt import OptState, state_from_tensors, state_to_tensors
from fedfleet.tasks import Task, check_ready, score_low, with_plan
from fedfleet.tasks.base import Plan, class_names, evaluate_with_confusion, has_plan, loads_sites, site_task
from fedfleet.types import Schema, Weights, all_finite, num_parameters, schema_of

State = Literal["waiting", "running", "finished", "failed", "stopped"]
ENDED: tuple[State, ...] = ("finished", "failed", "stopped")
WAIT_LOG_S = 10.0  # a round waiting for workers says so this often
MISSING_NAMED = 50  # workers a waiting round names at most (status, dashboard, log); the rest are counted
OUTLIER = 10.0  # an update whose norm is this many times the round's median is named when a round fails


@dataclass(frozen=True)
class OpenRound:
    round: int
    attempt: int
    kind: Kind
    sampled: int
    answered: int
    needed: int


@dataclass(frozen=True)
class Snapshot:
    """What views show of the engine at one moment (status, dashboard, metrics); a copy, not a handle."""

    run_id: str
    task: str
    partition: str
    strategy: str
    state: State
    phase: str
    message: str
    round: int  # last recorded training round
    current_round: int  # the training round in progress, else the last completed one
    rounds_planned: int
    model_version: int
    accuracy: float | None  # of the last recorded round
    loss: float | None
    workers_registered: int
    workers_live: int
    open_round: OpenRound | None
    last_participants: int | None
    dropped: int  # sampled workers silent in the last round attempt that closed
    waiting: Waiting | None  # set while the next round waits for workers
    dp_epsilon: float | None = None  # with --dp central: epsilon spent by the recorded rounds


@dataclass(frozen=True)
class Model:
    weights: Weights
    version: int
    round: int  # training rounds behind it


class Engine:
    """Build with ``Engine.open``; the constructor only assembles what ``open`` read."""

    def __init__(self, *, config: RunConfig, task: Task, run_dir: RunDir, store: Store, run_id: str,
                 registry: Registry, history: list[RoundRecord], test: Any | None, model: Weights, model_version: int,
                 strategy: Strategy, strategy_state: OptState | None, linger: float,
                 plan: Plan | None = None, descriptions: Mapping[str, dict[str, Any]] | None = None,
                 test_description: dict[str, Any] | None = None,
                 privacy: PrivacyPlan | None = None) -> None:
        self.config = config
        self.task = task
        # Where the workers' data comes from, and whether the run agrees a plan (and which, once it has).
        self.data_source = data_source(config, task)
        self._agrees_plan = has_plan(task)  # asked of every worker each round: once, not 10,000 times
        self.plan = plan
        self._descriptions: dict[str, dict[str, Any]] = dict(descriptions or {})
        self.run_dir = run_dir
        self.run_id = run_id
        self.linger = linger
        self._store = store
        self._checkpoints: Checkpoints = run_dir.checkpoints()
        self._registry = registry
        self._history = history
        self._privacy = privacy
        central = privacy is not None and not privacy.distributed
        self._strategy = dataclasses.replace(strategy, dp=privacy.mechanism) if central and privacy else strategy
        self.state: State = "running" if history else "waiting"
        self.phase = "starting"
        self.message = ""
        self.round = history[-1].round if history else 0  # last completed training round
        self.accuracy = history[-1].accuracy if history else None
        self.loss = history[-1].loss if history else None
        settings = settings_of(config)
        self._secure = None if settings is None else SecureAggregation(
            settings, run_id, config.seed, config.round_timeout,
            alive=lambda w: w in registry.workers and registry.alive(registry.workers[w]),
            notify=lambda work: self._notify(work=work), wait_change=self._wait_change,
            check_stopped=self._raise_if_stopped,
            dp=privacy.mechanism if privacy is not None and privacy.distributed else None,
            set_phase=lambda phase: setattr(self, "phase", phase))
        # Under central DP or secure aggregation the statistics round does not run (it would send each worker's
        # statistics in the clear): the task's public statistics are in the initial model already
        # (coordinator.privacy.initial_model).
        self._public = privacy is not None or self._secure is not None
        self._stats_done = bool(history) or self._public
        # A worker's label mix goes with its update in the clear: under differential privacy it would be a
        # release the accountant does not count, and under secure aggregation it would tell what the masks
        # hide (each worker's own data). The workers are asked for it only without either.
        self._report_labels = not self._public
        self._current: RoundState | None = None
        self._waiting: Waiting | None = None
        self._dropped = 0
        self._started = time.monotonic()
        self._loop: asyncio.Task[None] | None = None  # the task running ``run``, which ``stop`` cancels
        self.done = asyncio.Event()  # set when the run is over and the workers had time to hear it
        # Two broadcast events, so that N workers parked in long-polls are woken only when there may be
        # work for them (a round opens, the run ends), not by each of the N answers of a round: that
        # would be N² wake-ups per round.
        self._work = asyncio.Event()
        self._progress = asyncio.Event()
        # What each long-poll waits on, by worker: a round that samples 100 of 1,000 workers wakes those 100,
        # not all 1,000 to find nothing for 900 of them.
        self._wake: dict[str, asyncio.Event] = {}
        self.poll_seconds = max(1.0, min(20.0, config.worker_timeout / 2))
        # A worker busy with a round (downloading, training, uploading) holds no long-poll, and its process
        # heartbeats for it every max(0.5, poll_seconds / 2) seconds (worker.agent's heartbeat thread). Two
        # beats missed and a second more is no slow machine but a stopped worker: the views say "silent"
        # then, well before --worker-timeout makes it dead (30 s by default: silent after 16 s).
        self.silent_after = 2 * max(0.5, self.poll_seconds / 2) + 1.0
        self._set_model(model, model_version)
        self._strategy_state = strategy_state if strategy_state is not None else strategy.init(self._model)
        # The reference a site's description is checked against before there is a first accepted one: the
        # coordinator's own test data, described the same way (it never goes into the plan).
        self._test_description = test_description
        self._test = test
        # --server-val: examples of the pool no worker trains on, scored each round beside the test set; derived
        # from the seed (as the workers derive what they leave out), so a resumed run has the same ones.
        self._val = load_server_val(config, task)
        self.metrics = CoordinatorMetrics(self.snapshot)
        self.intake = UpdateIntake(task=task, store=store, registry=registry, metrics=self.metrics,
                                   model_schema=lambda: self.schema, notify=self._notify, run_id=run_id,
                                   max_update_norm=config.max_update_norm,
                                   clip=privacy.mechanism.clip if privacy is not None and central else None,
                                   secure=self._secure)

    # --- start-up ----------------------------------------------------------------------------
    @classmethod
    def open(cls, config: RunConfig, task: Task, data_dir: Path, linger: float = 10.0) -> Engine:
        """Create the run in ``data_dir``, or pick up the one there (its config must match) from the last
        round recorded in its state database, which is the truth after a crash."""
        check_ready(task)
        check_data_source(config, task)
        privacy = plan_privacy(config, task)
        if config.secure_aggregation == "on":
            problem = task_problem(task)
            if problem is not None:
                raise ConfigError(f"task {config.task!r} cannot be trained with --secure-aggregation: {problem}",
                                  option="secure_aggregation")
        public = privacy is not None or config.secure_aggregation == "on"
        run_dir = RunDir(data_dir)
        store = run_dir.open_store()
        run_id = _open_run(store, run_dir, config)
        history = store.rounds()
        # Updates of a round that never closed were lost with that life's running sum, whatever
        # attempt they were for; the round runs again from attempt 0 and its updates count then.
        store.forget_updates_after(history[-1].round if history else -1)
        strategy = make_strategy(config.strategy, config.strategy_options_dict)
        checkpoints = run_dir.checkpoints()
        state: OptState | None = None
        unplanned = task
        plan = store.plan() if has_plan(task) else None
        if plan is not None:
            task = with_plan(task, plan)
        if history:
            # A round's checkpoint is written before its record, so the recorded round always has one;
            # a checkpoint newer than the last record belongs to a round that is simply run again.
            last = history[-1]
            model, meta = checkpoints.load(last.round)
            version = int(meta.get("version", last.model_version))
            saved = checkpoints.load_state(last.round)
            state = state_from_tensors(*saved) if saved is not None else None
            # metrics.jsonl is a view of the records: rewrite it so that it matches them exactly.
            run_dir.write_rounds(history)
            log.event("run.resumed", run=run_id, round=last.round, version=version)
        elif has_plan(task) and plan is None:
            model, version = {}, 0  # the model's shape follows from the plan, agreed once the workers described
        else:
            model, version = initial_model(task, config.seed, public), 0
        registry = Registry(store, config.workers, config.worker_timeout, store.workers())
        # A task that agrees a plan reads its test set only once it has one (what its columns mean is known
        # then); --test-data is described now, to check the sites' descriptions against.
        test = load_test(config, unplanned if plan is None else task) \
            if plan is not None or not has_plan(task) or config.test_data is not None else None
        test_description = None
        if has_plan(task) and plan is None and test is not None:
            test_description, test = site_task(task).describe(test), None
        return cls(config=config, task=task, run_dir=run_dir, store=store, run_id=run_id, registry=registry,
                   history=history, test=test, model=model, model_version=version, strategy=strategy,
                   strategy_state=state, linger=linger, plan=plan, test_description=test_description,
                   descriptions=store.descriptions() if has_plan(task) else None, privacy=privacy)

    def close(self) -> None:
        self._store.close()

    def _set_model(self, weights: Weights, version: int) -> None:
        self.model_version = version
        self.schema: Schema = schema_of(weights)
        meta = {"version": str(version), "round": str(self.round), "run_id": self.run_id,
                "task": self.config.task}
        # The model is held once: serialised into one buffer that is served as it is (memoryview slices
        # for Range requests), with ``self._model`` read-only arrays viewing it. A large model would
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
        self._model = codec.views(header, view[header.size:])
        self._model_bytes = view

    # --- notifications -------------------------------------------------------------------------
    def _notify(self, work: bool = False, only: Collection[str] | None = None) -> None:
        """Wake the loop (something progressed) and, with ``work``, the long-polling workers too: those in
        ``only`` (a round opening for its sample), else all of them (the run ends, a plan is agreed)."""
        self._progress.set()
        self._progress = asyncio.Event()
        if work:
            self._work.set()
            self._work = asyncio.Event()
            if only is None:
                woken, self._wake = self._wake, {}
                for event in woken.values():
                    event.set()
            else:
                for worker_id in only:
                    waiting = self._wake.pop(worker_id, None)
                    if waiting is not None:
                        waiting.set()

    def work_event(self) -> asyncio.Event:
        """Set when there may be new work for the workers (a round attempt opens, the run ends): what
        ``work()`` returns changes at these only. Take it before calling ``work()``."""
        return self._work

    def progress_event(self) -> asyncio.Event:
        """Set at the next change (a round opens or closes, an update or a worker arrives, the run ends).

        Take the event before reading the state, and no change made after the read can be missed."""
        return self._progress

    async def _wait_change(self, timeout: float, work: bool = False) -> None:
        event = self._work if work else self._progress
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

    # --- commands: clients simulated in this process (fedfleet simulate) -------------------------
    def add_residents(self, count: int, prefix: str) -> list[tuple[str, int]]:
        """Make the run's clients ``count`` residents of this process: the workers already registered (a
        resumed run's) and new ones named ``prefix-K`` on the free partitions, all registered in one
        transaction. A resident is alive while the engine runs, as if it held a long-poll open: the loop
        samples it and never waits for it to come back. Returns (worker id, partition) of each."""
        known = list(self._registry.workers.values())
        new = self._registry.register_many([f"{prefix}-{len(known) + i}" for i in range(max(0, count - len(known)))])
        residents = sorted(known + new, key=lambda w: w.partition)
        for w in residents:
            w.polling += 1
        log.event("workers.resident", run=self.run_id, count=len(residents), new=len(new))
        self._notify()
        return [(w.worker_id, w.partition) for w in residents]

    def work(self) -> list[tuple[str, TrainInstruction | StatsInstruction]]:
        """Each sampled worker of the open round attempt that has work now, with its instruction: what the
        long-polls of those workers would return. O(sampled), however many workers are registered."""
        rs = self._current
        if rs is None or rs.closed:
            return []
        out: list[tuple[str, TrainInstruction | StatsInstruction]] = []
        for wid in rs.pending:
            w = self._registry.workers.get(wid)
            if w is None or wid in rs.in_flight or wid in rs.declined:
                continue
            msg = self._instruction_for(w)
            if isinstance(msg, TrainInstruction | StatsInstruction):
                out.append((wid, msg))
        return out

    def is_open(self, round: int, attempt: int) -> bool:
        """Whether attempt ``attempt`` of round ``round`` is open and still takes answers."""
        rs = self._current
        return rs is not None and not rs.closed and (rs.round, rs.attempt) == (round, attempt)

    def decline(self, worker_id: str, round: int, attempt: int, reason: str) -> bool:
        """``worker_id`` will not answer round ``round`` attempt ``attempt`` (its fit diverged, say): the round
        stops waiting for it, and closes as soon as everyone else has answered instead of at its deadline.
        Returns False, doing nothing, if that attempt is not open or the worker is not one it waits for."""
        rs = self._current
        if rs is None or rs.closed or (rs.round, rs.attempt) != (round, attempt) or worker_id not in rs.in_sample \
                or worker_id in rs.answered or worker_id in rs.in_flight:
            return False
        rs.declined.add(worker_id)
        log.event("worker.declined", logging.WARNING, run=self.run_id, round=round, attempt=attempt, worker=worker_id,
                  reason=reason)
        self._notify()
        return True

    def partition_info(self, partition: int) -> PartitionInfo:
        """What a worker on ``partition`` is told of it at registration."""
        return PartitionInfo(name=partition_name(partition, self.config.workers), index=partition,
                             count=self.config.workers, scheme=str(self.config.partition_spec),
                             seed=self.config.seed, val_fraction=self.config.val_fraction)

    # --- commands: workers ---------------------------------------------------------------------
    def is_registered(self, worker_id: str) -> bool:
        return worker_id in self._registry.workers

    def register(self, worker_id: str | None, name: str, source: str = "partitions") -> RegisterResponse:
        if source != self.data_source:
            self.metrics.request_refused("data_source")
            raise ProtocolError(_mixed_message(self.data_source, self.config.task), status=409,
                                reason="data_source")
        w = self._registry.register(worker_id, name)
        spec = self.config.partition_spec
        log.event("worker.registered", run=self.run_id, worker=w.worker_id, partition=w.partition, name=name)
        self._notify()
        return RegisterResponse(
            worker_id=w.worker_id, run_id=self.run_id, task=self.config.task,
            task_options=self.config.task_options_dict,
            partition=PartitionInfo(name=self._registry.partition_label(w), index=w.partition,
                                    count=self.config.workers, scheme=str(spec), seed=self.config.seed,
                                    val_fraction=self.config.val_fraction),
            poll_seconds=self.poll_seconds)

    def heartbeat(self, worker_ids: list[str]) -> int:
        """Mark workers as alive (a worker busy training sends these); returns how many are known."""
        known = 0
        for wid in worker_ids:
            if wid in self._registry.workers:
                self._registry.touch(wid)
                known += 1
        return known

    def describe(self, worker_id: str, description: dict[str, Any]) -> int:
        """Take a worker's description of its data (checked by the task; 422 naming what is wrong), and
        return how many workers have described theirs. The first accepted one (or the coordinator's own
        test data) is what the others are checked against, so every site's data has the same columns.
        Once the plan is agreed, a worker that joins later is still checked, and never changes it."""
        if not has_plan(self.task):
            raise RequestRejected(f"task {self.config.task!r} agrees no plan: nothing to describe", status=409)
        if worker_id not in self._registry.workers:
            raise RequestRejected(f"unknown worker {worker_id!r}: register first", status=404)
        reference = self._test_description if self._test_description is not None \
            else next((d for wid, d in self._descriptions.items() if wid != worker_id), None)
        try:
            # Stored as strict JSON: NaN or Infinity (which the request's JSON parser admits) is refused here.
            json.dumps(description, allow_nan=False)
            problem = site_task(self.task).check_description(description, reference)
        except Exception as exc:  # the description is untrusted: a checker that raises refuses it, never a 500
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None and self.plan is not None:
            problem = self._check_against_plan(description)
        if problem is not None:
            self.metrics.request_refused("bad_description")
            log.event("worker.refused", logging.WARNING, run=self.run_id, worker=worker_id, reason=problem)
            # The run cannot use this worker's data: it gives its partition back, for a site whose data fits.
            self._descriptions.pop(worker_id, None)
            self._registry.remove(worker_id)
            self._notify()
            raise ProtocolError(f"the description of {worker_id}'s data was refused: {problem}", status=422,
                                reason="bad_description")
        self._store.put_description(worker_id, description)
        self._descriptions[worker_id] = description
        self._registry.touch(worker_id)
        log.event("worker.described", run=self.run_id, worker=worker_id, described=len(self._descriptions))
        self._notify()
        return len(self._descriptions)

    def leave(self, worker_id: str) -> None:
        """A worker that cannot take part (its data could not be read) gives its partition back at once,
        instead of holding it until --worker-timeout. One that has served rounds stays on record."""
        w = self._registry.get(worker_id)
        if w.rounds_served:
            raise RequestRejected(f"worker {worker_id!r} has served {w.rounds_served} rounds: it stays on record, "
                                  "and counts as dead after --worker-timeout", status=409)
        self._descriptions.pop(worker_id, None)
        self._registry.remove(worker_id)
        log.event("worker.left", run=self.run_id, worker=worker_id)
        self._notify()

    def _check_against_plan(self, description: dict[str, Any]) -> str | None:
        """A late site's description, checked against the agreed plan: by the task's ``check_against_plan``
        if it has one (e.g. a class the model has no output for), and by making a plan with it in (if the
        task cannot, the data does not fit the run). The run's plan itself stays as agreed."""
        against = getattr(self.task, "check_against_plan", None)
        try:
            if callable(against) and self.plan is not None:
                problem: str | None = against(description, self.plan)
                if problem is not None:
                    return problem
            site_task(self.task).make_plan([*self._descriptions.values(), description])
        except TaskError as exc:
            return str(exc)
        return None

    def plan_view(self) -> Plan | None:
        return self.plan

    def _instruction_for(self, w: WorkerState) -> Instruction:
        if self.state in ("finished", "failed"):
            return StopInstruction(reason=self.message or f"run {self.state}")
        if has_plan(self.task) and w.worker_id not in self._descriptions:
            return DescribeInstruction()
        rs = self._current
        if self._secure is not None and rs is not None and rs.kind == "train":
            step = self._secure.instruction(w.worker_id)
            if step is not None:
                return step
        if rs is None or rs.closed or w.worker_id not in rs.in_sample or w.worker_id in rs.answered \
                or w.worker_id in rs.declined \
                or w.worker_id in rs.in_flight:
            return WaitInstruction()
        if rs.kind == "stats":
            return StatsInstruction(round=rs.round, attempt=rs.attempt)
        context = None
        if self._secure is not None:
            context = self._secure.train_context(w.worker_id)
            if context is None:  # its keys or shares are not in yet, or it is out of this attempt
                return WaitInstruction()
        seed = int(np.random.SeedSequence([self.config.seed, rs.round, rs.attempt, w.partition]).generate_state(1)[0])
        params = TrainParamsMsg(local_epochs=self.config.local_epochs, batch_size=self.config.batch_size,
                                lr=round_lr(self.config.lr, self.config.lr_decay, rs.round), seed=seed,
                                prox_mu=self._strategy.prox_mu,
                                report_labels=self._report_labels)
        return TrainInstruction(round=rs.round, attempt=rs.attempt, model_version=self.model_version, params=params,
                                secagg=context)

    async def next_instruction(self, worker_id: str, wait: float) -> Instruction:
        """Long-poll: return as soon as there is something for this worker, or ``wait`` seconds passed."""
        w = self._registry.touch(worker_id)
        end = time.monotonic() + min(max(wait, 0.0), self.poll_seconds)
        w.polling += 1
        try:
            while True:
                msg = self._instruction_for(w)
                remaining = end - time.monotonic()
                # A stopped coordinator is about to go: let the poll end so the server can close at once.
                if not isinstance(msg, WaitInstruction) or remaining <= 0 or self.state == "stopped":
                    break
                # Taken after reading the state with no await between: no wake-up for it can be missed.
                event = self._wake.get(worker_id)
                if event is None:
                    event = self._wake[worker_id] = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
        finally:
            w.polling -= 1
            w.last_seen = time.monotonic()
        if isinstance(msg, StopInstruction) and not w.stopped:
            w.stopped = True
            self._notify()
        return msg

    def secagg_keys(self, body: SecAggKeys, nbytes: int) -> str:
        """Take a worker's keys for the open securely aggregated round attempt; returns the protocol's phase."""
        return self._secure_for(body.worker_id).take_keys(body, nbytes)

    def secagg_shares(self, body: SecAggShares, nbytes: int) -> str:
        return self._secure_for(body.worker_id).take_shares(body, nbytes)

    def secagg_reveal(self, body: SecAggReveal, nbytes: int) -> str:
        return self._secure_for(body.worker_id).take_reveal(body, nbytes)

    def _secure_for(self, worker_id: str) -> SecureAggregation:
        if self._secure is None:
            raise RequestRejected("this run does not use secure aggregation", status=409)
        if worker_id not in self._registry.workers:
            raise RequestRejected(f"unknown worker {worker_id!r}: register first", status=404)
        self._registry.touch(worker_id)
        return self._secure

    def model_download(self) -> tuple[int, memoryview]:
        """The model's version and safetensors bytes (read-only; serve slices of it, do not copy)."""
        return self.model_version, self._model_bytes

    def model_sent(self, nbytes: int) -> None:
        """Count a model body sent (not a 304) towards the open round and the metrics."""
        if self._current is not None and not self._current.closed:
            self._current.bytes_out += nbytes
        self.metrics.model_sent(nbytes)

    # --- views ---------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        rs = self._current
        open_round = None
        if rs is not None and not rs.closed:
            open_round = OpenRound(round=rs.round, attempt=rs.attempt, kind=rs.kind, sampled=len(rs.sampled),
                                   answered=len(rs.answered), needed=rs.needed)
        # Round, accuracy and loss of the last *recorded* round, so that status never runs ahead of
        # /v1/rounds, metrics.jsonl and the checkpoint (the new model exists a little before them).
        last = self._history[-1] if self._history else None
        return Snapshot(
            run_id=self.run_id, task=self.config.task, partition=self.config.partition,
            strategy=self.config.strategy, state=self.state, phase=self.phase, message=self.message,
            round=last.round if last else 0,
            current_round=max(self.round, rs.round if rs is not None and rs.kind == "train" else 0),
            rounds_planned=self.config.rounds, model_version=self.model_version,
            accuracy=last.accuracy if last else None, loss=last.loss if last else None,
            workers_registered=len(self._registry.workers), workers_live=self._registry.count_live(),
            open_round=open_round, last_participants=last.participants if last else None,
            dropped=self._dropped, waiting=self._waiting,
            dp_epsilon=None if self._privacy is None else last.dp_epsilon if last is not None else 0.0)

    def status(self) -> Status:
        s = self.snapshot()
        return Status(run_id=s.run_id, state=s.state, phase=s.phase, task=s.task, round=s.round,
                      rounds=s.rounds_planned, model_version=s.model_version, workers_registered=s.workers_registered,
                      workers_live=s.workers_live, accuracy=s.accuracy, loss=s.loss, message=s.message,
                      waiting=s.waiting)

    def workers_view(self, offset: int = 0, limit: int | None = None) -> list[WorkerView]:
        """The registered workers by partition, from ``offset``, at most ``limit`` of them (None: all)."""
        now = time.monotonic()
        rs = self._current
        out = []
        ordered = sorted(self._registry.workers.values(), key=lambda w: w.partition)
        for w in ordered[offset:None if limit is None else offset + limit]:
            busy = rs is not None and not rs.closed and w.worker_id in rs.in_sample \
                and w.worker_id not in rs.answered
            status: Literal["idle", "training", "silent", "dead"] = (
                "dead" if not self._registry.alive(w)
                else "silent" if busy and w.polling == 0 and now - w.last_seen > self.silent_after
                else "training" if busy else "idle")
            out.append(WorkerView(worker_id=w.worker_id, name=w.name, partition=self._registry.partition_label(w),
                                  status=status, last_seen_s=round(now - w.last_seen, 3),
                                  rounds_served=w.rounds_served, last_train_s=w.last_train_s))
        return out

    def workers_registered(self) -> int:
        return len(self._registry.workers)

    def rounds(self) -> list[RoundRecord]:
        """The records of the completed rounds (a new list; the records are immutable)."""
        return list(self._history)

    def model(self) -> Model:
        return Model(self._model, self.model_version, self.round)

    async def evaluate(self) -> EvalResult:
        model, version, rnd, test = self._model, self.model_version, self.round, self._test
        if test is None:
            raise RequestRejected("this run has no held-out test set (a site-data run without --test-data, or "
                                  "one still agreeing its plan): it is scored by federated evaluation only",
                                  status=409)
        metrics = await asyncio.to_thread(self.task.evaluate, model, test)
        return EvalResult(round=rnd, model_version=version, loss=metrics["loss"], accuracy=metrics["accuracy"],
                          examples=len(test))

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = asyncio.current_task()
        try:
            if has_plan(self.task) and self.plan is None:
                await self._agree_plan()
            if not self._stats_done and self.task.stats_schema() is not None:
                await self._statistics()
            budget = None
            while self.round < self.config.rounds and not self._target_reached():
                budget = self._privacy.budget_message(self.round) if self._privacy is not None else None
                if budget is not None:
                    break
                await self._train_round(self.round + 1)
            target = self.config.target_accuracy
            self._finish("finished", budget if budget is not None
                         else f"reached test accuracy {self.accuracy:.4f} (--target-accuracy {target:g}) "
                              f"after {self.round} rounds" if self._target_reached() and target is not None
                         else f"{self.config.rounds} rounds done")
        except FedfleetError as exc:
            self._finish("failed", str(exc))
        except Exception as exc:  # a bug must still end the run visibly, not hang it
            logging.getLogger("fedfleet").exception("coordinator loop crashed")
            self._finish("failed", f"internal error: {exc!r}")
        await self._linger()

    def _raise_if_stopped(self) -> None:
        """End the loop (CancelledError) once ``stop`` has ended the run. ``stop`` cancels the loop, but on
        Python 3.11 ``asyncio.wait_for`` can swallow a cancellation that arrives as the awaited event is set
        (gh-86296), and the loop would go on: run rounds the summary says were not, record a round it says was
        lost (and, under central DP, release a noised model after the budget was written down)."""
        if self.state == "stopped":
            raise asyncio.CancelledError

    def _target_reached(self) -> bool:
        target = self.config.target_accuracy
        return target is not None and self.accuracy is not None and self.accuracy >= target

    async def _wait_for_workers(self, excluded: set[str]) -> list[str]:
        """The live workers, once there are enough of them (``RunConfig.needed_workers``) to open a round;
        while waiting, ``snapshot().waiting`` says for whom, and a log line every ``WAIT_LOG_S``.

        In a run that agrees a plan, only workers whose description was accepted count: one that has
        not described its data yet (or was refused) cannot be sampled."""
        # Workers excluded from this round (their update made the aggregate non-finite) are not waited for.
        needed = max(1, self.config.needed_workers(self.round) - len(excluded))
        start = time.monotonic()
        deadline = start + self.config.wait_timeout
        fails_at = time.time() + self.config.wait_timeout
        next_log = start + WAIT_LOG_S
        missing: list[str] = []
        listed = -math.inf  # when ``missing`` was last listed
        try:
            while True:
                alive = self._registry.live()
                live = [w.worker_id for w in alive if w.worker_id not in excluded and self._ready(w.worker_id)] \
                    if excluded or self._agrees_plan else [w.worker_id for w in alive]
                if len(live) >= needed:
                    return live
                now = time.monotonic()
                # Listed at most once a second: every registration wakes this loop, and the list is O(N).
                if now - listed >= 1.0 or now >= deadline or now >= next_log:
                    missing, listed = self._missing(excluded), now
                if now >= deadline:
                    raise RoundError(f"only {len(live)} of the {needed} workers needed were alive after waiting "
                                     f"{self.config.wait_timeout:g} s (--wait-timeout); run failed. Missing: "
                                     f"{', '.join(missing)}", round=self.round + 1)
                self._waiting = Waiting(waiting_for=missing, live=len(live), needed=needed, fails_at=fails_at)
                self.phase = f"waiting for workers ({len(live)}/{needed} live)"
                if now >= next_log:
                    log.event("round.waiting", logging.WARNING, run=self.run_id, round=self.round + 1,
                              live=len(live), needed=needed, missing="; ".join(missing),
                              fails_in_s=round(deadline - now))
                    next_log = now + WAIT_LOG_S
                await self._wait_change(min(1.0, deadline - now))
                self._raise_if_stopped()
        finally:
            self._waiting = None

    def _live(self, worker_id: str) -> bool:
        """Whether a sampled worker may still answer: registered and alive. One whose partition a new worker
        took over (it was dead for --worker-timeout) is gone from the registry, and will not."""
        w = self._registry.workers.get(worker_id)
        return w is not None and self._registry.alive(w)

    def _ready(self, worker_id: str) -> bool:
        return not self._agrees_plan or worker_id in self._descriptions

    def _missing(self, excluded: set[str]) -> list[str]:
        """Who a round waits for: registered workers gone quiet (or, in a run that agrees a plan, yet to
        describe their data), and partitions nobody has joined for. At most ``MISSING_NAMED`` by name, then
        how many more: status, the dashboard and the log line carry this list."""
        out = [(f"{w.worker_id} ({w.name})" if w.name else w.worker_id)
               + (" (no description of its data yet)" if self._registry.alive(w) else "")
               for w in sorted(self._registry.workers.values(), key=lambda w: w.partition)
               if w.worker_id not in excluded and (not self._registry.alive(w) or not self._ready(w.worker_id))]
        if len(out) > MISSING_NAMED:
            out[MISSING_NAMED:] = [f"{len(out) - MISSING_NAMED} more registered workers"]
        unjoined = self.config.workers - len(self._registry.workers)
        if unjoined > 0:
            out.append(f"{unjoined} partition{'s' if unjoined > 1 else ''} with no worker yet")
        return out

    async def _open_and_wait(self, kind: Kind, rnd: int, first_attempt: int, excluded: set[str]) -> RoundState:
        """Run attempts of round ``rnd`` until one reaches its quorum; raise after too many misses."""
        cfg = self.config
        schema = self.schema if kind == "train" else self.task.stats_schema()
        if schema is None:
            raise TaskError(f"task {cfg.task!r} has no statistics schema but a statistics round was started")
        secure = self._secure if kind == "train" else None
        failure = ""  # why the last attempt of a securely aggregated round failed
        for attempt in range(first_attempt, first_attempt + cfg.max_round_retries + 1):
            live = await self._wait_for_workers(excluded)
            self.state = "running"
            if kind == "stats":
                sampled = live
            elif self._privacy is not None:
                # Poisson sampling at rate q with secret randomness, as the accountant assumes: a fixed-size
                # sample (or one an observer could predict from --seed) would not give its amplification.
                rng = round_rng(self._privacy.seed, rnd, attempt, 0)
                sampled = poisson_sample(live, self._privacy.sample_rate, rng)
            else:
                # Secure aggregation of fewer than three would let each read the others' update off the sum.
                at_least = max(cfg.min_workers or 1, 3 if secure is not None else 1)
                sampled = sample(live, cfg.fraction, at_least, cfg.seed, rnd, attempt)
            arrives = schema
            acc: WeightedSum | Stack | MaskedSum
            if secure is not None:
                arrives, acc = secure.accumulator(schema)
            elif kind == "train":
                acc = self._strategy.accumulator(schema, self._model)
            else:
                acc = WeightedSum(schema)
            rs = new_round(rnd, attempt, kind, sampled, cfg.quorum, arrives, acc, cfg.round_timeout)
            self._current = rs
            self.intake.round = rs
            self.phase = "statistics" if kind == "stats" else "training"
            log.event("round.open", run=self.run_id, round=rnd, attempt=attempt, kind=kind,
                      sampled=len(sampled), needed=rs.needed)
            self._notify(work=True, only=sampled)
            try:
                if secure is not None:
                    await secure.setup(rs, schema)
                reached = await self._await_answers(rs)
                if reached and secure is not None:
                    await secure.finish(rs)
            except SecAggFailure as exc:
                # Too few workers in a phase, or a secret that would not reconstruct: the attempt is lost and
                # the round runs again with fresh keys, without a dealer to blame.
                failure = str(exc)
                excluded |= exc.culprits
                rs.closed = True
                self._dropped = len(rs.pending)
                self.metrics.attempt_closed(False)
                self.metrics.secagg_failed()
                log.event("secagg.failed", logging.WARNING, run=self.run_id, round=rnd, attempt=attempt,
                          reason=failure, excluded=", ".join(sorted(exc.culprits)) or None)
                self._notify(work=True)
                continue
            self._dropped = len(rs.pending)
            self.metrics.attempt_closed(reached)
            if reached:
                return rs
            log.event("round.missed_quorum", logging.WARNING, run=self.run_id, round=rnd, attempt=attempt,
                      answered=len(rs.answered), needed=rs.needed)
        if failure:
            raise RoundError(f"round {rnd} failed {cfg.max_round_retries + 1} times in a row (--max-round-retries "
                             f"{cfg.max_round_retries}); the last: {failure}", round=rnd)
        raise RoundError(f"round {rnd} missed its quorum {cfg.max_round_retries + 1} times in a row "
                         f"(--max-round-retries {cfg.max_round_retries}): too few sampled workers answered "
                         f"within --round-timeout {cfg.round_timeout:g} s", round=rnd)

    async def _await_answers(self, rs: RoundState) -> bool:
        """Wait until the round can close; True if it reached its quorum."""
        scanned = -math.inf  # when the silent workers were last looked at
        try:
            while True:
                # Every answer wakes this loop: what runs on each wake is O(1), not O(sampled), or a round of
                # 10,000 clients would cost 10,000² steps.
                if len(rs.answered) == len(rs.sampled) and not rs.in_flight:
                    return True
                if not rs.in_flight and len(rs.answered) + len(rs.declined - rs.answered.keys()) >= len(rs.sampled):
                    return len(rs.answered) >= rs.needed  # the rest said they will not answer
                now = time.monotonic()
                if now - scanned >= 1.0 and not rs.in_flight:
                    # Everyone who has not answered dead: waiting longer cannot help. Looked at once a second at
                    # most (a worker is dead only after --worker-timeout seconds of silence anyway).
                    scanned = now
                    if not any(p not in rs.declined and self._live(p) for p in rs.pending):
                        return len(rs.answered) >= rs.needed
                if now >= rs.deadline:
                    return len(rs.answered) >= rs.needed
                await self._wait_change(min(1.0, rs.deadline - now))
                self._raise_if_stopped()
        finally:
            rs.closed = True
            self._notify()

    async def _agree_plan(self) -> None:
        """Wait until enough workers described their data, then agree the plan from their descriptions,
        store it, and set up the task, the model and the test set with it. A plan the task cannot make
        (e.g. a label with one class over every site) ends the run with the task's message."""
        self.phase = "describing the data"
        live = await self._wait_for_workers(set())
        descriptions = [self._descriptions[w] for w in live]
        plan = await asyncio.to_thread(site_task(self.task).make_plan, descriptions)
        against = getattr(self.task, "check_against_plan", None)
        if self._test_description is not None and callable(against):
            # The test set never shapes the plan; one the plan's model cannot score (an image class no site
            # has) would fail every round's evaluation: say so now, once.
            problem = against(self._test_description, plan)
            if problem is not None:
                raise TaskError(f"--test-data {self.config.test_data} does not fit the plan the sites agreed: "
                                f"{problem}")
        planned = with_plan(self.task, plan)
        model = planned.init_weights(self.config.seed)
        test = load_test(self.config, planned)
        self._store.set_plan(plan)
        self.run_dir.write_plan(plan)
        self.plan, self.task, self.intake.task, self._test = plan, planned, planned, test
        self._set_model(model, self.model_version)
        self._strategy_state = self._strategy.init(self._model)
        log.event("plan.agreed", run=self.run_id, sites=len(descriptions), parameters=num_parameters(model))
        self._notify(work=True)

    async def _statistics(self) -> None:
        excluded: set[str] = set()
        attempt = 0
        for _ in range(self.config.max_round_retries + 1):
            rs = await self._open_and_wait("stats", 0, attempt, excluded)
            attempt = rs.attempt + 1
            acc = rs.accumulator
            if not isinstance(acc, WeightedSum):  # statistics are always summed (see _open_and_wait)
                raise TypeError(f"statistics round with a {type(acc).__name__} accumulator")
            async with self.intake.lock:
                sums = acc.sum()
            try:
                new = self.task.apply_stats(self._model, sums)
                bad = all_finite(new)
            except TaskError as exc:
                bad = str(exc)
            if bad is None:
                self._set_model(new, self.model_version + 1)
                self._stats_done = True
                log.event("statistics.done", run=self.run_id, workers=len(rs.answered))
                return
            # Each report passed the task's range check, so no single one is to blame: run it again.
            self.metrics.round_not_applied("stats")
            log.event("statistics.not_applied", logging.ERROR, run=self.run_id, attempt=rs.attempt,
                      reason=f"the combined statistics make {bad!r} non-finite")
        raise RoundError("the statistics round gave a non-finite model every time it ran", round=0)

    async def _train_round(self, rnd: int) -> None:
        t0 = time.monotonic()
        clip = self._privacy.clip_for(self._history) if self._privacy is not None else None
        if self._privacy is not None and self._privacy.adaptive is not None and clip is not None:
            # Adaptive clipping: this round's clip norm, at the intake (which clips at commit) and in the noise.
            self.intake.clip = clip
            self._strategy = dataclasses.replace(self._strategy, dp=dataclasses.replace(self._privacy.mechanism,
                                                                                        clip=clip))
        excluded: set[str] = set()
        attempt = 0
        while True:
            rs = await self._open_and_wait("train", rnd, attempt, excluded)
            t_closed = time.monotonic()
            self.phase = "aggregating"
            rng = round_rng(self._privacy.seed, rnd, rs.attempt, 1) if self._privacy is not None else None
            async with self.intake.lock:
                acc = rs.accumulator
                if isinstance(acc, MaskedSum) and self._secure is not None:
                    delta = self._secure.delta(rs)  # unmasked already, when the attempt closed
                elif isinstance(acc, MaskedSum):
                    raise TypeError("a masked sum in a round without secure aggregation")
                else:
                    delta = await asyncio.to_thread(self._strategy.aggregate, acc, rnd, rng)
                # The round is closed and aggregated: its sum (2× the model in float64), its reference to the
                # old model and its spare upload buffers are not needed while the new model is made.
                rs.accumulator.release()
                rs.pool.release()
            new, state = await asyncio.to_thread(self._strategy.apply, self._strategy_state, self._model, delta)
            del delta
            bad = all_finite(new) or all_finite(state.m) or all_finite(state.v)
            if bad is None:
                break
            if self._privacy is not None:
                # No clipped delta can be to blame, and running the round again would release a second noised
                # aggregate that the accountant does not count: the settings are to blame (a huge clip, noise
                # or server step), so the run ends.
                raise RoundError(f"round {rnd}: the noised aggregate made {bad!r} non-finite; lower --dp-clip, "
                                 "--dp-noise-multiplier or the server learning rate", round=rnd)
            # A finite model never becomes non-finite through aggregation: the round is not applied, and
            # runs again without the update(s) to blame.
            blamed = _outliers(rs)
            excluded |= blamed
            attempt = rs.attempt + 1
            self.metrics.round_not_applied("train")
            log.event("round.not_applied", logging.ERROR, run=self.run_id, round=rnd, attempt=rs.attempt,
                      reason=f"aggregation made {bad!r} non-finite", excluded=",".join(sorted(blamed)))
            if attempt > self.config.max_round_retries:
                raise RoundError(f"round {rnd}: aggregation gave a non-finite model {attempt} times", round=rnd)
        self._raise_if_stopped()
        self.round = rnd
        self._strategy_state = state
        self._set_model(new, self.model_version + 1)
        del new
        t_agg = time.monotonic()
        self.phase = "evaluating"
        # One pass over the held-out set gives the scores and, for a classifier, its confusion counts.
        metrics, counts = await asyncio.to_thread(evaluate_with_confusion, self.task, self._model, self._test) \
            if self._test is not None else ({}, None)
        self.accuracy = finite_or_none(float(metrics["accuracy"])) if metrics else None
        self.loss = finite_or_none(float(metrics["loss"])) if metrics else None
        val = await asyncio.to_thread(self.task.evaluate, self._model, self._val) if self._val is not None else {}
        t_eval = time.monotonic()
        self.phase = "checkpointing"
        saved_state = state_to_tensors(self._strategy_state)
        state_parts = codec.encode_parts(*saved_state) if saved_state is not None else None
        await asyncio.to_thread(self._checkpoints.save, rnd, [self._model_bytes], state_parts)
        t_ckpt = time.monotonic()
        record = _record(rs, rnd, self.accuracy, self.loss, metrics, self.model_version,
                         RoundTimings(wait_workers=rs.started - t0, open=t_closed - rs.started,
                                      aggregate=t_agg - t_closed, evaluate=t_eval - t_agg,
                                      checkpoint=t_ckpt - t_eval), seconds=t_ckpt - t0,
                         score_low=score_low(self.task), confusion=confusion_of(counts, class_names(self.task)))
        if val:
            record = record.model_copy(update={"val_accuracy": finite_or_none(float(val["accuracy"])),
                                               "val_loss": finite_or_none(float(val["loss"]))})
        if self._privacy is not None:
            used = clip if clip is not None else self._privacy.mechanism.clip
            # Under --dp distributed the workers clip, and each says whether it did (worker metric dp_clipped, 1 or
            # 0). Only a 1 counts: what a worker sends must not put a negative or huge count into the record.
            clipped = sum(a.metrics.get("dp_clipped") == 1.0 for a in rs.answered.values()) \
                if self._privacy.distributed else sum(a.norm > used for a in rs.answered.values())
            update: dict[str, Any] = {"dp_epsilon": self._privacy.epsilon(rnd), "dp_clipped": clipped}
            adaptive = self._privacy.adaptive
            if adaptive is not None:
                rng = round_rng(self._privacy.seed, rnd, rs.attempt, 2)
                update |= {"dp_clip": used, "dp_unclipped_fraction": adaptive.noised_fraction(
                    len(rs.answered) - clipped, self._privacy.mechanism.denominator, rng)}
            record = record.model_copy(update=update)
        if self._secure is not None:
            record = record.model_copy(update={"secagg": self._secure.record(rs), "sampled": self._secure.sampled(rs)})
            self._secure.end()
        self._store.record_round(record, list(rs.answered))
        for wid in rs.answered:
            if wid in self._registry.workers:
                self._registry.workers[wid].rounds_served += 1
        self._history.append(record)
        self.metrics.round_completed(record)
        self.run_dir.append_round(record)
        dp = {"dp_epsilon": record.dp_epsilon, "dp_clipped": record.dp_clipped} if self._privacy is not None else {}
        log.event("round.closed", run=self.run_id, round=rnd, participants=len(rs.answered),
                  accuracy=self.accuracy, loss=self.loss, seconds=record.seconds, **dp)
        self._notify()

    def _finish(self, state: State, message: str) -> None:
        self.state = state
        self.phase = "done"
        self.message = message
        self._current = None
        self.intake.round = None
        self.run_dir.write_model([self._model_bytes])
        self.run_dir.write_summary(self.summary())
        self._store.set_state(state, message)
        self._store.checkpoint_wal()
        log.event(f"run.{state}", logging.INFO if state == "finished" else logging.ERROR,
                  run=self.run_id, message=message, accuracy=self.accuracy)
        self._notify(work=True)

    def stop(self, reason: str) -> bool:
        """End the run now, resumable: the loop is cancelled, the model and the history go back to the last
        recorded round (what a coordinator started again on this data dir carries on from), model.safetensors
        and a summary with state "stopped" are written; state.sqlite keeps the run open, so it is resumed and
        not refused. The round in progress, if any, is lost and runs again on resume. Returns False, doing
        nothing, if the run had already ended."""
        if self.state in ENDED:
            return False
        if self._loop is not None:
            self._loop.cancel()
        last = self._history[-1] if self._history else None
        recorded = last.round if last else 0
        if self.round != recorded:
            # The model in memory is of a round that was aggregated but not recorded: not part of the run.
            self.round = recorded
            self.accuracy, self.loss = (last.accuracy, last.loss) if last else (None, None)
            model, version = (self._checkpoints.load(last.round)[0], last.model_version) if last \
                else (initial_model(self.task, self.config.seed, self._public)
                      if self.plan is not None or not has_plan(self.task) else {}, 0)
            self._set_model(model, version)
        self.state = "stopped"
        self.phase = "done"
        self.message = f"{reason} after round {recorded} of {self.config.rounds}; resumable"
        self._current = None
        self.intake.round = None
        self.run_dir.write_model([self._model_bytes])
        self.run_dir.write_summary(self.summary())
        self._store.checkpoint_wal()
        log.event("run.stopped", logging.WARNING, run=self.run_id, round=recorded, reason=reason,
                  accuracy=self.accuracy)
        self._notify(work=True)
        self.done.set()
        return True

    def summary(self) -> RunSummary:
        if self.state == "waiting" or self.state == "running":
            raise RoundError(f"run {self.run_id} is {self.state}: it has no summary yet")
        return RunSummary(
            run_id=self.run_id, state=self.state, message=self.message,
            task=self.config.task, partition=self.config.partition, workers=self.config.workers,
            rounds=self.round, rounds_planned=self.config.rounds, final_accuracy=self.accuracy,
            final_loss=self.loss, evaluation="test" if self._test is not None or not self._history else "federated",
            data_source="sites" if self.data_source == "sites" else "partitions",
            final_fed_accuracy=self._history[-1].fed_accuracy if self._history else None,
            final_val_accuracy=self._history[-1].val_accuracy if self._history else None,
            seconds=time.monotonic() - self._started, parameters=num_parameters(self._model),
            model_version=self.model_version, config=self.config.to_dict(),
            round_timings=[RoundTiming(round=r.round, seconds=r.seconds, **r.timings.model_dump())
                           for r in self._history],
            dp=self._privacy.summary(len(self._history), self._history) if self._privacy is not None else None)

    async def _linger(self) -> None:
        """Keep answering polls and scrapes after the run ended (finished or failed): until every live worker
        heard the run is over, or ``linger`` passed; and, if something scrapes /metrics (twice or more so
        far), until a scrape saw the end or two of its intervals passed (``scrape_linger``), so that
        Prometheus records how the run ended (alerts, dashboards) rather than a target that went away. A run
        stopped by a signal does not come here: the signal asks the process to exit."""
        now = time.monotonic()
        workers_end = now + self.linger
        scrape_end = now + scrape_linger(self.metrics.scrape_interval)
        if scrape_end > now and not self.metrics.end_scraped:
            log.event("coordinator.linger_for_scrape", run=self.run_id, seconds=round(scrape_end - now, 1))
        while True:
            now = time.monotonic()
            for_workers = now < workers_end and not all(w.stopped for w in self._registry.live())
            for_scrape = now < scrape_end and not self.metrics.end_scraped
            if not (for_workers or for_scrape):
                break
            await self._wait_change(min(0.5, max(workers_end, scrape_end) - now))
        self.done.set()


# A coordinator that is scraped waits after its run for a scrape to see the end, at most two scrape
# intervals (as measured between its last two scrapes), never over SCRAPE_LINGER_MAX (a scraper that
# stopped). Scraped once only, it does not wait: one request is no sign of a scraper that comes back
# (a person's curl, a test), and waiting for one would hold every such process for minutes.
SCRAPE_LINGER_MAX = 300.0


def scrape_linger(interval: float | None) -> float:
    """Seconds to wait after the run for a scrape, scrapes ``interval`` seconds apart (None: fewer than two).

    >>> scrape_linger(5.0), scrape_linger(None), scrape_linger(3600.0)
    (10.0, 0.0, 300.0)
    """
    return 0.0 if interval is None else min(SCRAPE_LINGER_MAX, 2 * interval)


def data_source(config: RunConfig, task: object) -> str:
    """``--data-source``, else ``sites`` for a task that has no shared data set to partition (its class
    says so with ``data_at_sites = True``), else ``partitions``."""
    if config.data_source is not None:
        return config.data_source
    return "sites" if getattr(task, "data_at_sites", False) else "partitions"


def check_data_source(config: RunConfig, task: object) -> None:
    """ConfigError if the run's data source is one its task cannot train on."""
    source = data_source(config, task)
    if source == "sites" and not loads_sites(task):
        raise ConfigError(f"task {config.task!r} cannot read a site's own files (it has no load_site): "
                          "leave --data-source sites out, and its workers train on partitions of its data set",
                          option="data_source")
    if config.test_data is not None and not loads_sites(task):
        raise ConfigError(f"task {config.task!r} cannot read files of its own (it has no load_site), so "
                          "--test-data cannot be used with it; it is scored on its own test set",
                          option="test_data")
    if config.server_val:
        check_server_val(config, task, source)


def check_server_val(config: RunConfig, task: Any, source: str) -> None:
    """ConfigError if ``--server-val`` cannot be taken out of this run's training pool."""
    if source == "sites":
        raise ConfigError(f"The 'server_val' option needs a shared training pool to take examples from, and task "
                          f"{config.task!r} trains on each site's own data (--data), which stays at the site: give "
                          "--test-data, or select on the federated evaluation", option="server_val")
    if not callable(getattr(task, "load_server_val", None)):
        raise ConfigError(f"The 'server_val' option cannot be used with task {config.task!r}: it has no "
                          "load_server_val(spec, seed) to say which examples of its pool the workers leave out",
                          option="server_val")
    try:
        load_server_val(config, task)
        # What is left must still give every worker a part: a worker would otherwise fail at its first round.
        task.load_partition(config.partition_spec, 0, config.workers, config.seed)
    except ValueError as exc:
        raise ConfigError(f"The 'server_val' option: {exc}.", option="server_val") from exc


def load_server_val(config: RunConfig, task: Any) -> Any | None:
    """The ``--server-val`` examples of the pool (None when it is off): ValueError if the pool is too small."""
    if not config.server_val:
        return None
    return task.load_server_val(config.partition_spec, config.seed)


def load_test(config: RunConfig, task: Task) -> Any | None:
    """The coordinator's held-out set: ``--test-data`` read like a site's files; the task's own test set in
    a partitions run; None in a site-data run without ``--test-data`` (federated evaluation only)."""
    if config.test_data is not None:
        if not loads_sites(task):
            raise TaskError(f"task {config.task!r} cannot read files of its own (it has no load_site), so "
                            "--test-data cannot be used with it")
        train, _ = site_task(task).load_site([Path(config.test_data)], 0.0, config.seed)
        return train
    if data_source(config, task) == "sites":
        return None
    return task.load_test()


def _mixed_message(source: str, task: str) -> str:
    if source == "partitions":
        return (f"this run trains on partitions of task {task!r}'s shared data set, but this worker brought its "
                "own data (--data): start it without --data, or start the coordinator with --data-source sites")
    return (f"this run trains on each site's own data, but this worker brought none: start it with "
            f"--data PATH (a file or folder of task {task!r}'s data)")


def _open_run(store: Store, run_dir: RunDir, config: RunConfig) -> str:
    """Create the run in the data dir, or pick up the one there if its config matches."""
    row = store.run()
    if row is None:
        run_id = uuid.uuid4().hex[:12]
        store.create_run(run_id, config.to_toml())
        run_dir.start(config)
        return run_id
    saved = RunConfig.from_mapping(tomllib.loads(row.config))
    diff = saved.differences(config)
    if diff:
        name = diff[0]
        raise ConfigError(
            f"{run_dir.path} holds run {row.id} whose '{name}' is {getattr(saved, name)!r}, not "
            f"{getattr(config, name)!r}; use the same config to resume it or a new --data-dir", option=name)
    if row.state in ("finished", "failed"):
        raise ConfigError(f"{run_dir.path} holds run {row.id}, which has {row.state}; "
                          "use a new --data-dir for a new run", option="data_dir")
    return row.id


def confusion_of(counts: np.ndarray | None, names: list[str] | None) -> Confusion | None:
    """The record's confusion matrix from a task's counts; classes the task does not name are named by index.

    >>> confusion_of(np.array([[3, 1], [0, 2]]), ["cat", "dog"]).counts
    [[3, 1], [0, 2]]
    >>> confusion_of(np.array([[1]]), None).classes, confusion_of(None, ["a"])
    (['0'], None)
    """
    if counts is None:
        return None
    k = len(counts)
    classes = names if names is not None and len(names) == k else [str(i) for i in range(k)]
    return Confusion(classes=classes, counts=[[int(v) for v in row] for row in counts])


def _record(rs: RoundState, rnd: int, accuracy: float | None, loss: float | None, metrics: Mapping[str, Any],
            version: int, timings: RoundTimings, seconds: float, score_low: float = 0.0,
            confusion: Confusion | None = None) -> RoundRecord:
    fed = rs.federated_eval(score_low)
    # The task's other scores, held to what a record may hold (names, finite values) like workers' metrics.
    extra, _ = clean_worker_metrics({k: float(v) for k, v in metrics.items() if k not in ("accuracy", "loss")
                                     and isinstance(v, int | float | np.number)})
    return RoundRecord(
        round=rnd, accuracy=accuracy, loss=loss, participants=len(rs.answered), sampled=len(rs.sampled),
        attempts=rs.attempt + 1, seconds=seconds, bytes_in=rs.bytes_in, bytes_out=rs.bytes_out,
        model_version=version, timings=timings,
        fed_accuracy=fed.accuracy if fed else None, fed_loss=finite_or_none(fed.loss) if fed else None,
        fed_accuracy_std=fed.accuracy_std if fed else None, fed_accuracy_min=fed.accuracy_min if fed else None,
        fed_accuracy_max=fed.accuracy_max if fed else None, fed_examples=fed.examples if fed else None,
        worker_metrics=rs.worker_metrics(), test_metrics=extra, updates_rejected=rs.rejected,
        metrics_dropped=rs.metrics_dropped, confusion=confusion)


def _outliers(rs: RoundState) -> set[str]:
    """The updates to blame for a non-finite aggregate: those whose delta norm is ``OUTLIER`` times the
    round's median or more, else the single largest."""
    if not rs.answered:
        return set()
    norms = {wid: a.norm for wid, a in rs.answered.items()}
    median = float(np.median(list(norms.values())))
    far = {wid for wid, n in norms.items() if median > 0 and n >= OUTLIER * median}
    return far or {max(norms, key=lambda wid: norms[wid])}
