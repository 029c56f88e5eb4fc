"""The network side of a worker: register, long-poll for tasks, fetch the model, send updates.

One process can host many logical workers (``--clients K``), each a thread with its own stable id
(kept in ``--state-dir``, a folder the process holds locked: see ``statedir``), its own partition
and its own connection. They share what can be shared: the task, the data set in memory, and one
download of each model version. A heartbeat thread tells the coordinator that workers busy training
are still alive. Connection errors are retried with exponential backoff for ``--give-up`` seconds,
told once (what for, which URL) and then every ``WAIT_LOG_EVERY`` seconds; SIGTERM or SIGINT stops
the process cleanly.

What ends a worker: a stop instruction, a signal, giving up on an unreachable coordinator, or a
failure to join (registration, a task it may not or cannot load, its partition). What does not: one
round that went wrong. A fit that diverged (non-finite weights or metrics) is logged as
``worker.diverged`` and counted; its non-finite weights are not sent, its non-finite metrics are
left out of an update that is. Any other error building or sending one update is logged and counted,
and the worker takes the next instruction.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

from fedfleet import log
from fedfleet.errors import (
    CoordinatorUnreachable,
    FedfleetError,
    ProtocolError,
    RequestRejected,
    TransportError,
)
from fedfleet.protocol.client import CoordinatorBusy, CoordinatorClient
from fedfleet.protocol.messages import (
    DealtShare,
    DescribeInstruction,
    Instruction,
    RegisterResponse,
    SecAggInstruction,
    SecAggKeys,
    SecAggKeysInstruction,
    SecAggReveal,
    SecAggShareInstruction,
    SecAggShares,
    SecAggTrainContext,
    SecAggUnmaskInstruction,
    StatsInstruction,
    StopInstruction,
    TrainInstruction,
    UpdateMeta,
    WaitInstruction,
    from_b64,
    to_b64,
)
from fedfleet.secagg.client import ClientRound, NoiseShare, Peer, masked_update
from fedfleet.secagg.labels import Labels
from fedfleet.storage.files import write_text_atomic
from fedfleet.tasks import Task, check_allowed, load_task
from fedfleet.types import Weights
from fedfleet.worker.metrics import WorkerMetrics
from fedfleet.worker.statedir import claim
from fedfleet.worker.trainer import Trainer, finite_metrics, nonfinite_tensors

T = TypeVar("T")
UPLOAD_TRIES = 3
Outcome = Literal["accepted", "not_accepted", "undelivered"]
# Seconds between asks while the coordinator repeats an instruction this worker has done what it can with.
REPEAT_WAIT = 0.5
# While the coordinator does not answer: silence for a blip shorter than WAIT_QUIET (a restart, a dropped
# connection), then one line saying what the worker waits for, then one every WAIT_LOG_EVERY seconds.
WAIT_QUIET = 1.0
WAIT_LOG_EVERY = 30.0
MAX_BACKOFF = 5.0  # seconds between retries at most (before jitter)


def default_name() -> str:
    """``HOST-PID``: tells apart the worker processes of one host (the agents add ``/K``)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Waiting:
    """What a worker process says while its coordinator does not answer.

    One account for all the logical workers of the process (K of them retrying print one line, not K):
    ``worker.waiting`` once the coordinator has not answered for ``WAIT_QUIET`` seconds, with the URL
    and what for; ``worker.still_waiting`` every ``every`` seconds with how long so far and how long
    until the worker gives up; ``worker.reconnected`` when it answers again.
    """

    def __init__(self, url: str, give_up: float, every: float = WAIT_LOG_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.give_up = give_up
        self.every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when the oldest retry still going started
        self._next_line: float | None = None  # when the next line is due; None until the first is said
        self._busy = 0  # busy answers since the last worker.busy line
        self._next_busy_line: float | None = None

    def failed(self, what: str, error: Exception, since: float) -> None:
        """A retry of ``what`` that started failing at ``since`` (a ``clock`` time) failed again."""
        now = self._clock()
        with self._lock:
            self._since = since if self._since is None else min(self._since, since)
            waited = now - self._since
            if waited < WAIT_QUIET or (self._next_line is not None and now < self._next_line):
                return
            left = f"{max(0.0, self.give_up - waited):.0f}s"
            if self._next_line is None:
                log.event("worker.waiting", logging.WARNING, coordinator=self.url, waiting_for=what,
                          error=str(error), gives_up_in=left, next_line_in=f"{self.every:g}s")
            else:
                log.event("worker.still_waiting", logging.WARNING, coordinator=self.url, waiting_for=what,
                          waited=f"{waited:.0f}s", gives_up_in=left, error=str(error))
            self._next_line = now + self.every

    def busy(self, what: str, error: CoordinatorBusy, pause: float) -> None:
        """The coordinator answered that it is busy (429, 503): one line now, then one every ``every`` seconds
        with how many such answers came since, however many logical workers got them."""
        now = self._clock()
        with self._lock:
            self._busy += 1
            if self._next_busy_line is not None and now < self._next_busy_line:
                return
            log.event("worker.busy", coordinator=self.url, waiting_for=what, answers=self._busy,
                      error=str(error), retry_in=f"{pause:.1f}s",
                      note="the coordinator is alive and asks to be asked later; this does not count towards "
                           "--give-up")
            self._busy = 0
            self._next_busy_line = now + self.every

    def answered(self) -> None:
        """The coordinator answered a request: any wait is over."""
        with self._lock:
            if self._since is None:
                return
            if self._next_line is not None:
                log.event("worker.reconnected", coordinator=self.url, after=f"{self._clock() - self._since:.1f}s")
            self._since = self._next_line = None


class WorkerProcess:
    """What the logical workers of one process share, and the threads that run them."""

    def __init__(self, url: str, clients: int, state_dir: Path, name: str = "", give_up: float = 300.0,
                 join_token: str | None = None, verify: ssl.SSLContext | bool = True,
                 allowed_tasks: tuple[str, ...] = (), data: tuple[Path, ...] = ()) -> None:
        self.url = url
        self.data = data  # the site's own files (--data); empty: train on the partition the coordinator gives
        self.allowed_tasks = allowed_tasks
        self.join_token = join_token
        self.verify = verify
        self.clients = clients
        self.state_dir = state_dir  # the folder asked for; run() replaces it with the slot it locks
        self.name = name or default_name()
        self.give_up = give_up
        self.waiting = Waiting(url, give_up)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, tuple[tuple[str, str], ...]], Task] = {}
        self._model: tuple[int, Weights] | None = None
        self._model_lock = threading.Lock()
        # One fit at a time per process: the process's torch threads are its share of the cores, and K logical
        # workers fitting at once on them only interleave (more CPU for the same work: caches, the GIL).
        self.fitting = threading.Lock()
        self._ids: dict[str, str | None] = {}  # worker id -> its worker token (None on an open coordinator)
        self._polling: set[str] = set()  # workers with a long-poll in flight: the coordinator sees them alive
        self._poll_seconds = 1.0  # until registration says otherwise: beat early rather than late
        self.metrics = WorkerMetrics()  # served only with --metrics-port, but always kept: it costs little

    # --- shared resources ------------------------------------------------------------------------
    def task(self, name: str, options: dict[str, str]) -> Task:
        key = (name, tuple(sorted(options.items())))
        # The coordinator names the task, and loading one imports a module and calls it: a worker runs
        # only the built-in tasks and those its own operator allowed, never any code a coordinator names.
        check_allowed(name, self.allowed_tasks, f"the coordinator asks for task {name!r}, which this worker does "
                                                "not run")
        with self._lock:
            if key not in self._tasks:
                self._tasks[key] = load_task(name, options)
            return self._tasks[key]

    def model(self, client: CoordinatorClient, version: int) -> Weights:
        """The model of ``version``, downloaded once per process however many workers ask."""
        with self._model_lock:
            if self._model is None or self._model[0] < version:
                t0 = time.perf_counter()
                self._model = client.download_model()
                self.metrics.download_seconds.observe(time.perf_counter() - t0)
            return self._model[1]

    def model_version(self) -> int:
        """The version of the model this process holds, -1 if none."""
        with self._model_lock:
            return -1 if self._model is None else self._model[0]

    def offer(self, model: tuple[int, Weights], seconds: float) -> None:
        """Keep ``model`` (version, weights) if it is newer than the one held: a long-poll brought it, its bytes
        read in ``seconds`` (counted as the download of that version)."""
        with self._model_lock:
            if self._model is None or self._model[0] < model[0]:
                self._model = model
                self.metrics.download_seconds.observe(seconds)

    def client(self, timeout: float = 60.0) -> CoordinatorClient:
        return CoordinatorClient(self.url, timeout=timeout, verify=self.verify, join_token=self.join_token)

    def joined(self, worker_id: str, poll_seconds: float, token: str | None, run_id: str) -> None:
        with self._lock:  # the logical workers register from threads of their own
            self._ids[worker_id] = token
            self._poll_seconds = poll_seconds
            self.metrics.clients.set(len(self._ids))
            self.metrics.joined_run(run_id)

    # --- threads ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Run every logical worker until the coordinator says stop, ``stop`` is set, or all fail.

        Raises ``StorageError`` if no slot of the state dir can be locked."""
        slot = claim(self.state_dir)
        if slot.number:
            log.event("worker.state_dir", path=slot.path, slot=slot.number, passed_over="; ".join(slot.passed),
                      hint="another worker process uses the folder before it; --state-dir picks the folder")
        self.state_dir = slot.path
        try:
            threads = [threading.Thread(target=Agent(self, i).run, name=f"worker-{i}", daemon=True)
                       for i in range(self.clients)]
            beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            for t in threads:
                t.start()
            beat.start()
            while any(t.is_alive() for t in threads) and not self.stop.is_set():
                time.sleep(0.1)
            self.stop.set()
            for t in threads:
                t.join(timeout=2.0)  # a long-poll in flight may hold a thread; it is a daemon
            return 1 if self.errors else 0
        finally:
            slot.release()

    @contextlib.contextmanager
    def polling(self, worker_id: str) -> Iterator[None]:
        """While a long-poll of ``worker_id`` is in flight: the coordinator counts a worker holding one as
        alive, so the heartbeat leaves it out."""
        with self._lock:
            self._polling.add(worker_id)
        try:
            yield
        finally:
            with self._lock:
                self._polling.discard(worker_id)

    def _heartbeat(self) -> None:
        """Beat for the workers of this process that are not in a long-poll: those training, uploading or
        loading their data. Idle ones wait in long-polls, which keep them alive, so a round that samples a
        tenth of the workers costs heartbeats for a tenth, not for all of them (and none at all when none
        is busy)."""
        client = self.client(timeout=10.0)
        try:
            while not self.stop.wait(max(0.5, self._poll_seconds / 2)):
                with self._lock:
                    ids = sorted(set(self._ids) - self._polling)
                    tokens = [t for t in (self._ids[i] for i in ids) if t is not None]
                if ids:
                    client.token = tokens[0] if tokens else None
                    # The agents notice a lost coordinator and report it themselves.
                    with contextlib.suppress(FedfleetError):
                        client.heartbeat(ids, tokens if len(tokens) == len(ids) else None)
        finally:
            client.close()


class Agent:
    """One logical worker: a stable id, a partition, a loop of tasks."""

    def __init__(self, proc: WorkerProcess, slot: int) -> None:
        self.proc = proc
        self.slot = slot
        self.id_file = proc.state_dir / f"client-{slot}.json"
        self.worker_id: str | None = None
        # Secure aggregation: this worker's keys and shares for one round attempt, in memory only (a worker
        # that restarts cannot finish the attempt it was in, and counts as dropped out of it).
        self._secagg: tuple[tuple[int, int], ClientRound] | None = None

    def run(self) -> None:
        client = self.proc.client()
        try:
            self._loop(client)
        except CoordinatorUnreachable as exc:
            if not self.proc.stop.is_set():
                self._fail(f"gave up reaching the coordinator: {exc}")
        except FedfleetError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug in a task must be reported, not swallowed by the thread
            logging.getLogger("fedfleet").exception("worker crashed")
            self._fail(f"internal error: {exc!r}")
        finally:
            client.close()

    def _who(self) -> dict[str, str]:
        """The id once registered; before that, the name this worker registers with."""
        return {"worker": self.worker_id} if self.worker_id else {"name": self.name}

    @property
    def name(self) -> str:
        return f"{self.proc.name}/{self.slot}"

    def _fail(self, message: str) -> None:
        log.event("worker.failed", logging.ERROR, **self._who(), message=message)
        with self.proc._lock:
            self.proc.errors.append(message)

    def _stored(self) -> tuple[str | None, str | None]:
        """The id (and worker token) this slot had, so that a restarted worker keeps its partition."""
        try:
            data = json.loads(self.id_file.read_text())
            token = data.get("token")
            return str(data["worker_id"]), str(token) if token else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None

    def _register(self, client: CoordinatorClient) -> tuple[RegisterResponse, Trainer]:
        worker_id, token = self._stored()
        source: Literal["partitions", "sites"] = "sites" if self.proc.data else "partitions"
        reg = self._retry(lambda: client.register(worker_id, self.name, token, source), "register")
        self.worker_id = reg.worker_id
        # The worker token is a credential: the file is readable by this user only.
        write_text_atomic(self.id_file, json.dumps({"worker_id": reg.worker_id, "coordinator": self.proc.url,
                                                    "token": reg.token}), mode=0o600)
        self.proc.joined(reg.worker_id, reg.poll_seconds, reg.token, reg.run_id)
        # The partition's index, spelt as the coordinator's worker.registered line spells it.
        log.event("worker.registered", worker=reg.worker_id, partition=reg.partition.index, name=self.name,
                  run=reg.run_id)
        trainer = Trainer(self.proc.task(reg.task, reg.task_options), reg.partition, self.proc.data)
        # Loaded now, so that data that is missing or malformed ends the worker at once with its error,
        # rather than failing every round it is sampled in; the coordinator gets its partition back at once.
        try:
            trainer.data  # noqa: B018
        except FedfleetError:
            with contextlib.suppress(FedfleetError):
                client.leave(reg.worker_id)
            raise
        return reg, trainer

    def _loop(self, client: CoordinatorClient) -> None:
        reg, trainer = self._register(client)
        # The last instruction whose update this worker could not get accepted (it diverged, was refused or
        # could not be built). One whose update was accepted is done again if it comes back: the coordinator
        # lost the update (it restarted) and runs the round again.
        done: tuple[str, int, int] | None = None
        while not self.proc.stop.is_set():
            try:
                msg = self._retry(functools.partial(self._poll, client, reg), "next instruction")
            except RequestRejected:
                # The coordinator does not know us (e.g. it lost its state): join again.
                reg, trainer = self._register(client)
                continue
            if isinstance(msg, StopInstruction):
                log.event("worker.stop", worker=reg.worker_id, reason=msg.reason)
                return
            if isinstance(msg, WaitInstruction) or self.proc.stop.is_set():
                continue
            if isinstance(msg, DescribeInstruction):
                self._describe(client, reg, trainer)
                continue
            key = (msg.kind, msg.round, msg.attempt)
            if key == done:
                # The coordinator hands out an instruction until an update for it is accepted. Ours diverged,
                # was refused or could not be built: the same fit (same model, same seed) would give the
                # same again, so wait for the round to move on instead of spinning on it.
                self.proc.stop.wait(REPEAT_WAIT)
                continue
            try:
                if isinstance(msg, SecAggKeysInstruction | SecAggShareInstruction | SecAggUnmaskInstruction):
                    outcome = self._secagg_step(client, reg, trainer, msg)
                else:
                    outcome = self._work(client, reg, trainer, msg)
                done = key if outcome == "not_accepted" else None
            except CoordinatorUnreachable:
                raise
            except Exception as exc:
                # A task that raised in one round, an update that does not fit the protocol, an answer
                # that made no sense: reported loudly, but this worker may do fine in the next round.
                self._update_failed(reg.worker_id, msg, exc)
                if isinstance(msg, TrainInstruction | StatsInstruction):
                    self._decline(client, reg.worker_id, msg, f"its update failed: {exc!r}")
                done = key

    def _poll(self, client: CoordinatorClient, reg: RegisterResponse) -> Instruction:
        """The next instruction; a newer model the coordinator sends with it is kept, so that training on it
        needs no download request of its own."""
        with self.proc.polling(reg.worker_id):
            msg, model = client.next_instruction_and_model(reg.worker_id, reg.poll_seconds, self.proc.model_version())
        if model is not None:
            self.proc.offer(model, client.last_body_seconds)
        return msg

    def _describe(self, client: CoordinatorClient, reg: RegisterResponse, trainer: Trainer) -> None:
        """Send the description of this worker's data. A refusal (its columns differ from the run's, say)
        ends the worker with the coordinator's message: no round of this run could use its data."""
        description = trainer.describe()
        try:
            ack = self._retry(lambda: client.describe(reg.worker_id, description), "describe the data")
        except RequestRejected:
            raise
        except ProtocolError as exc:
            if exc.status == 422:
                raise FedfleetError(f"the coordinator refused this worker's data: {exc}") from exc
            raise
        log.event("worker.described", worker=reg.worker_id, described=ack.described)

    def _secagg_step(self, client: CoordinatorClient, reg: RegisterResponse, trainer: Trainer,
                     msg: SecAggInstruction) -> Outcome:
        """One step of secure aggregation (fedfleet.secagg.client): fresh keys, dealing shares, or revealing
        them. A refusal (the attempt moved on, or the request made no sense) is logged; the worker goes on."""
        wid, at = reg.worker_id, (msg.round, msg.attempt)
        try:
            if isinstance(msg, SecAggKeysInstruction):
                # Fresh keys for every attempt, also for one the coordinator runs again after a restart.
                session = ClientRound(wid, Labels(reg.run_id, msg.round, msg.attempt))
                self._secagg = (at, session)
                enc, mask, commitment = session.keys()
                body: SecAggKeys | SecAggShares | SecAggReveal = SecAggKeys(
                    worker_id=wid, round=msg.round, attempt=msg.attempt, enc_key=to_b64(enc), mask_key=to_b64(mask),
                    seed_commitment=to_b64(commitment), num_examples=max(len(trainer.data), 1))
                step = "keys"
            elif isinstance(msg, SecAggShareInstruction):
                session = self._session(at)
                peers = [Peer(p.worker_id, p.x, from_b64(p.enc_key, "enc_key"), from_b64(p.mask_key, "mask_key"))
                         for p in msg.peers]
                dealt = session.deal(peers, msg.threshold)
                body = SecAggShares(worker_id=wid, round=msg.round, attempt=msg.attempt, shares={
                    d.to: DealtShare(ciphertext=to_b64(d.ciphertext), mask_key_commitment=to_b64(d.mask_key_commitment),
                                     self_mask_commitment=to_b64(d.self_mask_commitment)) for d in dealt})
                step = "shares"
            else:
                session = self._session(at)
                self_masks, mask_keys = session.reveal(msg.survivors, msg.dropped)
                body = SecAggReveal(worker_id=wid, round=msg.round, attempt=msg.attempt,
                                    self_mask_shares={d: to_b64(v) for d, v in self_masks.items()},
                                    mask_key_shares={d: to_b64(v) for d, v in mask_keys.items()})
                step = "reveal"
            self._retry(lambda: client.secagg(step, body), f"secure aggregation: {step}")
        except ProtocolError as exc:  # RequestRejected included: the attempt moved on without us
            log.event("secagg.refused", logging.WARNING, worker=wid, round=msg.round, attempt=msg.attempt,
                      step=msg.kind, reason=str(exc))
            return "not_accepted"
        log.event("secagg.step", logging.DEBUG, worker=wid, round=msg.round, attempt=msg.attempt, step=msg.kind)
        return "accepted"

    def _session(self, at: tuple[int, int]) -> ClientRound:
        if self._secagg is None or self._secagg[0] != at:
            raise ProtocolError(f"this worker holds no secure-aggregation keys for round {at[0]} attempt {at[1]} "
                                "(it restarted since, or never got that attempt's keys instruction)")
        return self._secagg[1]

    def _masked(self, msg: TrainInstruction, context: SecAggTrainContext, weights: Weights, model: Weights,
                metrics: dict[str, float]) -> Weights:
        """The trained ``weights`` as uploaded under secure aggregation: their delta encoded and masked."""
        session = self._session((msg.round, msg.attempt))
        t0 = time.perf_counter()
        unreadable = session.accept({d: from_b64(c, "share") for d, c in context.shares.items()})
        if unreadable:
            log.event("secagg.unreadable_shares", logging.WARNING, worker=self.worker_id, round=msg.round,
                      dealers=", ".join(unreadable))
        noise = None
        if context.dp_clip is not None and context.dp_noise_std is not None:
            noise = NoiseShare(context.dp_clip, context.dp_noise_std, frozenset(context.dp_frozen))
        masked, clipped, scaled = masked_update(session, weights, model, context.neighbours, context.scale,
                                                context.clip, context.num_examples, noise)
        metrics["secagg_clipped"] = float(clipped)
        if noise is not None:
            metrics["dp_clipped"] = float(scaled)
        metrics["mask_s"] = time.perf_counter() - t0
        return masked

    def _planned(self, client: CoordinatorClient, trainer: Trainer) -> None:
        """Set the trainer up with the run's plan, fetched once: the coordinator sends work only once it has one."""
        plan = self._retry(client.plan, "fetch the plan")
        if plan is None:
            raise ProtocolError("the coordinator sent work before it agreed the run's plan")
        trainer.set_plan(plan)
        log.event("worker.planned", worker=self.worker_id)

    def _work(self, client: CoordinatorClient, reg: RegisterResponse, trainer: Trainer,
              msg: TrainInstruction | StatsInstruction) -> Outcome:
        """Answer ``msg``: accepted; not_accepted (diverged, refused: a repeat would give the same); or
        undelivered (it did not get through, and a repeat of ``msg`` is worth doing)."""
        if trainer.needs_plan:
            self._planned(client, trainer)
        t0 = time.perf_counter()
        if isinstance(msg, StatsInstruction):
            weights, n = trainer.stats()
            raw_metrics: dict[str, float] = {}
        else:
            version = msg.model_version
            model = self._retry(lambda: self.proc.model(client, version), "download model")
            validation = trainer.evaluate(model)  # the global model as it reached us, before training
            t_dl = time.perf_counter()
            with self.proc.fitting:
                t_fit = time.perf_counter()  # train_s is the fit's own time, not the wait for the process's turn
                result = trainer.fit(model, msg.params)
                train_s = time.perf_counter() - t_fit
            weights, n = result.weights, result.num_examples
            raw_metrics = {**result.metrics, **validation, "download_s": t_dl - t0, "train_s": train_s}
            if msg.params.report_labels and msg.secagg is None:  # never under DP or secure aggregation
                raw_metrics |= trainer.label_metrics()
            self.proc.metrics.trained(train_s, n * msg.params.local_epochs)
        tensors = nonfinite_tensors(weights)
        metrics, dropped = finite_metrics(raw_metrics)
        if tensors or dropped:
            self._diverged(reg.worker_id, msg, tensors, dropped)
            if tensors:
                # The coordinator refuses non-finite weights: the round goes on without us, and need not wait.
                self._decline(client, reg.worker_id, msg, f"fit diverged: non-finite {', '.join(tensors)}")
                return "not_accepted"
        if isinstance(msg, TrainInstruction) and msg.secagg is not None:
            weights = self._masked(msg, msg.secagg, weights, model, metrics)
            n = msg.secagg.num_examples
        # {**metrics}: a dict of UpdateMeta's own value type (it also admits None), which a dict[str, float] is not.
        meta = UpdateMeta(worker_id=reg.worker_id, round=msg.round, attempt=msg.attempt, num_examples=max(n, 1),
                          metrics={**metrics})
        return self._upload(client, weights, meta, t0)

    def _decline(self, client: CoordinatorClient, worker_id: str, msg: TrainInstruction | StatsInstruction,
                 reason: str) -> None:
        """Tell the coordinator this worker will not answer ``msg``'s round, so that it does not wait for it until
        its deadline. Best effort: a coordinator that cannot be told waits, as before."""
        try:
            client.decline(worker_id, msg.round, msg.attempt, reason)
        except FedfleetError as exc:
            log.event("worker.decline_failed", logging.WARNING, worker=worker_id, round=msg.round, error=str(exc))

    def _diverged(self, worker_id: str, msg: TrainInstruction | StatsInstruction, tensors: list[str],
                  metrics: list[str]) -> None:
        what = [f"tensor {t}" for t in tensors] + [f"metric {m}" for m in metrics]
        action = "update not sent" if tensors else "sent without those metrics"
        log.event("worker.diverged", logging.WARNING, worker=worker_id, round=msg.round, attempt=msg.attempt,
                  kind=msg.kind, nonfinite=", ".join(what), action=action)
        self.proc.metrics.nonfinite_metrics.inc(len(metrics))
        if tensors:
            self.proc.metrics.uploads.labels(result="diverged").inc()

    def _update_failed(self, worker_id: str, msg: TrainInstruction | StatsInstruction | SecAggInstruction,
                       exc: Exception) -> None:
        self.proc.metrics.uploads.labels(result="error").inc()
        log.event("update.failed", logging.ERROR, worker=worker_id, round=msg.round, attempt=msg.attempt,
                  kind=msg.kind, error=str(exc) if isinstance(exc, FedfleetError) else repr(exc))
        if not isinstance(exc, FedfleetError):  # not one of ours: a bug somewhere, worth its traceback
            logging.getLogger("fedfleet").error("traceback of update.failed", exc_info=exc)

    def _upload(self, client: CoordinatorClient, weights: Weights, meta: UpdateMeta, t0: float) -> Outcome:
        """Send the update, retrying transport errors."""
        worker_id, round_ = meta.worker_id, meta.round
        for attempt in range(UPLOAD_TRIES):
            try:
                t_up = time.perf_counter()
                # A retry goes through a resumable upload: whatever got through before is not sent again.
                client.upload(weights, meta, resumable=attempt > 0)
                self.proc.metrics.upload_seconds.observe(time.perf_counter() - t_up)
                self.proc.metrics.uploads.labels(result="accepted").inc()
                log.event("update.sent", logging.DEBUG, worker=worker_id, round=round_,
                          seconds=time.perf_counter() - t0)
                return "accepted"
            except RequestRejected as exc:
                # Stale or duplicate: the round moved on without us. Not an error of this worker.
                self.proc.metrics.uploads.labels(result="rejected").inc()
                log.event("update.rejected", logging.WARNING, worker=worker_id, round=round_, reason=str(exc))
                return "not_accepted"
            except ProtocolError as exc:
                # The coordinator refused this update (or failed on it): say so loudly, but one bad
                # round must not end a worker that may do fine in the next one.
                self.proc.metrics.uploads.labels(result="refused").inc()
                log.event("update.refused", logging.ERROR, worker=worker_id, round=round_, reason=str(exc))
                return "not_accepted"
            except TransportError as exc:
                log.event("update.retry", logging.WARNING, worker=worker_id, round=round_, error=str(exc))
                if attempt == UPLOAD_TRIES - 1:
                    self.proc.metrics.uploads.labels(result="failed").inc()
                if self.proc.stop.wait(0.5 * 2**attempt):
                    break
        return "undelivered"

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Call ``fn``, retrying transport errors with exponential backoff and jitter until ``give_up``.

        A busy answer (429, 503) is retried too, but never given up on: the coordinator answered, so it is
        alive. Counting it as silence made a worker turned away by the registration rate limit for longer
        than ``give_up`` end as "unreachable" (1,000 workers at 20 registrations a second after a burst of 200
        take 40 s; ``fedfleet run`` gives its workers 30 s), and the first round wait for its partition until
        --wait-timeout."""
        first_failure: float | None = None
        delay = 0.1
        while True:
            try:
                result = fn()
            except CoordinatorBusy as exc:
                first_failure = None
                self.proc.waiting.answered()
                # Not before the coordinator asked, and spread out so that the herd it turned away does not
                # come back in step.
                pause = max(exc.retry_after, delay) * random.uniform(1.0, 1.5)
                self.proc.waiting.busy(what, exc, pause)
                cause: TransportError = exc
            except TransportError as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.proc.give_up:
                    raise CoordinatorUnreachable(
                        f"no answer from {self.proc.url} for {self.proc.give_up:g} s ({exc}); "
                        "--give-up sets how long a worker waits") from exc
                self.proc.waiting.failed(what, exc, first_failure)
                pause = delay * random.uniform(0.5, 1.0)
                cause = exc
            else:
                self.proc.waiting.answered()
                return result
            if self.proc.stop.wait(pause):
                raise CoordinatorUnreachable(f"{what}: stopped while retrying") from cause
            delay = min(delay * 2, MAX_BACKOFF)

