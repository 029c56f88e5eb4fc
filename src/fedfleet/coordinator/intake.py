"""The one way from HTTP into a round: every update, one-shot (``POST /v1/updates``) or resumable
(``/v1/uploads``), passes the same checks, is folded the same way and is counted once.

    admit      the open round can take it: right round and attempt, sampled, not a duplicate (409);
               its header fits the round's schema (422)
    begin      admit and reserve the worker's slot (a second upload meanwhile is a duplicate)
    commit     check the values and fold them into the round's running sum, or refuse (4xx) and leave
               the sum untouched; record the update durably; keep only valid worker metrics. With
               central DP (``clip``), the update is measured first (its delta's L2 norm) and folded
               scaled by min(1, C/norm), unweighted by its example count: clipped at commit, in the same
               bounded memory as any fold
    abort      give the slot back (the upload failed before it was committed)

A worker is untrusted input, even with a valid token. What it sends may not change the coordinator's
own records (its metrics go to ``RoundRecord.worker_metrics`` after validation), stop the run (every
failure here is a 4xx for that one upload) or make the model non-finite (values are checked finite,
optionally bounded in norm, and statistics are range-checked by the task).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import ClientDisconnect

from fedfleet import log
from fedfleet.coordinator.body import BodyReader
from fedfleet.coordinator.metrics import CoordinatorMetrics
from fedfleet.coordinator.registry import Registry
from fedfleet.coordinator.rounds import Answer, RoundState
from fedfleet.errors import ProtocolError, RequestRejected
from fedfleet.protocol import codec
from fedfleet.protocol.codec import Header
from fedfleet.protocol.messages import UpdateAck, UpdateMeta
from fedfleet.secagg.server import MaskedSum
from fedfleet.storage.records import clean_worker_metrics
from fedfleet.storage.sqlite import Store, UpdateRow
from fedfleet.strategies.accumulate import Stack, WeightedSum, delta_norm
from fedfleet.strategies.privacy import clip_factor
from fedfleet.tasks import Task
from fedfleet.types import Schema, Weights

if TYPE_CHECKING:  # the intake only calls it; the engine owns it
    from fedfleet.coordinator.secure import SecureAggregation

HEADER_SLACK = 64 * 1024  # room for an update's JSON header beyond its tensor bytes
INLINE_BYTES = 1 << 20  # numpy work on less than this runs inline; more goes to a thread
PIECE = 16 * 1024 * 1024  # bytes read from a spool at a time when checking and folding it


@dataclass(frozen=True)
class Slot:
    """An update admitted to the open round, its slot reserved until it is committed or aborted."""

    round: RoundState
    meta: UpdateMeta
    header: Header


class UpdateIntake:
    def __init__(self, *, task: Task, store: Store, registry: Registry, metrics: CoordinatorMetrics,
                 model_schema: Callable[[], Schema], notify: Callable[[], None], run_id: str,
                 max_update_norm: float | None, clip: float | None = None,
                 secure: SecureAggregation | None = None) -> None:
        self.task = task
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.model_schema = model_schema
        self.notify = notify
        self.run_id = run_id
        self.max_update_norm = max_update_norm
        self.clip = clip  # --dp-clip, with --dp central
        self.secure = secure  # --secure-aggregation: training updates arrive masked, in its masked phase
        self.round: RoundState | None = None  # the round attempt that is open, set by the engine
        # Held while an update is folded, and by the engine while it aggregates: a round's sum is never
        # read half-folded.
        self.lock = asyncio.Lock()
        self._rows: list[UpdateRow] = []  # accepted updates to record in the next commit
        self._committed: asyncio.Future[None] | None = None  # done when they are

    # --- rejections ------------------------------------------------------------------------------
    def rejected(self, exc: BaseException) -> None:
        """Count a refused upload (by reason, and against the open round)."""
        self.metrics.update_rejected(exc)
        if self.round is not None and not self.round.closed:
            self.round.rejected += 1

    # --- admission -------------------------------------------------------------------------------
    def max_update_bytes(self) -> int:
        rs = self.round
        schema = rs.schema if rs is not None else self.model_schema()
        return sum(s.nbytes for s in schema) + HEADER_SLACK

    def admit(self, meta: UpdateMeta, header: Header | None) -> RoundState:
        """The open round, if it can take this update (409 if not) and ``header`` fits its schema (422);
        a refusal is counted."""
        try:
            return self._admit(meta, header)
        except Exception as exc:
            self.rejected(exc)
            raise

    def _admit(self, meta: UpdateMeta, header: Header | None) -> RoundState:
        self.registry.touch(meta.worker_id)
        rs = self.round
        if rs is None:
            raise RequestRejected(f"no round is open; update for round {meta.round} is not needed",
                                  round=meta.round, worker=meta.worker_id, reason="stale")
        problem = _slot_problem(rs, meta)
        if problem is not None:
            reason, message = problem
            raise RequestRejected(message, round=meta.round, worker=meta.worker_id, reason=reason)
        if self.secure is not None and rs.kind == "train":
            refusal = self.secure.upload_problem(rs, meta.worker_id, meta.num_examples)
            if refusal is not None:
                status, message = refusal
                if status == 409:
                    raise RequestRejected(message, round=meta.round, worker=meta.worker_id, reason="stale")
                raise ProtocolError(message, status=status, reason="bad_metadata")
        if header is not None:
            codec.check_schema(header, rs.schema)
        return rs

    def begin(self, meta: UpdateMeta, header: Header) -> Slot:
        rs = self.admit(meta, header)
        rs.in_flight.add(meta.worker_id)
        return Slot(rs, meta, header)

    def abort(self, slot: Slot) -> None:
        slot.round.in_flight.discard(slot.meta.worker_id)
        self.notify()

    # --- commit ----------------------------------------------------------------------------------
    async def commit(self, slot: Slot, weights: Weights) -> UpdateAck:
        """Check ``weights`` (the update's tensors, in memory) and fold them in; a refusal is counted."""
        try:
            norm = await _compute(slot.header.total_bytes, self._check_values, slot, weights)
            acc = slot.round.accumulator
            return await self._fold(slot, lambda weight: acc.add(weights, weight), norm)
        except Exception as exc:
            self.rejected(exc)
            raise

    async def commit_file(self, slot: Slot, path: Path) -> UpdateAck:
        """Check and fold an update spooled to ``path``, reading it a piece at a time (memory stays
        bounded however large the model); a refusal is counted."""
        try:
            acc = slot.round.accumulator
            if slot.round.kind == "stats":
                # Statistics are small and checked whole by the task.
                weights = await asyncio.to_thread(read_file, path, slot.header)
                self._check_values(slot, weights)
                return await self._fold(slot, lambda weight: acc.add(weights, weight), None)
            norm = await asyncio.to_thread(scan_file, path, slot.header, acc.base, self._measures(slot))
            if norm is not None:
                self._check_norm(norm)
            return await self._fold(slot, lambda weight: fold_file(acc, slot.header, path, weight), norm)
        except Exception as exc:
            self.rejected(exc)
            raise

    def _measures(self, slot: Slot) -> bool:
        """Whether an update's delta norm is needed before it is folded: to check ``--max-update-norm``, or to
        clip it (``--dp central``). Only then is the float64 pass over the delta paid."""
        return slot.round.kind == "train" and (self.max_update_norm is not None or self.clip is not None)

    def _check_values(self, slot: Slot, weights: Weights) -> float | None:
        """Raise 422 naming the problem unless the update's values may be folded: finite, within
        ``--max-update-norm`` if set, and for statistics, plausible to the task. Returns the L2 norm of its
        delta when ``_measures``, else None."""
        rs, meta = slot.round, slot.meta
        norm = None
        if self._measures(slot):
            norm, bad = delta_norm(weights, rs.accumulator.base)
            if bad is not None:
                codec.check_finite({bad: weights[bad]})  # raises the same 422 as the plain check
            self._check_norm(norm)
        else:
            codec.check_finite(weights)
        if rs.kind == "stats":
            problem = self.task.check_stats(weights, meta.num_examples)
            if problem is not None:
                raise ProtocolError(f"statistics are implausible: {problem}", status=422, reason="bad_stats")
        return norm

    def _weight(self, slot: Slot, norm: float | None) -> float:
        """The update's weight in the round's sum: 1 for statistics; its example count for FedAvg; with
        central DP its clip factor min(1, C/norm), never its example count, which the worker itself sends
        and so could set its own influence with."""
        if slot.round.kind != "train":
            return 1.0
        if self.clip is None:
            return float(slot.meta.num_examples)
        if norm is None:
            raise RuntimeError("an update under central DP reached its fold unmeasured")
        return clip_factor(norm, self.clip)

    def _check_norm(self, norm: float) -> None:
        bound = self.max_update_norm
        if bound is not None and not norm <= bound:
            raise ProtocolError(f"update's delta from the global model has L2 norm {norm:.6g}, over the bound "
                                f"{bound:g} (--max-update-norm)", status=422, reason="norm")

    async def _fold(self, slot: Slot, fold: Callable[[float], float], norm: float | None) -> UpdateAck:
        """Fold with ``fold(weight)``, which returns the L2 norm of the update's delta (in a thread for
        large updates; it must leave the sum untouched if it raises), then record and account for it.
        ``norm`` is the delta's norm measured before, if it was (``_measures``)."""
        rs, meta = slot.round, slot.meta
        weight = self._weight(slot, norm)
        metrics, dropped = clean_worker_metrics(meta.metrics) if rs.kind == "train" else ({}, {})
        async with self.lock:
            if rs.closed:
                raise RequestRejected(f"round {rs.round} closed while the update was arriving",
                                      round=rs.round, worker=meta.worker_id, reason="stale")
            norm = await _compute(slot.header.total_bytes, fold, weight)
            durable = self._record(UpdateRow(rs.round, rs.attempt, meta.worker_id, meta.num_examples, metrics))
            rs.answered[meta.worker_id] = Answer(meta.num_examples, metrics, norm)
            rs.bytes_in += slot.header.total_bytes
            rs.last_answer = time.monotonic()
        # Acknowledged only once recorded: outside the lock, so that the updates folded meanwhile share the commit.
        await durable
        rs.in_flight.discard(meta.worker_id)
        worker = self.registry.workers.get(meta.worker_id)
        if worker is not None and "train_s" in metrics:
            worker.last_train_s = metrics["train_s"]
        if dropped:
            rs.metrics_dropped += sum(dropped.values())
            self.metrics.worker_metrics_dropped(dropped)
            log.event("update.metrics_dropped", logging.WARNING, run=self.run_id, round=rs.round,
                      worker=meta.worker_id, **{f"dropped_{k}": v for k, v in dropped.items()})
        self.metrics.update_accepted(rs.kind, slot.header.total_bytes)
        log.event("update.accepted", logging.DEBUG, run=self.run_id, round=rs.round, worker=meta.worker_id,
                  examples=meta.num_examples)
        self.notify()
        return UpdateAck(accepted=True, round=rs.round, received=len(rs.answered), expected=len(rs.sampled))

    def _record(self, row: UpdateRow) -> asyncio.Future[None]:
        """Queue ``row`` for the state database; the future is done once it is committed. The rows queued in
        one turn of the event loop go in one transaction (a commit costs 0.5-1 ms here; a row 0.04 ms)."""
        self._rows.append(row)
        if self._committed is None:
            loop = asyncio.get_running_loop()
            self._committed = loop.create_future()
            loop.call_soon(self._commit)
        return self._committed

    def _commit(self) -> None:
        rows, self._rows = self._rows, []
        done, self._committed = self._committed, None
        if done is None:
            return
        try:
            self.store.record_updates(rows)
        except Exception as exc:  # each waiting upload gets the storage error, none is acknowledged
            done.set_exception(exc)
        else:
            done.set_result(None)

    # --- the one-shot path -----------------------------------------------------------------------
    async def receive(self, chunks: AsyncIterator[bytes], content_length: str | None,
                      authorize: Callable[[str], None]) -> UpdateAck:
        """An update sent as one safetensors body, folded while it streams in; ``authorize(worker_id)``
        raises unless the request may act for that worker. Every refusal is counted once."""
        try:
            return await self._receive(chunks, content_length, authorize)
        except Exception as exc:
            self.rejected(exc)
            raise

    async def _receive(self, chunks: AsyncIterator[bytes], content_length: str | None,
                       authorize: Callable[[str], None]) -> UpdateAck:
        limit = self.max_update_bytes()
        if content_length is not None:
            if not content_length.isdigit():
                raise ProtocolError(f"Content-Length {content_length!r} is not a number")
            if int(content_length) > limit:
                raise ProtocolError(f"update of {content_length} bytes is over the limit of {limit} bytes for "
                                    "this model", status=413)
        reader = BodyReader(chunks)
        try:
            header = await read_header(reader)
            meta = UpdateMeta.from_metadata(header.metadata)
            authorize(meta.worker_id)
            rs = self._admit(meta, header)
            rs.in_flight.add(meta.worker_id)
            slot = Slot(rs, meta, header)
            committed = False
            try:
                async with slot.round.pool.buffer() as buf:
                    view = memoryview(buf)[: header.data_bytes]
                    got = await reader.readinto(view)
                    if got < header.data_bytes:
                        raise ProtocolError(f"body is truncated: {got} of {header.data_bytes} tensor bytes arrived")
                    await reader.expect_end(limit)
                    weights = codec.views(header, view)
                    norm = await _compute(header.total_bytes, self._check_values, slot, weights)
                    acc = slot.round.accumulator
                    ack = await self._fold(slot, lambda weight: acc.add(weights, weight), norm)
                    committed = True
            finally:
                if not committed:
                    self.abort(slot)
        except ClientDisconnect as exc:
            raise ProtocolError("client disconnected before the whole update arrived") from exc
        return ack


def _slot_problem(rs: RoundState, meta: UpdateMeta) -> tuple[str, str] | None:
    """Why round attempt ``rs`` cannot take this update (HTTP 409) as (metrics reason, message), or None."""
    if (meta.round, meta.attempt) != (rs.round, rs.attempt):
        return "stale", (f"update is for round {meta.round} attempt {meta.attempt}, but the open round is "
                         f"{rs.round} attempt {rs.attempt}")
    if rs.closed:
        return "stale", f"round {rs.round} has closed; update came too late"
    if meta.worker_id not in rs.in_sample:
        return "not_sampled", f"worker {meta.worker_id} was not sampled for round {rs.round}"
    if meta.worker_id in rs.answered or meta.worker_id in rs.in_flight:
        return "duplicate", f"worker {meta.worker_id} already sent its update for round {rs.round}"
    return None


async def read_header(reader: BodyReader) -> Header:
    prefix = await reader.read_exact(8)
    n = codec.header_length(prefix)
    if n > HEADER_SLACK:
        raise ProtocolError(f"safetensors header of {n} bytes is over the limit of {HEADER_SLACK} bytes", status=413)
    return codec.parse_header(prefix + await reader.read_exact(n))


async def _compute(nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run numpy work on ``nbytes`` of data: in a thread when large, so transfers go on meanwhile (numpy
    releases the GIL); inline when small, where the hop to a thread would cost more than the work."""
    if nbytes >= INLINE_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


# --- reading a spool in bounded pieces -----------------------------------------------------------
def _read_at(fd: int, view: memoryview, offset: int, name: str) -> None:
    got = 0
    while got < len(view):
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            raise ProtocolError(f"upload ends early, in tensor {name!r}: its bytes disagree with its header",
                                status=422, reason="bad_body")
        got += k


def _pieces(fd: int, header: Header, buf: bytearray) -> Iterator[tuple[str, int, np.ndarray]]:
    """(tensor name, first element, values) for each piece of each tensor, the values viewing ``buf``
    (valid until the next piece)."""
    for spec, (begin, end) in zip(header.specs, header.offsets, strict=True):
        dtype = np.dtype(spec.dtype).newbyteorder("<")
        step = max(dtype.itemsize, len(buf) // dtype.itemsize * dtype.itemsize)
        for pos in range(begin, end, step):
            n = min(step, end - pos)
            _read_at(fd, memoryview(buf)[:n], header.size + pos, spec.name)
            yield spec.name, (pos - begin) // dtype.itemsize, np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)


def scan_file(path: Path, header: Header, base: Weights | None, with_norm: bool) -> float | None:
    """Check the update in ``path`` for NaN/Inf (422), reading ``PIECE`` bytes at a time; with ``with_norm``
    return the L2 norm of its delta from ``base`` too (``delta_norm``, piece by piece)."""
    total = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, start, values in _pieces(fd, header, bytearray(PIECE)):
            if values.dtype.kind != "f":
                continue
            codec.check_finite({name: values})
            if with_norm:
                ref = None if base is None else {name: base[name].reshape(-1)[start:start + values.size]}
                total += delta_norm({name: values}, ref)[0] ** 2
    finally:
        os.close(fd)
    return float(np.sqrt(total)) if with_norm else None


def read_file(path: Path, header: Header) -> Weights:
    """The whole update in ``path`` (for small ones, such as statistics)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        weights: Weights = {}
        for spec, (begin, _) in zip(header.specs, header.offsets, strict=True):
            array = np.empty(spec.shape, dtype=np.dtype(spec.dtype).newbyteorder("<"))
            _read_at(fd, array.reshape(-1).view(np.uint8).data, header.size + begin, spec.name)
            weights[spec.name] = array
        return weights
    finally:
        os.close(fd)


def fold_file(acc: WeightedSum | Stack | MaskedSum, header: Header, path: Path, weight: float) -> float:
    """Fold the update in ``path`` into ``acc``: a piece at a time into a running sum (the same result as
    folding it whole), or whole into a stack of deltas (robust aggregators keep them all anyway).
    Returns the L2 norm of its delta."""
    if isinstance(acc, Stack):
        return acc.add(read_file(path, header), weight)
    sumsq = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, start, values in _pieces(fd, header, bytearray(PIECE)):
            sumsq += acc.add_part(name, start, values, weight)
        acc.end_add(weight)
    finally:
        os.close(fd)
    return float(np.sqrt(sumsq))
