"""The compute side of a worker: its data, local statistics, training and evaluation.

Its data is either its partition of the task's shared data set or, with ``fedfleet worker --data``, the
site's own files (the task's ``load_site``). A seeded ``val_fraction`` of it is kept aside: each round
the worker scores the global model it received on it before training (federated evaluation), and
trains on the rest. A task that agrees a plan (``tasks.base.SiteTask``) describes the data first, and
trains and evaluates only once it is set up with the run's plan (``set_plan``).
``nonfinite_tensors`` and ``finite_metrics`` tell what of a fit's result can be sent: a model that
diverged gives NaN or Inf, which the coordinator refuses in weights and JSON cannot carry in metrics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.partition import parse_partition
from fedfleet.protocol.messages import PartitionInfo, TrainParamsMsg
from fedfleet.tasks import Dataset, FitResult, Task, TrainParams, with_plan
from fedfleet.tasks.base import Description, has_plan, label_counts, loads_sites, site_task
from fedfleet.types import Weights, is_finite

# Classes a worker reports its label mix for, at most: more would be a wall of numbers in every update for a
# view that cannot show them (the coordinator keeps up to records.MAX_CONFUSION_CLASSES of them).
MAX_REPORTED_CLASSES = 20


class Trainer:
    def __init__(self, task: Task, partition: PartitionInfo, data: Sequence[Path] = ()) -> None:
        self.task = task  # replaced by the task set up with the plan, for a task that agrees one
        self._unplanned = task
        self.partition = partition
        self.paths = tuple(data)
        self.needs_plan = has_plan(task)

    @functools.cached_property
    def _split(self) -> tuple[Any, Any | None]:
        p = self.partition
        if self.paths:
            if not loads_sites(self.task):
                raise TaskError(f"task {self.task.name!r} cannot train on files of its own (it has no load_site): "
                                "start the worker without --data, on a partition of the task's data set")
            train, val = site_task(self.task).load_site(self.paths, p.val_fraction, p.seed)
            return train, val
        data = self.task.load_partition(parse_partition(p.scheme), p.index, p.count, p.seed)
        n_val = round(p.val_fraction * len(data))
        if n_val < 1 or n_val >= len(data):
            return data, None
        order = np.random.default_rng([p.seed, p.index, 0x7A1]).permutation(len(data))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        return Dataset(data.x[train], data.y[train]), Dataset(data.x[val], data.y[val])

    @property
    def data(self) -> Any:
        """The examples this worker trains on (its partition or files, less the validation split)."""
        return self._split[0]

    @property
    def validation(self) -> Any | None:
        return self._split[1]

    def describe(self) -> Description:
        """What the run's plan is agreed from: the task's aggregates of this worker's training data."""
        return site_task(self._unplanned).describe(self.data)

    def set_plan(self, plan: Mapping[str, Any]) -> None:
        self.task = with_plan(self._unplanned, plan)
        self.needs_plan = False

    def stats(self) -> tuple[Weights, int]:
        return self.task.local_stats(self.data), len(self.data)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """``val_loss``, ``val_accuracy`` and ``val_examples`` of ``weights`` here; empty without a split."""
        if self.validation is None:
            return {}
        m = self.task.evaluate(weights, self.validation)
        return {"val_loss": float(m["loss"]), "val_accuracy": float(m["accuracy"]),
                "val_examples": float(len(self.validation))}

    def label_metrics(self) -> dict[str, float]:
        """``label_count_<k>``: this worker's training examples of each class index (counts only, never an
        example), for the per-worker views; empty for a task that does not name its classes or has more
        than ``MAX_REPORTED_CLASSES``. Counted once: the data does not change while the worker runs."""
        counts = self._label_counts
        if counts is None or len(counts) > MAX_REPORTED_CLASSES:
            return {}
        return {f"label_count_{k}": float(n) for k, n in enumerate(counts)}

    @functools.cached_property
    def _label_counts(self) -> list[int] | None:
        return label_counts(self.task, self.data)

    def fit(self, weights: Weights, params: TrainParamsMsg) -> FitResult:
        return self.task.fit(weights, self.data, TrainParams(params.local_epochs, params.batch_size,
                                                             params.lr, params.seed, params.prox_mu))


def nonfinite_tensors(weights: Weights) -> list[str]:
    """The names of the tensors of ``weights`` that hold a NaN or an infinity, in order."""
    return [name for name, a in weights.items() if not is_finite(a)]


def finite_metrics(metrics: Mapping[str, object]) -> tuple[dict[str, float], list[str]]:
    """The metrics that are finite numbers (as floats), and the names of the others."""
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for name, value in metrics.items():
        try:
            number = float(value)  # type: ignore[arg-type]  # a task may return numpy scalars, or worse
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number):
            kept[name] = number
        else:
            dropped.append(name)
    return kept, dropped
