"""The compute side of a worker: its partition of the data, local statistics and local training."""

from __future__ import annotations

import functools

from fedfleet.partition import parse_partition
from fedfleet.protocol.messages import PartitionInfo, TrainParamsMsg
from fedfleet.tasks import Dataset, FitResult, Task, TrainParams
from fedfleet.types import Weights


class Trainer:
    def __init__(self, task: Task, partition: PartitionInfo) -> None:
        self.task = task
        self.partition = partition

    @functools.cached_property
    def data(self) -> Dataset:
        p = self.partition
        return self.task.load_partition(parse_partition(p.scheme), p.index, p.count, p.seed)

    def stats(self) -> tuple[Weights, int]:
        return self.task.local_stats(self.data), len(self.data)

    def fit(self, weights: Weights, params: TrainParamsMsg) -> FitResult:
        return self.task.fit(weights, self.data, TrainParams(params.local_epochs, params.batch_size,
                                                             params.lr, params.seed, params.prox_mu))
