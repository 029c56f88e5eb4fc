"""What a task is: data loading, a model's initial weights, local training and evaluation.

A task is used by both sides: the coordinator calls ``init_weights``, ``load_test`` and ``evaluate``;
a worker calls ``load_partition``, ``local_stats`` and ``fit``. Plug in your own by writing a class
with these methods and passing ``--task your.module:YourTask`` (see the README).

The statistics members (``stats_schema``, ``local_stats``, ``apply_stats`` and ``check_stats``) are
optional: ``load_task`` fills in the defaults of ``NoStats`` (no statistics round, every report
accepted) for a task that has none of them. A task with statistics needs the first three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedfleet.partition import PartitionSpec
from fedfleet.types import Schema, Weights


@dataclass(frozen=True)
class Dataset:
    """Examples as arrays: features ``x`` (n × d) and integer labels ``y`` (n)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrainParams:
    """The local training settings a worker receives with each round's task."""

    local_epochs: int
    batch_size: int
    lr: float
    seed: int  # differs per round and worker, so shuffles differ but runs stay reproducible
    prox_mu: float = 0.0  # FedProx: add μ·(w − w_global) to the gradient; 0 for plain local SGD


@dataclass(frozen=True)
class FitResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def init_weights(self, seed: int) -> Weights:
        """The initial global model."""
        ...

    def load_test(self) -> Dataset:
        """The coordinator's held-out evaluation set."""
        ...

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        """Worker ``index`` of ``count``'s share of the training data."""
        ...

    def stats_schema(self) -> Schema | None:
        """Schema of the statistics each worker reports before training, or None if none are needed."""
        ...

    def local_stats(self, data: Dataset) -> Weights:
        """This worker's statistics (e.g. count, sum, sum of squares): summed across workers."""
        ...

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        """The model updated with the combined statistics (e.g. a standardisation layer)."""
        ...

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        """Why one worker's statistics report is implausible (naming the tensor and the bound), or None.

        Called by the coordinator on each report, after its schema and finiteness were checked; a
        message makes the report a 422 (reason ``bad_stats``) instead of a term of the sum.
        """
        ...

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        """Train locally from ``weights`` and return the new weights."""
        ...

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        """At least ``loss`` and the score of ``weights`` on ``data``: ``accuracy``, unless the task names
        its score otherwise with a ``score_name`` class attribute (see ``fedfleet.tasks``)."""
        ...


class NoStats:
    """Mix in for a task that needs no statistics from the workers before training."""

    def stats_schema(self) -> Schema | None:
        return None

    def local_stats(self, data: Dataset) -> Weights:
        return {}

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        return weights

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        return None

