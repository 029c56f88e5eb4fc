"""Where the dashboard and the predict page get their data: a live engine, or a finished run's files.

Both give the same shape (``RunSource``), so one set of routes and one page serve a run as it goes
(``fedfleet coordinator``, ``fedfleet run``) and after it ended (``fedfleet serve --run DIR``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import ConfigError, FedfleetError
from fedfleet.partition import partition_name
from fedfleet.protocol import codec
from fedfleet.protocol.messages import Status
from fedfleet.tasks import Task, load_task
from fedfleet.types import Weights


@dataclass(frozen=True)
class Model:
    weights: Weights
    version: int
    round: int  # training rounds behind it


class RunSource(Protocol):
    @property
    def task(self) -> Task | None:
        """The run's task, or None when it cannot be loaded here (a custom task not on this host)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """``status`` (a Status), ``open_round``, ``workers`` and ``config``, JSON-ready."""
        ...

    def rounds(self) -> list[dict[str, Any]]:
        """One record per completed round, as in metrics.jsonl."""
        ...

    def model(self) -> Model: ...

    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it before reading the state."""
        ...


class LiveRun:
    """A run in progress, read straight from the coordinator's engine (same event loop, no copies)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def task(self) -> Task | None:
        return self.engine.task

    def snapshot(self) -> dict[str, Any]:
        e = self.engine
        rs = e.current
        open_round = None
        if rs is not None and not rs.closed:
            open_round = {"round": rs.round, "attempt": rs.attempt, "kind": rs.kind, "sampled": len(rs.sampled),
                          "answered": len(rs.answered), "needed": rs.needed}
        return {"status": e.status().model_dump(), "open_round": open_round, "live": True,
                "workers": [w.model_dump() for w in e.workers_view()], "config": e.config.to_dict()}

    def rounds(self) -> list[dict[str, Any]]:
        return self.engine.history

    def model(self) -> Model:
        e = self.engine
        return Model(e.model, e.model_version, e.round)

    def changed(self) -> asyncio.Event:
        return self.engine.progress_event()


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
    _never: asyncio.Event = field(default_factory=asyncio.Event)  # a finished run does not change

    @classmethod
    def load(cls, directory: Path) -> FinishedRun:
        """Read a run folder (``--out`` of ``fedfleet run``, ``--data-dir`` of ``fedfleet coordinator``)."""
        def need(name: str, what: str) -> Path:
            path = directory / name
            if not path.is_file():
                raise ConfigError(f"{directory} is not a finished fedfleet run: it has no {name} ({what}). "
                                  "Point --run at the --out folder of `fedfleet run` or the --data-dir of "
                                  "`fedfleet coordinator`; a run still going is served live at its coordinator's "
                                  "URL.", option="run")
            return path

        summary_path = need("summary.json", "written when a run ends")
        config_path = need("config.toml", "the run's config")
        model_path = need("model.safetensors", "the final model")
        metrics_path = need("metrics.jsonl", "one line per round")
        try:
            summary = json.loads(summary_path.read_text())
            config = RunConfig.from_mapping(tomllib.loads(config_path.read_text()))
            history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            weights, meta = codec.decode(model_path.read_bytes())
        except (OSError, ValueError, FedfleetError) as exc:
            # ValueError covers JSON and TOML syntax errors; FedfleetError a config or model that is invalid.
            raise ConfigError(f"cannot read the run in {directory}: {exc}", option="run") from exc
        status = Status(
            run_id=str(summary.get("run_id", "")), state=summary.get("state", "finished"), phase="done",
            task=config.task, round=int(summary.get("rounds", len(history))), rounds=config.rounds,
            model_version=int(meta.get("version", summary.get("model_version", 0))),
            workers_registered=0, workers_live=0, accuracy=summary.get("final_accuracy"),
            loss=summary.get("final_loss"), message=str(summary.get("message", "")))
        workers = _workers(directory / "state.sqlite", config.workers)
        status = status.model_copy(update={"workers_registered": len(workers)})
        try:
            task: Task | None = load_task(config.task, config.task_options_dict)
        except FedfleetError:
            task = None  # the dashboard still works; predict says the task cannot be loaded
        return cls(directory, status, config, history, Model(weights, status.model_version, status.round),
                   workers, task)

    @property
    def task(self) -> Task | None:
        return self.loaded_task

    def snapshot(self) -> dict[str, Any]:
        return {"status": self.status.model_dump(), "open_round": None, "live": False, "workers": self.workers,
                "config": self.config.to_dict()}

    def rounds(self) -> list[dict[str, Any]]:
        return self.history

    def model(self) -> Model:
        return self.weights

    def changed(self) -> asyncio.Event:
        return self._never


def _workers(path: Path, partitions: int) -> list[dict[str, Any]]:
    """The workers of a finished run from its state database, opened read-only; [] if there is none."""
    if not path.is_file():
        return []
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT worker_id, partition, name, rounds_served FROM workers "
                              "ORDER BY partition").fetchall()
            last_train: dict[str, float] = {}
            for wid, metrics in db.execute("SELECT worker_id, metrics FROM updates ORDER BY round, attempt"):
                train_s = json.loads(metrics).get("train_s")
                if isinstance(train_s, int | float):
                    last_train[wid] = float(train_s)
        finally:
            db.close()
    except (sqlite3.Error, ValueError):
        return []  # the table of workers is a nicety; a damaged database must not stop the rest
    return [{"worker_id": wid, "name": name, "partition": partition_name(part, partitions), "status": "stopped",
             "last_seen_s": None, "rounds_served": served, "last_train_s": last_train.get(wid)}
            for wid, part, name, served in rows]
