"""Each worker's own numbers round by round: what the dashboard's heat map and the report's per-worker
charts draw.

The rows are the accepted updates of completed rounds (``Store.updates``): what the worker reported with
its update (its validation score of the model it was sent, its local training loss, ...) and how many
examples it trained on. Those numbers are the worker's, not the coordinator's: they are shown as the
worker's, never mixed into the run's own records. A worker's label mix is the count of its training
examples in each class, sent as ``label_count_<k>`` metrics (k the class index): counts only, no example.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fedfleet.storage.records import LABEL_COUNT_NAME
from fedfleet.storage.sqlite import UpdateRow

# The series kept per worker and round; other names a worker sends are left out of the history.
SERIES = ("val_accuracy", "val_loss", "train_loss", "train_accuracy", "train_s")


@dataclass(frozen=True)
class WorkerHistory:
    """One worker's series, aligned with ``RunHistory.rounds`` (None: it took no part in that round)."""

    worker_id: str
    series: dict[str, list[float | None]]
    examples: int | None = None  # examples its latest update was trained on
    label_counts: list[int] | None = None  # its latest report of examples per class index

    def to_dict(self) -> dict[str, object]:
        return {"worker_id": self.worker_id, "examples": self.examples, "label_counts": self.label_counts,
                **self.series}


@dataclass(frozen=True)
class RunHistory:
    rounds: list[int]
    workers: list[WorkerHistory] = field(default_factory=list)


def worker_history(rows: Iterable[UpdateRow], rounds: Sequence[int], worker_ids: Sequence[str]) -> RunHistory:
    """The history of ``worker_ids`` (in that order) over ``rounds`` from their update ``rows``.

    >>> rows = [UpdateRow(1, 0, "a", 10, {"val_accuracy": 0.5, "label_count_0": 7, "label_count_1": 3}),
    ...         UpdateRow(2, 0, "a", 10, {"val_accuracy": 0.6}), UpdateRow(2, 0, "b", 4, {"train_loss": 1.5})]
    >>> h = worker_history(rows, [1, 2], ["a", "b"])
    >>> h.workers[0].series["val_accuracy"], h.workers[0].label_counts, h.workers[0].examples
    ([0.5, 0.6], [7, 3], 10)
    >>> h.workers[1].series["train_loss"], h.workers[1].series["val_accuracy"], h.workers[1].label_counts
    ([None, 1.5], [None, None], None)
    """
    column = {r: i for i, r in enumerate(rounds)}
    empty: list[float | None] = [None] * len(rounds)
    series = {w: {name: list(empty) for name in SERIES} for w in worker_ids}
    examples: dict[str, int] = {}
    labels: dict[str, list[int]] = {}
    for row in rows:  # by round: the last seen is the latest
        at = column.get(row.round)
        mine = series.get(row.worker_id)
        if at is None or mine is None:
            continue
        for name in SERIES:
            value = row.metrics.get(name)
            if value is not None:
                mine[name][at] = value
        examples[row.worker_id] = row.num_examples
        counts = _label_counts(row.metrics)
        if counts is not None:
            labels[row.worker_id] = counts
    return RunHistory(list(rounds), [WorkerHistory(w, series[w], examples.get(w), labels.get(w))
                                     for w in worker_ids])


def _label_counts(metrics: dict[str, float]) -> list[int] | None:
    """``label_count_<k>`` as a list by class index (missing classes 0); None if the update has none."""
    # The intake keeps only valid counts (records.clean_worker_metrics); max(0, ...) still guards a database
    # written before it checked them.
    found = {int(m.group(1)): max(0, int(v)) for k, v in metrics.items() if (m := LABEL_COUNT_NAME.match(k))}
    if not found:
        return None
    return [found.get(k, 0) for k in range(max(found) + 1)]
