"""One round's state: who was sampled, who answered, the running sum, the deadline."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedfleet.secagg.server import MaskedSum
from fedfleet.storage.records import MAX_WORKER_METRICS, is_label_count
from fedfleet.strategies.accumulate import Stack, WeightedSum
from fedfleet.types import Schema

Kind = Literal["stats", "train"]


def sample(candidates: Sequence[str], fraction: float, at_least: int, seed: int, round: int,
           attempt: int) -> list[str]:
    """ceil(fraction × candidates), at least ``at_least``, chosen reproducibly; the rest keep their order.

    >>> sample(["a", "b", "c", "d"], 0.5, 1, seed=0, round=1, attempt=0)
    ['a', 'd']
    """
    # The epsilon keeps 0.07 × 100 = 7.000000000000001 from becoming 8.
    k = min(len(candidates), max(at_least, math.ceil(fraction * len(candidates) - 1e-9)))
    rng = np.random.default_rng([seed, round, attempt, 0x5A])
    chosen = sorted(rng.choice(len(candidates), size=k, replace=False).tolist())
    return [candidates[i] for i in chosen]


def round_lr(lr: float, decay: float, round: int) -> float:
    """The local learning rate of training round ``round`` (from 1): ``lr × decay^(round − 1)``.

    A retried attempt keeps its round's rate, and so does a resumed run: the rate is a function of the round.

    >>> round_lr(0.1, 1.0, 50), round_lr(0.2, 0.5, 1), round_lr(0.2, 0.5, 3)
    (0.1, 0.2, 0.05)
    """
    return lr * decay ** max(round - 1, 0)


def quorum_count(quorum: float, sampled: int) -> int:
    """Answers a round needs by its deadline: ceil(quorum × sampled), at least one."""
    return max(1, math.ceil(quorum * sampled - 1e-9))


class BufferPool:
    """A few reusable buffers of one size, so that concurrent uploads do not each allocate a model.

    The pool caps memory at ``limit`` model-sized buffers however many uploads arrive at once;
    further uploads wait for a buffer while their bytes stay in the kernel's socket queue.
    """

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self._free: list[bytearray] = []
        self._sem = asyncio.Semaphore(limit)

    @asynccontextmanager
    async def buffer(self) -> AsyncIterator[bytearray]:
        async with self._sem:
            buf = self._free.pop() if self._free else bytearray(self.size)
            try:
                yield buf
            finally:
                self._free.append(buf)

    def release(self) -> None:
        """Let the spare buffers go (the round is over; uploads still running keep theirs)."""
        self._free.clear()


POOL_BYTES = 256 * 1024 * 1024


def pool_limit(size: int, most: int = 4) -> int:
    """Model-sized upload buffers a round may hold: up to ``most``, but no more than ``POOL_BYTES`` in all
    beyond the first. A 40 MB model keeps 4 uploads going at once; a 500 MB one takes them one at a time
    (their bytes wait in the socket queues), so that the buffers never cost more memory than the model."""
    return max(1, min(most, POOL_BYTES // max(size, 1)))


@dataclass(frozen=True)
class Answer:
    """One accepted update: its example count, its validated metrics and the L2 norm of its delta."""

    num_examples: int
    metrics: dict[str, float]
    norm: float


@dataclass
class RoundState:
    round: int
    attempt: int
    kind: Kind
    sampled: list[str]
    needed: int
    schema: Schema
    accumulator: WeightedSum | Stack | MaskedSum
    deadline: float  # time.monotonic()
    pool: BufferPool
    started: float = field(default_factory=time.monotonic)
    answered: dict[str, Answer] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    declined: set[str] = field(default_factory=set)  # sampled workers that said they will not answer
    closed: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    last_answer: float | None = None
    rejected: int = 0  # uploads for this attempt refused with a 4xx
    metrics_dropped: int = 0  # worker-sent metrics dropped as invalid
    in_sample: frozenset[str] = field(init=False)  # ``sampled`` as a set

    def __post_init__(self) -> None:
        # Asked of every update and instruction: a set, or a round of 10,000 would cost 10,000² steps.
        self.in_sample = frozenset(self.sampled)

    def narrow(self, sampled: list[str]) -> None:
        """Keep only ``sampled`` of the sample (secure aggregation drops those that did not deal shares)."""
        self.sampled = sampled
        self.in_sample = frozenset(sampled)

    @property
    def pending(self) -> list[str]:
        return [w for w in self.sampled if w not in self.answered]

    def worker_metrics(self) -> dict[str, float]:
        """Example-weighted mean of each metric the workers reported (validation ones apart), over the
        workers that reported it."""
        return mean_metrics([(a.num_examples, a.metrics) for a in self.answered.values()])

    def federated_eval(self, low: float = 0.0) -> FederatedEval | None:
        """The global model as scored on the workers' own validation splits, or None when no worker
        reported a usable score (one in [``low``, 1])."""
        return federated_eval([a.metrics for a in self.answered.values()], low)


def mean_metrics(reports: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Σ nᵢ mᵢ / Σ nᵢ per metric name, over the reports that hold it (``val_`` names apart). The
    values are validated already (finite, bounded), so the sums cannot overflow. Label counts
    (``label_count_<k>``) are left out. At most
    ``MAX_WORKER_METRICS`` names are kept, those reported for the most examples: one worker's 32 odd
    names cannot push out the ones every worker reports.

    >>> mean_metrics([(1, {"train_loss": 1.0}), (3, {"train_loss": 2.0, "train_s": 4.0, "label_count_0": 3.0})])
    {'train_loss': 1.75, 'train_s': 4.0}
    """
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for n, metrics in reports:
        for name, value in metrics.items():
            # A worker's label counts are its own (the per-worker views read them); their mean is no metric.
            if not name.startswith("val_") and not is_label_count(name):
                sums[name] = sums.get(name, 0.0) + n * value
                counts[name] = counts.get(name, 0.0) + n
    kept = sorted((n for n in sums if counts[n] > 0), key=lambda n: (-counts[n], n))[:MAX_WORKER_METRICS]
    return {name: sums[name] / counts[name] for name in sorted(kept)}


