"""A task with no learning in it, for measuring the engine's own cost.

The model is one float32 tensor of ``params`` values; ``fit`` returns it plus a constant and
``evaluate`` reports its mean. What a round costs with this task is transport and aggregation only.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedfleet.options import Option
from fedfleet.partition import PartitionSpec
from fedfleet.tasks.base import Dataset, FitResult, NoStats, TrainParams
from fedfleet.types import Weights


class NullTask(NoStats):
    name = "null"
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("params", int, 100_000, "float32 values in the model", low=0, high=1_000_000_000),
        Option("examples", int, 100, "examples each worker and the coordinator hold", low=1, high=10_000_000),
    )

    def __init__(self, params: int = 100_000, examples: int = 100) -> None:
        self.params = params
        self.examples = examples

    def init_weights(self, seed: int) -> Weights:
        return {"w": np.zeros(self.params, dtype=np.float32)}

    def _data(self) -> Dataset:
        return Dataset(np.zeros((self.examples, 1), dtype=np.float32), np.zeros(self.examples, dtype=np.int64))

    def load_test(self) -> Dataset:
        return self._data()

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        return self._data()

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        w = weights["w"]
        out = np.empty_like(w)
        np.add(w, np.float32(1.0), out=out)
        return FitResult({"w": out}, len(data), {})

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        mean = float(weights["w"][:1000].mean()) if weights["w"].size else 0.0
        return {"loss": mean, "accuracy": 0.0}
