"""The compute side of a worker: its partition of the data, local statistics, training and evaluation.

A seeded ``val_fraction`` of the partition is kept aside: each round the worker scores the global
model it received on it before training (federated evaluation), and trains on the rest.
``nonfinite_tensors`` and ``finite_metrics`` tell what of a fit's result can be sent: a model that
diverged gives NaN or Inf, which the coordinator refuses in weights and JSON cannot carry in metrics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np

from fedfleet.partition import parse_partition
from fedfleet.protocol.messages import PartitionInfo, TrainParamsMsg
from fedfleet.tasks import Dataset, FitResult, Task, TrainParams
from fedfleet.types import Weights, is_finite


class Trainer:
    def __init__(self, task: Task, partition: PartitionInfo) -> None:
        self.task = task
        self.partition = partition

    @functools.cached_property
    def _split(self) -> tuple[Dataset, Dataset | None]:
        p = self.partition
        data = self.task.load_partition(parse_partition(p.scheme), p.index, p.count, p.seed)
        n_val = round(p.val_fraction * len(data))
        if n_val < 1 or n_val >= len(data):
            return data, None
        order = np.random.default_rng([p.seed, p.index, 0x7A1]).permutation(len(data))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        return Dataset(data.x[train], data.y[train]), Dataset(data.x[val], data.y[val])

    @property
    def data(self) -> Dataset:
        """The examples this worker trains on (its partition less the validation split)."""
        return self._split[0]

    @property
    def validation(self) -> Dataset | None:
        return self._split[1]

    def stats(self) -> tuple[Weights, int]:
        return self.task.local_stats(self.data), len(self.data)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """``val_loss``, ``val_accuracy`` and ``val_examples`` of ``weights`` here; empty without a split."""
        if self.validation is None:
            return {}
        m = self.task.evaluate(weights, self.validation)
        return {"val_loss": float(m["loss"]), "val_accuracy": float(m["accuracy"]),
                "val_examples": float(len(self.validation))}

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
