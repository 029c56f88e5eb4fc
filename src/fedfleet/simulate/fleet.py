"""The simulated clients' side of a run: the coordinator's engine, driven in this process.

The engine is the one ``fedfleet coordinator`` runs (its round loop, strategies, records, checkpoints),
opened on the run folder. Its clients are residents (``Engine.add_residents``): alive without a socket.
``drive`` hands each sampled client's instruction (``Engine.work``, what its long-poll would return) to
an executor as a job, and puts each answer through ``Engine.intake`` exactly as an HTTP upload is put:
the same checks, the same fold into the running sum as answers finish, the same records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import TypeVar

from fedfleet import log
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import FedfleetError, ProtocolError, RequestRejected
from fedfleet.protocol.messages import StatsInstruction, TrainInstruction
from fedfleet.simulate.client import Outcome, make_job
from fedfleet.simulate.executors import Executors

T = TypeVar("T")


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


class Fleet:
    """The residents of one engine and the executors that train them."""

    def __init__(self, engine: Engine, executors: Executors, residents: list[tuple[str, int]]) -> None:
        self.engine = engine
        self.executors = executors
        # Partition numbers only: what a client is told of its partition is made when it is sampled.
        self._partitions: dict[str, int] = dict(residents)
        self._published = -1
        self._slots = asyncio.Semaphore(executors.count)  # batches given out: one per executor at a time

    async def drive(self) -> None:
        """Dispatch work as rounds open until the run is over (``engine.done``)."""
        dispatched: set[tuple[int, int, str]] = set()
        running: set[asyncio.Task[None]] = set()
        done = asyncio.create_task(self.engine.done.wait())
        try:
            while not done.done():
                # Taken before reading: no change can slip between. Not the progress event: every answer sets
                # that, and reading the work of a round of 10,000 on each would be 10,000² steps.
                changed = self.engine.work_event()
                work = self.engine.work()
                if work:
                    at = (work[0][1].round, work[0][1].attempt)
                    # Only the open attempt's keys are worth keeping: an attempt run again gets new ones.
                    dispatched = {k for k in dispatched if k[:2] == at}
                new = [(wid, msg) for wid, msg in work if (msg.round, msg.attempt, wid) not in dispatched]
                dispatched.update((msg.round, msg.attempt, wid) for wid, msg in new)
                for batch in batches(new, self.executors.count):
                    job = asyncio.create_task(self._answer(batch))
                    running.add(job)
                    job.add_done_callback(running.discard)
                waiter = asyncio.create_task(changed.wait())
                await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            for job in running:
                job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*running, return_exceptions=True)
            done.cancel()

    async def _answer(self, batch: list[tuple[str, TrainInstruction | StatsInstruction]]) -> None:
        msg = batch[0][1]  # every instruction of a batch is of one round attempt, so of one model version
        if isinstance(msg, TrainInstruction) and msg.model_version != self._published:
            version, body = self.engine.model_download()
            if version != msg.model_version:
                return  # the model moved on since the instruction was read: its round is over
            self.executors.publish(version, body)
            self._published = version
        jobs = [make_job(wid, self.engine.partition_info(self._partitions[wid]), m) for wid, m in batch]
        async with self._slots:
            if not self.engine.is_open(msg.round, msg.attempt):
                return  # the attempt closed while the batch waited for an executor: an attempt run again
                # must not queue behind the clients of the one before
            try:
                outcomes = await self.executors.run(jobs)
            except Exception as exc:  # an executor's failure is its clients', never the run's
                outcomes = [Outcome(wid, None, "its executor failed", error=repr(exc)) for wid, _ in batch]
        for outcome, (_, m) in zip(outcomes, batch, strict=True):
            if outcome.error:
                log.event("client.failed", logging.ERROR, run=self.engine.run_id, worker=outcome.worker_id,
                          round=m.round, error=outcome.error)
                self.engine.decline(outcome.worker_id, m.round, m.attempt, f"{outcome.problem}: {outcome.error}")
                continue
            await self._deliver(outcome, m)

    async def _deliver(self, outcome: Outcome, msg: TrainInstruction | StatsInstruction) -> None:
        if outcome.dropped_metrics:
            log.event("client.metrics_dropped", logging.WARNING, worker=outcome.worker_id, round=msg.round,
                      nonfinite=", ".join(outcome.dropped_metrics))
        if outcome.body is None:
            self.engine.decline(outcome.worker_id, msg.round, msg.attempt, outcome.problem)
            return

        def authorize(worker_id: str) -> None:
            if worker_id != outcome.worker_id:
                raise ProtocolError(f"an update made for {outcome.worker_id} names {worker_id!r}", status=403,
                                    reason="forbidden")

        try:
            await self.engine.intake.receive(_one_chunk(outcome.body), str(len(outcome.body)), authorize)
        except RequestRejected as exc:  # the round closed while the client trained: as for a late upload
            log.event("client.late", logging.DEBUG, worker=outcome.worker_id, round=msg.round, reason=str(exc))
        except FedfleetError as exc:
            log.event("client.refused", logging.WARNING, run=self.engine.run_id, worker=outcome.worker_id,
                      round=msg.round, reason=str(exc))
            self.engine.decline(outcome.worker_id, msg.round, msg.attempt, f"its update was refused: {exc}")


MAX_BATCH = 64  # clients in one message to an executor


def batches(work: list[T], executors: int) -> list[list[T]]:
    """``work`` cut into batches, one message to an executor each: about four per executor, so the load
    stays balanced and answers are folded as they come, but at most ``MAX_BATCH`` clients each, so that a
    round of thousands (a statistics round over every client) does not pay a round trip per client.

    >>> [len(b) for b in batches(list(range(10)), executors=2)]
    [2, 2, 2, 2, 2]
    >>> [len(b) for b in batches(list(range(1000)), executors=2)][:3]
    [64, 64, 64]
    """
    size = max(1, min(MAX_BATCH, math.ceil(len(work) / (4 * executors))))
    return [work[i:i + size] for i in range(0, len(work), size)]
