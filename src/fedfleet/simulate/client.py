"""One simulated client's turn: what a worker does with one instruction, without a socket.

A ``Job`` carries what a real worker would have: its partition (as registration tells it) and the
instruction (as its long-poll would return it, in the same JSON). ``run_job`` builds the client's state
(a ``Trainer`` on its partition) when the job starts and drops it after, so an executor's memory does
not grow with the number of clients. Its answer is the update a worker would upload: a safetensors body
with ``UpdateMeta`` in its header, which the coordinator takes through the same intake as an upload, or
the reason there is none (the fit diverged). The steps and metrics are those of ``worker.agent``: score
the global model on the validation split, then train; so the same seed gives the same model as ``run``;
and, when the coordinator asks for them, the client's label counts (``label_count_<k>``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedfleet.protocol import codec
from fedfleet.protocol.messages import (
    INSTRUCTION,
    UPDATE_META_KEY,
    PartitionInfo,
    StatsInstruction,
    TrainInstruction,
    UpdateMeta,
)
from fedfleet.tasks import Task
from fedfleet.types import Weights
from fedfleet.worker.trainer import Trainer, finite_metrics, nonfinite_tensors


@dataclass(frozen=True)
class Job:
    worker_id: str
    partition: str  # PartitionInfo as JSON
    instruction: str  # a TrainInstruction or StatsInstruction as JSON, as the long-poll returns it
    model_version: int  # the model it trains from (-1: it needs none, a statistics round)


@dataclass(frozen=True)
class Outcome:
    worker_id: str
    body: bytes | None  # the update as a worker uploads it; None when there is nothing to send
    problem: str  # why there is no body ("" when there is one)
    dropped_metrics: tuple[str, ...] = ()  # non-finite metrics left out of the update
    seconds: float = 0.0  # the job's time in the executor
    error: str = ""  # what the job raised (a bug in the task, say); "" if it ran to the end


def make_job(worker_id: str, partition: PartitionInfo, msg: TrainInstruction | StatsInstruction) -> Job:
    version = msg.model_version if isinstance(msg, TrainInstruction) else -1
    return Job(worker_id, partition.model_dump_json(), msg.model_dump_json(), version)


def run_job(task: Task, job: Job, model: Weights | None) -> Outcome:
    """Do ``job`` with ``task`` from ``model`` (the global model of ``job.model_version``)."""
    t0 = time.perf_counter()
    msg = INSTRUCTION.validate_json(job.instruction)
    if not isinstance(msg, TrainInstruction | StatsInstruction):
        raise ValueError(f"a simulated client takes train and stats instructions, not {msg.kind!r}")
    trainer = Trainer(task, PartitionInfo.model_validate_json(job.partition))
    if isinstance(msg, StatsInstruction):
        weights, n = trainer.stats()
        raw: dict[str, float] = {}
    else:
        if model is None:
            raise ValueError(f"job for {job.worker_id} needs model {job.model_version}, and none was given")
        validation = trainer.evaluate(model)  # the global model as it reached the client, before training
        t_fit = time.perf_counter()
        result = trainer.fit(model, msg.params)
        weights, n = result.weights, result.num_examples
        raw = {**result.metrics, **validation, "train_s": time.perf_counter() - t_fit}
        if msg.params.report_labels and msg.secagg is None:  # as a worker: never under DP or secure aggregation
            raw |= trainer.label_metrics()
    tensors = nonfinite_tensors(weights)
    metrics, dropped = finite_metrics(raw)
    if tensors:
        return Outcome(job.worker_id, None, f"diverged: non-finite values in {', '.join(tensors)}",
                       tuple(dropped), time.perf_counter() - t0)
    meta = UpdateMeta(worker_id=job.worker_id, round=msg.round, attempt=msg.attempt, num_examples=max(n, 1),
                      metrics={**metrics})
    body = codec.encode(weights, {UPDATE_META_KEY: meta.model_dump_json()})
    return Outcome(job.worker_id, body, "", tuple(dropped), time.perf_counter() - t0)
