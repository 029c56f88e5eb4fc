"""Reading a run dir into what the report draws: ``RunData`` and the numbers derived from it.

Nothing here draws, so tests check these numbers without looking at pixels. A run dir is only read: the
state database is opened read-only, so that a report of a run that is still going does not get in the
coordinator's way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedfleet.errors import StorageError
from fedfleet.partition import partition_name
from fedfleet.storage.history import RunHistory, WorkerHistory, worker_history
from fedfleet.storage.records import PrivacySummary, RoundRecord, RunSummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import Store

MAX_HISTORY = 2000  # workers beyond which only those that served a round get a per-worker history
LAST_N = 10  # the comparison table's "mean of the last rounds": smooths a noisy final round away


@dataclass(frozen=True)
class WorkerParticipation:
    """How many rounds' aggregates used a worker's update, and with how many examples in all."""

    worker_id: str
    label: str  # the partition name, or "worker ID (replaced)" for a worker whose partition was handed on
    partition: int | None
    name: str
    rounds_served: int
    examples: int


@dataclass(frozen=True)
class Confusion:
    """The last scored round's confusion matrix (``RoundRecord.confusion``): rows true, columns predicted."""

    round: int
    classes: list[str]
    counts: list[list[int]]

    def recall(self) -> list[float | None]:
        """Each class's recall: its diagonal count over its row (None for a class with no test example).

        >>> Confusion(3, ["a", "b"], [[3, 1], [0, 0]]).recall()
        [0.75, None]
        """
        return [row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.counts)]


