"""Where the dashboard and the predict page get their data: a ``RunSource``.

A live run (``coordinator.live.LiveRun``, over the coordinator's engine) and a finished run's files
(``FinishedRun``) give the same shape, so one set of routes and one page serve a run as it goes
(``fedfleet coordinator``, ``fedfleet run``) and after it ended (``fedfleet serve --run DIR``). The
web layer knows only this protocol, never the coordinator's engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedfleet.config import RunConfig
from fedfleet.errors import ConfigError, FedfleetError, StorageError
from fedfleet.partition import partition_name
from fedfleet.protocol.messages import Status
from fedfleet.storage.history import worker_history
from fedfleet.storage.records import PrivacySummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import UpdateRow
from fedfleet.tasks import Task, check_allowed, load_task, with_plan
from fedfleet.tasks.base import class_names, has_plan
from fedfleet.types import Weights


@dataclass(frozen=True)
class Model:
    weights: Weights
    version: int
    round: int  # training rounds behind it


@dataclass(frozen=True)
class PrivacyView:
    """``dp`` in the dashboard's state: the epsilon a run with --dp central has spent, and what it is measured
    against. The names are those of summary.json's ``dp`` block (``PrivacySummary``), so that the page reads
    one shape from a live run and from a finished one."""

    mechanism: str
    epsilon: float  # spent by the rounds recorded so far, at delta
    delta: float
    max_epsilon: float | None  # --dp-max-epsilon: the run ends before a round that would go over it
    target_epsilon: float | None  # --dp-target-epsilon: what sigma was solved for over the planned rounds
    clip: float
    # None while a live run's sigma was solved for --dp-target-epsilon: the engine solved it at start, and
    # solving it again here would take seconds of the event loop; summary.json has it once the run ends.
    noise_multiplier: float | None
    sample_rate: float
    rounds: int  # noised rounds released, which epsilon counts

    @classmethod
    def of(cls, dp: PrivacySummary) -> PrivacyView:
        return cls(mechanism=dp.mechanism, epsilon=dp.epsilon, delta=dp.delta, max_epsilon=dp.max_epsilon,
                   target_epsilon=dp.target_epsilon, clip=dp.clip, noise_multiplier=dp.noise_multiplier,
                   sample_rate=dp.sample_rate, rounds=dp.rounds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RunSource(Protocol):
    @property
    def task(self) -> Task | None:
        """The run's task, or None when it cannot be loaded here (a custom task not on this host)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """``status`` (a Status), ``open_round``, ``workers``, ``config`` and ``dp`` (a ``PrivacyView`` as a
        dict, None for a run without differential privacy), JSON-ready."""
        ...

    def rounds(self) -> list[dict[str, Any]]:
        """One record per completed round, as in metrics.jsonl."""
        ...

    def model(self) -> Model: ...

    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it before reading the state."""
        ...

    async def worker_history(self, offset: int, limit: int) -> dict[str, Any]:
        """``GET /v1/dashboard/workers``: a page of the registered workers (by partition, from ``offset``, at
        most ``limit``), each with its own numbers by completed round (``history_page``)."""
        ...


