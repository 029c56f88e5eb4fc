"""A task of your own, in ~30 lines: estimate the mean of numbers that live on different workers.

Run it with the module on the Python path (here: from this folder)::

    cd examples && fedfleet run --task mean_task:MeanTask --workers 4 --rounds 3 --val-fraction 0 --out ../runs/mean

Each worker's numbers are drawn around a different centre; local "training" is the exact local
mean, so FedAvg (weighted by examples) lands on the mean of all the numbers in one round. The run
reports the learned mean as the task's score (``score_name``) instead of an accuracy.
"""

from __future__ import annotations

import numpy as np

from fedfleet import Dataset, FitResult, PartitionSpec, TrainParams, Weights
from fedfleet.tasks import NoStats


class MeanTask(NoStats):  # NoStats: nothing to compute on every worker before training
    name = "mean"
    score_name = "mean"  # what evaluate's score is: shown as "final mean" instead of "final accuracy"

    def __init__(self, examples: str = "1000") -> None:
        self.examples = int(examples)

    def _numbers(self, index: int, count: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        return rng.normal(loc=float(index), scale=1.0, size=self.examples + 100 * index)

    def init_weights(self, seed: int) -> Weights:
        return {"mu": np.zeros(1, dtype=np.float64)}

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        x = self._numbers(index, count, seed)
        return Dataset(x.reshape(-1, 1), np.zeros(len(x), dtype=np.int64))

    def load_test(self) -> Dataset:
        x = np.zeros((1, 1))
        return Dataset(x, np.zeros(1, dtype=np.int64))

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        return FitResult({"mu": np.array([data.x.mean()])}, len(data), {"local_mean": float(data.x.mean())})

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        mu = float(weights["mu"][0])
        return {"loss": mu * mu, "mean": mu}