@dataclass(frozen=True)
class RunData:
    path: Path
    name: str
    rounds: list[RoundRecord]  # in round order
    summary: RunSummary | None  # None while the run is going (the summary is written at its end)
    partition: str | None
    workers: int | None
    participation: list[WorkerParticipation] | None  # None when the run dir has no state database
    config: dict[str, Any] | None = None  # the run's options (summary.json, else config.toml); None if unknown
    history: RunHistory | None = None  # each worker's own numbers (of every worker, or of those that served)
    served: dict[str, frozenset[int]] = field(default_factory=dict)  # rounds whose aggregate used each worker

    @property
    def label(self) -> str:
        """The run dir's name with what tells runs apart: its partition and number of workers."""
        return self.label_with()

    def label_with(self, *extra: str) -> str:
        details = [d for d in (self.partition, f"{self.workers} workers" if self.workers else None, *extra) if d]
        return f"{self.name} ({', '.join(details)})" if details else self.name

    @property
    def dp(self) -> PrivacySummary | None:
        """summary.json's dp block: the mechanism's settings and the epsilon spent; None without --dp central
        and while the run is going (its rounds still say what they spent: ``epsilon``)."""
        return self.summary.dp if self.summary else None

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent by the run (at its delta), None for a run without differential privacy. While the
        run is going, what its last recorded round says."""
        if self.dp is not None:
            return self.dp.epsilon
        return self.rounds[-1].dp_epsilon if self.rounds else None

    @property
    def state(self) -> str:
        return self.summary.state if self.summary else "in progress"

    @property
    def final_accuracy(self) -> float | None:
        """The summary's, or while running the last round's; None when the model's score is unknown
        (a diverged model's loss is recorded as unknown). A run without a held-out set (evaluation
        "federated") has its last federated evaluation instead: see ``scored_by``."""
        if self.summary:
            return self.summary.final_fed_accuracy if self.scored_by == "federated" else self.summary.final_accuracy
        return self.rounds[-1].fed_accuracy if self.scored_by == "federated" else self.rounds[-1].accuracy

    @property
    def scored_by(self) -> str:
        """"test" (the coordinator's held-out set) or "federated" (only the workers' validation splits)."""
        if self.summary:
            return self.summary.evaluation
        test = any(r.accuracy is not None for r in self.rounds)
        return "federated" if not test and any(r.fed_accuracy is not None for r in self.rounds) else "test"

    @property
    def final_loss(self) -> float | None:
        return self.summary.final_loss if self.summary else self.rounds[-1].loss

    @property
    def seconds(self) -> float:
        """The coordinator's seconds from start to end; while running, the rounds' seconds so far."""
        return self.summary.seconds if self.summary else sum(r.seconds for r in self.rounds)

    def worker_rows(self) -> list[tuple[WorkerParticipation, WorkerHistory]]:
        """Each worker with its own series, in partition order; empty without a state database."""
        if self.participation is None or self.history is None:
            return []
        by_id = {p.worker_id: p for p in self.participation}
        return [(by_id[h.worker_id], h) for h in self.history.workers if h.worker_id in by_id]


# --- reading a run -------------------------------------------------------------------------------
def load_run(path: Path) -> RunData:
    """Read a run dir; raise StorageError with a one-line message if it is not a readable run."""
    if not path.exists():
        raise StorageError(f"run dir {path} does not exist")
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give the run's folder (fedfleet run --out DIR)")
    run_dir = RunDir(path)
    rounds = run_dir.read_rounds()
    if not rounds:
        raise StorageError(f"{run_dir.metrics_path} holds no rounds yet; nothing to report")
    summary = run_dir.read_summary()
    # The summary is written when the run ends, config.toml when it starts: a running run has only that.
    config = summary.config if summary is not None else _config(run_dir)
    if summary is not None:
        partition: str | None = summary.partition
        workers: int | None = summary.workers
    else:
        partition = config.get("partition") if config else None
        workers = config.get("workers") if config else None
    workers = workers if workers is not None and workers > 0 else None
    data = RunData(path=path, name=path.resolve().name, rounds=rounds, summary=summary, partition=partition,
                   workers=workers, participation=None, config=config or None)
    if not run_dir.state_path.exists():
        return data
    participation, history, served = read_workers(run_dir.state_path, workers, [r.round for r in rounds])
    return replace(data, participation=participation, history=history, served=served)


def _config(run_dir: RunDir) -> dict[str, Any]:
    # Only labels come from here, so a missing or unreadable config costs labels, not the report.
    try:
        return run_dir.read_config().to_dict()
    except StorageError:
        return {}


def read_participation(db_path: Path, workers: int | None) -> list[WorkerParticipation]:
    """Rounds served per worker, from the updates the coordinator accepted (``Store.served``), in
    partition order. A worker whose partition was handed to a new worker has left the workers' table
    but keeps its updates: it is shown as replaced."""
    with closing(Store.read_only(db_path)) as store:
        known = store.workers()
        served = store.served()
    count = workers or (max((w.partition for w in known), default=-1) + 1)
    by_id = {s.worker_id: (s.rounds, s.examples) for s in served}
    out = [WorkerParticipation(w.worker_id, partition_name(w.partition, count), w.partition, w.name,
                               *by_id.pop(w.worker_id, (0, 0)))
           for w in sorted(known, key=lambda w: w.partition)]
    out += [WorkerParticipation(wid, f"worker {wid[:8]} (replaced)", None, "", n, ex)
            for wid, (n, ex) in sorted(by_id.items())]
    return out


def read_workers(db_path: Path, workers: int | None, rounds: Sequence[int]) \
        -> tuple[list[WorkerParticipation], RunHistory, dict[str, frozenset[int]]]:
    """Participation, each worker's own series over ``rounds`` (``storage.history``, the function the
    dashboard's per-worker view uses) and the rounds each worker's update went into."""
    participation = read_participation(db_path, workers)
    with closing(Store.read_only(db_path)) as store:
        updates = store.updates()  # every worker's: a list of a million ids would not fit in one query
    served: dict[str, set[int]] = {}
    for row in updates:
        served.setdefault(row.worker_id, set()).add(row.round)
    ids = [p.worker_id for p in participation]
    if len(ids) > MAX_HISTORY:
        # A simulated fleet of millions: a history (a row of the heat map) only for those that took part.
        ids = [wid for wid in ids if wid in served]
    return (participation, worker_history(updates, rounds, ids),
            {wid: frozenset(done) for wid, done in served.items()})


def round_phases(run: RunData) -> dict[str, list[float]]:
    """Seconds of each phase of each round, in the order they happen; per round they add up to its seconds.

    The round is open from the moment workers may fetch the model until the last answer arrived. The
    workers report their download and training times, and each record's ``worker_metrics`` carries
    their means; the rest of the open time is uploads and waiting for the slowest worker (a mean
    leaves the straggler's extra time there). Runs whose records lack those times keep the open time
    whole.
    """
    split = all("download_s" in r.worker_metrics and "train_s" in r.worker_metrics for r in run.rounds)
    phases: dict[str, list[float]] = {"waiting for workers": []}
    if split:
        for label in ("model download (workers' mean)", "local training (workers' mean)", "upload + slowest worker"):
            phases[label] = []
    else:
        phases["open (transfer + training)"] = []
    for label in ("aggregation", "evaluation", "checkpoint"):
        phases[label] = []
    for r in run.rounds:
        t = r.timings
        phases["waiting for workers"].append(t.wait_workers)
        if split:
            download = max(0.0, r.worker_metrics["download_s"])
            train = max(0.0, r.worker_metrics["train_s"])
            # Worker and coordinator clocks start at slightly different moments: should the workers'
            # times ever exceed the open time, shrink them to fit, so the bar still shows the round.
            scale = min(1.0, t.open / (download + train)) if download + train > 0 else 1.0
            phases["model download (workers' mean)"].append(download * scale)
            phases["local training (workers' mean)"].append(train * scale)
            phases["upload + slowest worker"].append(t.open - (download + train) * scale)
        else:
            phases["open (transfer + training)"].append(t.open)
        phases["aggregation"].append(t.aggregate)
        phases["evaluation"].append(t.evaluate)
        phases["checkpoint"].append(t.checkpoint)
    return phases


# --- the numbers the tables give -----------------------------------------------------------------
def accuracies(run: RunData) -> tuple[list[float | None], str]:
    """The run's accuracy by round and what it was measured on: the held-out test set, or, for a run
    scored by federated evaluation, the workers' validation splits."""
    if run.scored_by == "federated":
        return [r.fed_accuracy for r in run.rounds], "workers' validation splits (federated evaluation)"
    return [r.accuracy for r in run.rounds], "held-out test set"


@dataclass(frozen=True)
class Scores:
    """A run's score in one row of the table: final, best (and when), and the mean of its last rounds."""

    final: float | None
    best: float | None
    best_round: int | None
    mean_last: float | None
    last: int  # rounds the mean is taken over: LAST_N, or all of a shorter run
    known: int  # of those, rounds whose score is known (a diverged model's is not)


def scores(run: RunData) -> Scores:
    """Final, best and mean of the last ``LAST_N`` rounds, on what the run is scored by.

    >>> from fedfleet.storage.records import RoundTimings
    >>> t = RoundTimings(wait_workers=0, open=0, aggregate=0, evaluate=0, checkpoint=0)
    >>> recs = [RoundRecord(round=i, accuracy=a, loss=1.0, participants=1, sampled=1, attempts=1, seconds=0,
    ...                     bytes_in=0, bytes_out=0, model_version=i, timings=t)
    ...         for i, a in [(1, .5), (2, .7), (3, .6)]]
    >>> s = scores(RunData(Path("r"), "r", recs, None, None, None, None))
    >>> s.final, s.best, s.best_round, round(s.mean_last or 0, 4), s.last, s.known
    (0.6, 0.7, 2, 0.6, 3, 3)
    """
    values, _ = accuracies(run)
    known = [(v, r.round) for v, r in zip(values, run.rounds, strict=True) if v is not None]
    # The first of equal bests: the round the run first got there.
    best = max(known, key=lambda vr: (vr[0], -vr[1]), default=(None, None))
    window = [v for v in values[-LAST_N:] if v is not None]
    return Scores(final=run.final_accuracy, best=best[0], best_round=best[1],
                  mean_last=math.fsum(window) / len(window) if window else None,
                  last=min(LAST_N, len(values)), known=len(window))


def last_confusion(run: RunData) -> Confusion | None:
    """The confusion matrix of the last round that has one (contract: ``RoundRecord.confusion``, null for a
    task that does not classify or a run without a held-out set)."""
    for record in reversed(run.rounds):
        found = _confusion_of(record)
        if found is not None:
            return found
    return None


def _confusion_of(record: RoundRecord) -> Confusion | None:
    found = record.confusion  # square and non-negative: the record checked it when it was read
    return None if found is None else Confusion(record.round, list(found.classes), [list(r) for r in found.counts])


def class_names(run: RunData, count: int) -> list[str]:
    """Names of the first ``count`` class indices: the confusion record's, else "class k".

    >>> class_names(RunData(Path("r"), "r", [], None, None, None, None), 2)
    ['class 0', 'class 1']
    """
    known = last_confusion(run)
    names = known.classes if known is not None else []
    return [names[k] if k < len(names) else f"class {k}" for k in range(count)]