@dataclass
class FinishedRun:
    """A run that has ended, read once from its output folder; nothing in the folder is written."""

    directory: Path
    status: Status
    config: RunConfig
    history: list[dict[str, Any]]
    weights: Model
    workers: list[dict[str, Any]]
    loaded_task: Task | None
    task_problem: str | None = None  # why the task is not loaded, when it is not
    privacy: PrivacyView | None = None  # from summary.json's dp block; None without --dp
    _never: asyncio.Event = field(default_factory=asyncio.Event)  # a finished run does not change

    @classmethod
    def load(cls, directory: Path, allowed_tasks: Collection[str] = ()) -> FinishedRun:
        """Read a run folder (``--out`` of ``fedfleet run``, ``--data-dir`` of ``fedfleet coordinator``).

        Its task is loaded only if it is built in or in ``allowed_tasks``: loading a task runs its code,
        and the folder's config.toml may name any module (``os:system``). A task that agrees a plan is set
        up with the run's (plan.json), as the coordinator had it; without one it cannot predict.
        """
        run_dir = RunDir(directory)

        def missing(path: Path, what: str) -> ConfigError:
            return ConfigError(f"{directory} is not a finished fedfleet run: it has no {path.name} ({what}). "
                               "Point --run at the --out folder of `fedfleet run` or the --data-dir of "
                               "`fedfleet coordinator`; a run still going is served live at its coordinator's "
                               "URL.", option="run")

        for path, what in ((run_dir.summary_path, "written when a run ends"), (run_dir.config_path, "the run's config"),
                           (run_dir.model_path, "the final model"), (run_dir.metrics_path, "one line per round")):
            if not path.is_file():
                raise missing(path, what)
        try:
            summary = run_dir.read_summary()
            config = run_dir.read_config()
            records = run_dir.read_rounds()
            weights, meta = run_dir.read_model()
        except FedfleetError as exc:
            raise ConfigError(f"cannot read the run in {directory}: {exc}", option="run") from exc
        if summary is None:  # removed since it was there a moment ago
            raise missing(run_dir.summary_path, "written when a run ends")
        version = meta.get("version", "")
        status = Status(
            run_id=summary.run_id, state=summary.state, phase="done", task=config.task,
            round=summary.rounds, rounds=config.rounds,
            model_version=int(version) if version.isdecimal() else summary.model_version,
            workers_registered=0, workers_live=0, accuracy=summary.final_accuracy, loss=summary.final_loss,
            message=summary.message)
        workers = _workers(run_dir, config.workers)
        status = status.model_copy(update={"workers_registered": len(workers)})
        history = [r.model_dump() for r in records]
        task, problem = _load_task(run_dir, config, allowed_tasks)
        return cls(directory, status, config, history, Model(weights, status.model_version, status.round),
                   workers, task, problem, None if summary.dp is None else PrivacyView.of(summary.dp))

    @property
    def task(self) -> Task | None:
        return self.loaded_task

    def snapshot(self) -> dict[str, Any]:
        return {"status": self.status.model_dump(), "open_round": None, "live": False, "workers": self.workers,
                "config": self.config.to_dict(), "dp": None if self.privacy is None else self.privacy.to_dict()}

    def rounds(self) -> list[dict[str, Any]]:
        return self.history

    def model(self) -> Model:
        return self.weights

    def changed(self) -> asyncio.Event:
        return self._never

    async def worker_history(self, offset: int, limit: int) -> dict[str, Any]:
        page = self.workers[offset:offset + limit]
        rounds = [int(r["round"]) for r in self.history]
        rows = await asyncio.to_thread(read_updates, RunDir(self.directory), [w["worker_id"] for w in page])
        return history_page(rows, rounds, page, len(self.workers), offset, limit, self.class_names())

    def class_names(self) -> list[str] | None:
        """The task's class names; without the task (not loaded here), those of the last confusion matrix."""
        names = class_names(self.loaded_task) if self.loaded_task is not None else None
        if names is None and self.history:
            confusion = self.history[-1].get("confusion")
            names = list(confusion["classes"]) if isinstance(confusion, dict) else None
        return names


def read_updates(run_dir: RunDir, worker_ids: list[str]) -> list[UpdateRow]:
    """The updates of ``worker_ids`` that went into completed rounds, from the run's state database opened
    read-only for this read (a coordinator may be writing it: WAL lets both go on); [] without one. Slow
    for a large run: call it off the event loop."""
    if not worker_ids:
        return []
    try:
        store = run_dir.read_store()
        if store is None:
            return []
        with closing(store):
            return store.updates(worker_ids)
    except StorageError:
        return []  # like the workers table: a damaged database leaves the view empty, the rest works


def history_page(rows: list[UpdateRow], rounds: list[int], page: list[dict[str, Any]], total: int, offset: int,
                 limit: int, classes: list[str] | None) -> dict[str, Any]:
    """The body of ``GET /v1/dashboard/workers``: ``page`` (dicts with worker_id, name and partition) with
    each worker's series over ``rounds``, examples and label counts from its update ``rows``."""
    history = worker_history(rows, rounds, [w["worker_id"] for w in page])
    workers = [{"worker_id": w["worker_id"], "name": w["name"], "partition": w["partition"], **h.to_dict()}
               for w, h in zip(page, history.workers, strict=True)]
    return {"rounds": list(rounds), "total": total, "offset": offset, "limit": limit, "classes": classes,
            "workers": workers}


def _load_task(run_dir: RunDir, config: RunConfig, allowed_tasks: Collection[str]) -> tuple[Task | None, str | None]:
    """The run's task with its plan, or None and why not (the dashboard still works; prediction says why)."""
    name = config.task
    try:
        check_allowed(name, allowed_tasks, f"prediction needs this run's task {name!r}, which fedfleet serve does "
                                           "not load unless allowed (loading a task runs its code)")
        task = load_task(name, config.task_options_dict)
        plan = run_dir.read_plan() if has_plan(task) else None
        # No plan: the run ended before its sites agreed one; the task is kept, and prediction says so.
        return (task if plan is None else with_plan(task, plan)), None
    except FedfleetError as exc:
        return None, str(exc)


def _workers(run_dir: RunDir, partitions: int) -> list[dict[str, Any]]:
    """The workers of a finished run from its state database, opened read-only; [] if there is none."""
    try:
        store = run_dir.read_store()
        if store is None:
            return []
        with closing(store):
            rows = store.workers()
            last_train = store.last_metric("train_s")
    except StorageError:
        return []  # the table of workers is a nicety; a damaged database must not stop the rest
    return [{"worker_id": w.worker_id, "name": w.name, "partition": partition_name(w.partition, partitions),
             "status": "stopped", "last_seen_s": None, "rounds_served": w.rounds_served,
             "last_train_s": last_train.get(w.worker_id)} for w in rows]
