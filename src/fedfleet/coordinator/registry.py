"""Registered workers, their partitions and whether they are alive."""

from __future__ import annotations

import heapq
import time
import uuid
from dataclasses import dataclass

from fedfleet.errors import RequestRejected
from fedfleet.partition import partition_name
from fedfleet.storage.sqlite import Store, WorkerRow


@dataclass
class WorkerState:
    worker_id: str
    partition: int
    name: str
    last_seen: float  # time.monotonic()
    rounds_served: int = 0
    polling: int = 0  # long-polls held open right now: a worker waiting on one is alive
    stopped: bool = False  # has been told that the run is over
    last_train_s: float | None = None  # its last update's local training time, for the dashboard


class Registry:
    """Assigns each worker a partition at registration and keeps it for that worker id.

    A new worker takes a free partition; when none is free it takes over the partition of a worker
    that has been dead for longer than ``worker_timeout``; otherwise it is turned away (409).
    """

    def __init__(self, store: Store, partitions: int, worker_timeout: float, known: list[WorkerRow]) -> None:
        self.store = store
        self.partitions = partitions
        self.worker_timeout = worker_timeout
        now = time.monotonic()
        # Workers known from an earlier life of this data dir count as seen now, so that they have
        # worker_timeout to come back before their partitions are handed to others.
        self.workers: dict[str, WorkerState] = {
            r.worker_id: WorkerState(r.worker_id, r.partition, r.name, now, r.rounds_served)
            for r in known
        }
        # The partitions nobody holds, lowest first: a registration takes one in O(log N) instead of scanning
        # every partition and worker (O(N) each, O(N^2) for a fleet joining).
        taken = {w.partition for w in self.workers.values()}
        self._free = [p for p in range(partitions) if p not in taken]
        heapq.heapify(self._free)

    def register(self, worker_id: str | None, name: str) -> WorkerState:
        if worker_id is not None and worker_id in self.workers:
            w = self.workers[worker_id]
            w.last_seen = time.monotonic()
            w.stopped = False
            if name and name != w.name:
                w.name = name
                self.store.put_worker(w.worker_id, w.partition, name)
            return w
        worker_id = worker_id or uuid.uuid4().hex[:16]
        evict: WorkerState | None = None
        if self._free:
            partition = self._free[0]
        else:
            dead = [w for w in self.workers.values() if not self.alive(w)]
            if not dead:
                raise RequestRejected(f"all {self.partitions} partitions are taken by live workers; start the "
                                     "coordinator with a larger --workers to admit more", status=409)
            evict = min(dead, key=lambda w: w.last_seen)
            partition = evict.partition
        self.store.put_worker(worker_id, partition, name, evict=evict.worker_id if evict else None)
        if evict is not None:
            del self.workers[evict.worker_id]
        else:
            heapq.heappop(self._free)  # taken only once it is stored: a failed write leaves it free
        w = WorkerState(worker_id, partition, name, time.monotonic())
        self.workers[worker_id] = w
        return w

    def register_many(self, names: list[str]) -> list[WorkerState]:
        """New workers on the free partitions, lowest first, one per name, recorded in one transaction
        (``fedfleet simulate``'s clients); raises 409 if there are fewer free partitions than names."""
        if len(self._free) < len(names):
            raise RequestRejected(f"{len(names)} workers asked to join but only {len(self._free)} of the "
                                  f"{self.partitions} partitions are free", status=409)
        free = heapq.nsmallest(len(names), self._free)
        now = time.monotonic()
        added = [WorkerState(uuid.uuid4().hex[:16], p, name, now) for p, name in zip(free, names, strict=True)]
        self.store.put_workers([(w.worker_id, w.partition, w.name) for w in added])
        self.workers.update((w.worker_id, w) for w in added)
        for _ in added:
            heapq.heappop(self._free)
        return added

    def remove(self, worker_id: str) -> None:
        """Forget a worker the run cannot use (its data was refused): its partition is free for another."""
        w = self.workers.get(worker_id)
        if w is not None:
            self.store.delete_worker(worker_id)
            del self.workers[worker_id]
            heapq.heappush(self._free, w.partition)

    def get(self, worker_id: str) -> WorkerState:
        w = self.workers.get(worker_id)
        if w is None:
            raise RequestRejected(f"unknown worker {worker_id!r}: register first (POST /v1/workers)",
                                 status=404, worker=worker_id)
        return w

    def touch(self, worker_id: str) -> WorkerState:
        w = self.get(worker_id)
        w.last_seen = time.monotonic()
        return w

    def alive(self, w: WorkerState) -> bool:
        return w.polling > 0 or time.monotonic() - w.last_seen < self.worker_timeout

    def live(self) -> list[WorkerState]:
        # One clock read for all: this runs every round over every registered worker (10,000 in a simulation).
        since = time.monotonic() - self.worker_timeout
        return sorted((w for w in self.workers.values() if w.polling > 0 or w.last_seen > since),
                      key=_by_partition)

    def count_live(self) -> int:
        """How many workers are alive, for views: without building and sorting the list ``live`` returns."""
        since = time.monotonic() - self.worker_timeout
        return sum(1 for w in self.workers.values() if w.polling > 0 or w.last_seen > since)

    def partition_label(self, w: WorkerState) -> str:
        return partition_name(w.partition, self.partitions)


def _by_partition(w: WorkerState) -> int:
    return w.partition