@dataclass(frozen=True)
class FederatedEval:
    accuracy: float
    loss: float
    accuracy_std: float
    accuracy_min: float
    accuracy_max: float
    examples: int


def federated_eval(reports: list[dict[str, float]], low: float = 0.0) -> FederatedEval | None:
    """Mean of the workers' validation scores weighted by their split sizes, and the spread across
    workers. A report counts only if it has ``val_examples`` > 0, ``val_accuracy`` (the task's score) in
    [``low``, 1] and a ``val_loss``: any other subset of keys is skipped, never an error. ``low`` is 0 for
    an accuracy; an R² is negative for a model worse than the mean, and counts too (``score_low``).

    >>> federated_eval([{"val_examples": 1.0}, {"val_examples": 2, "val_accuracy": 0.5, "val_loss": 1.0}])
    FederatedEval(accuracy=0.5, loss=1.0, accuracy_std=0.0, accuracy_min=0.5, accuracy_max=0.5, examples=2)
    """
    scored = [m for m in reports
              if m.get("val_examples", 0) > 0 and low <= m.get("val_accuracy", low - 1) <= 1 and "val_loss" in m]
    if not scored:
        return None
    n = np.array([m["val_examples"] for m in scored], dtype=np.float64)
    acc = np.array([m["val_accuracy"] for m in scored], dtype=np.float64)
    loss = np.array([m["val_loss"] for m in scored], dtype=np.float64)
    mean = float(np.average(acc, weights=n))
    return FederatedEval(accuracy=mean, loss=float(np.average(loss, weights=n)),
                         accuracy_std=float(np.sqrt(np.average((acc - mean) ** 2, weights=n))),
                         accuracy_min=float(acc.min()), accuracy_max=float(acc.max()), examples=int(n.sum()))


def new_round(round: int, attempt: int, kind: Kind, sampled: list[str], quorum: float, schema: Schema,
              accumulator: WeightedSum | Stack | MaskedSum, timeout: float, pool_size: int | None = None) -> RoundState:
    size = sum(s.nbytes for s in schema)
    return RoundState(round=round, attempt=attempt, kind=kind, sampled=sampled,
                      needed=quorum_count(quorum, len(sampled)), schema=schema,
                      accumulator=accumulator, deadline=time.monotonic() + timeout,
                      pool=BufferPool(size, pool_size if pool_size is not None else pool_limit(size)))
