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

from fedfleet.strategies.accumulate import Stack, WeightedSum
from fedfleet.types import Schema

Kind = Literal["stats", "train"]


def sample(candidates: Sequence[str], fraction: float, at_least: int, seed: int, round: int,
           attempt: int) -> list[str]:
    """ceil(fraction × candidates), at least ``at_least``, chosen reproducibly; the rest keep their order.

    >>> sample(["a", "b", "c", "d"], 0.5, 1, seed=0, round=1, attempt=0)
    ['b', 'c']
    """
    # The epsilon keeps 0.07 × 100 = 7.000000000000001 from becoming 8.
    k = min(len(candidates), max(at_least, math.ceil(fraction * len(candidates) - 1e-9)))
    rng = np.random.default_rng([seed, round, attempt, 0x5A])
    chosen = sorted(rng.choice(len(candidates), size=k, replace=False).tolist())
    return [candidates[i] for i in chosen]


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


@dataclass
class RoundState:
    round: int
    attempt: int
    kind: Kind
    sampled: list[str]
    needed: int
    schema: Schema
    accumulator: WeightedSum | Stack
    deadline: float  # time.monotonic()
    pool: BufferPool
    started: float = field(default_factory=time.monotonic)
    answered: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)
    closed: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    last_answer: float | None = None

    @property
    def pending(self) -> list[str]:
        return [w for w in self.sampled if w not in self.answered]

    def train_metrics(self) -> dict[str, float]:
        """Example-weighted means of the workers' local training metrics (validation ones apart)."""
        total = sum(n for n, _ in self.answered.values())
        keys = sorted({k for _, m in self.answered.values() for k in m if not k.startswith("val_")})
        return {k: sum(n * m.get(k, 0.0) for n, m in self.answered.values()) / total for k in keys} if total else {}

    def federated_eval(self) -> dict[str, float]:
        """The global model as scored on the workers' own validation splits: the mean weighted by their
        sizes, and the spread across workers (``fed_`` keys); empty when no worker kept a split."""
        scored = [m for _, m in self.answered.values() if m.get("val_examples", 0) > 0]
        if not scored:
            return {}
        n = np.array([m["val_examples"] for m in scored])
        acc = np.array([m["val_accuracy"] for m in scored])
        loss = np.array([m["val_loss"] for m in scored])
        mean = float(np.average(acc, weights=n))
        return {"fed_accuracy": mean, "fed_loss": float(np.average(loss, weights=n)),
                "fed_accuracy_std": float(np.sqrt(np.average((acc - mean) ** 2, weights=n))),
                "fed_accuracy_min": float(acc.min()), "fed_accuracy_max": float(acc.max()),
                "fed_examples": float(n.sum())}


def new_round(round: int, attempt: int, kind: Kind, sampled: list[str], quorum: float, schema: Schema,
              accumulator: WeightedSum | Stack, timeout: float, pool_size: int | None = None) -> RoundState:
    size = sum(s.nbytes for s in schema)
    return RoundState(round=round, attempt=attempt, kind=kind, sampled=sampled,
                      needed=quorum_count(quorum, len(sampled)), schema=schema,
                      accumulator=accumulator, deadline=time.monotonic() + timeout,
                      pool=BufferPool(size, pool_size if pool_size is not None else pool_limit(size)))
