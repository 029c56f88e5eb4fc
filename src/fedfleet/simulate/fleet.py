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
from collections.abc import AsyncIterator

from fedfleet import log
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import FedfleetError, ProtocolError, RequestRejected
from fedfleet.protocol.messages import StatsInstruction, TrainInstruction
from fedfleet.simulate.client import Outcome, make_job
from fedfleet.simulate.executors import Executors


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
        self.jobs = 0  # jobs done, for the progress line
        self.failures: list[str] = []  # jobs that raised: a bug in the task, or an executor that died

    async def drive(self) -> None:
        """Dispatch work as rounds open until the run is over (``engine.done``)."""
        dispatched: set[tuple[int, int, str]] = set()
        running: set[asyncio.Task[None]] = set()
        done = asyncio.create_task(self.engine.done.wait())
        try:
            while not done.done():
                changed = self.engine.progress_event()  # taken before reading: no change can slip between
                work = self.engine.work()
                if work:
                    at = (work[0][1].round, work[0][1].attempt)
                    # Only the open attempt's keys are worth keeping: an attempt run again gets new ones.
                    dispatched = {k for k in dispatched if k[:2] == at}
                for wid, msg in work:
                    key = (msg.round, msg.attempt, wid)
                    if key in dispatched:
                        continue
                    dispatched.add(key)
                    job = asyncio.create_task(self._answer(wid, msg))
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

    async def _answer(self, worker_id: str, msg: TrainInstruction | StatsInstruction) -> None:
        if isinstance(msg, TrainInstruction) and msg.model_version != self._published:
            version, body = self.engine.model_download()
            if version != msg.model_version:
                return  # the model moved on since the instruction was read: its round is over
            self.executors.publish(version, body)
            self._published = version
        job = make_job(worker_id, self.engine.partition_info(self._partitions[worker_id]), msg)
        try:
            outcome = await self.executors.run(job)
        except Exception as exc:  # an executor's failure is the client's, never the run's
            self.failures.append(f"{worker_id}: {exc!r}")
            log.event("client.failed", logging.ERROR, run=self.engine.run_id, worker=worker_id, round=msg.round,
                      error=repr(exc))
            self.engine.decline(worker_id, msg.round, msg.attempt, f"its job failed: {exc!r}")
            return
        self.jobs += 1
        await self._deliver(outcome, msg)

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
