"""Secure aggregation in the round loop: the phases of one round attempt (``fedfleet.secagg.server``) driven
on the coordinator's event loop, and the commands the HTTP layer feeds them with.

    setup     keys, then shares: each phase waits until every live worker of it has answered or the
              round's deadline, and needs ⌈--secagg-threshold × sampled⌉ of them; then the round takes
              masked updates from the workers that dealt shares (the intake folds them into a MaskedSum)
    finish    once the masked updates are in, the survivors reveal shares until every secret can be
              reconstructed and every live survivor has answered (or --round-timeout passes); the masks
              come off in a thread and leave the round's mean delta

A failure (too few workers in a phase, a secret that cannot be reconstructed) ends the attempt; the round
runs again with fresh keys, as the loop does for a missed quorum. A round cut off by a coordinator crash is
run again from its start (the engine's resume), also with fresh keys: nothing of an attempt is kept.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from fedfleet import log
from fedfleet.config import SECAGG_CLIP, SECAGG_THRESHOLD, RunConfig
from fedfleet.coordinator.rounds import RoundState
from fedfleet.errors import RequestRejected
from fedfleet.protocol.messages import (
    Instruction,
    SecAggKeys,
    SecAggKeysInstruction,
    SecAggPeer,
    SecAggReveal,
    SecAggShareInstruction,
    SecAggShares,
    SecAggTrainContext,
    SecAggUnmaskInstruction,
    from_b64,
    to_b64,
)
from fedfleet.secagg import ring
from fedfleet.secagg.labels import Labels
from fedfleet.secagg.server import (
    Keys,
    MaskedSum,
    SecAggFailure,
    ServerRound,
    Settings,
    flat_order,
    masked_schema,
)
from fedfleet.storage.records import SecAggRecord
from fedfleet.strategies.privacy import CentralDP
from fedfleet.types import Schema, Weights


def settings_of(config: RunConfig) -> Settings | None:
    if config.secure_aggregation != "on":
        return None
    return Settings(threshold=config.secagg_threshold or SECAGG_THRESHOLD, neighbours=config.secagg_neighbours,
                    clip=config.secagg_clip or SECAGG_CLIP, weighted=config.dp != "distributed")


@dataclass
class Attempt:
    """One securely aggregated round attempt: the protocol's state, the round it belongs to, its timings."""

    server: ServerRound
    rs: RoundState
    model_schema: Schema
    setup_s: float = 0.0
    unmask_s: float = 0.0
    delta: Weights | None = None


class SecureAggregation:
    """The run's secure aggregation. ``alive(worker)`` says whether a worker is still heard from; ``notify``
    and ``wait_change`` are the engine's (wake the long-polls; wait for progress)."""

    def __init__(self, settings: Settings, run_id: str, seed: int, round_timeout: float,
                 alive: Callable[[str], bool], notify: Callable[[bool], None],
                 wait_change: Callable[[float], Awaitable[None]], check_stopped: Callable[[], None],
                 dp: CentralDP | None = None, set_phase: Callable[[str], None] = lambda phase: None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.seed = seed
        self.round_timeout = round_timeout
        self.alive = alive
        self.notify = notify
        self.wait_change = wait_change
        self.check_stopped = check_stopped
        # --dp distributed: the mechanism of central DP, its clipping and noise done by the workers; the sum of
        # their noise shares has at least the central mechanism's variance once ``needed`` of them are in it.
        self.dp = dp
        self.set_phase = set_phase  # what the status and the dashboard say the round is doing
        self.current: Attempt | None = None

    @staticmethod
    def accumulator(schema: Schema) -> tuple[Schema, MaskedSum]:
        """The schema masked updates arrive in, and the sum they are folded into."""
        masked = masked_schema(schema)
        return masked, MaskedSum(masked)

    # --- the loop's side ---------------------------------------------------------------------------------
    async def setup(self, rs: RoundState, model_schema: Schema) -> None:
        """Run the keys and shares phases of ``rs`` (just opened, nothing uploaded yet); afterwards the round
        takes masked updates from the workers that dealt shares. SecAggFailure below the threshold."""
        t0 = time.monotonic()
        graph_seed = int(np.random.SeedSequence([self.seed, rs.round, rs.attempt, 0x5EC]).generate_state(1)[0])
        server = ServerRound(Labels(self.run_id, rs.round, rs.attempt), tuple(sorted(rs.sampled)), self.settings,
                             seed=graph_seed)
        attempt = Attempt(server, rs, model_schema)
        self.current = attempt
        try:
            if len(rs.sampled) < 3:
                # Only under Poisson sampling (--dp): a fixed-size sample has three at least.
                raise SecAggFailure(f"secure aggregation of round {rs.round} needs at least 3 sampled workers; "
                                    f"{len(rs.sampled)} were drawn")
            self.notify(True)
            self.set_phase(f"secure aggregation: keys ({len(rs.sampled)} sampled)")
            await self._phase(rs, server.keys_missing)
            server.close_keys()
            self.notify(True)
            self.set_phase(f"secure aggregation: key shares ({len(server.keys)} workers)")
            await self._phase(rs, server.shares_missing)
            server.close_shares()
            self.set_phase("training (masked updates)")
        except SecAggFailure:
            rs.closed = True
            raise
        finally:
            attempt.setup_s = time.monotonic() - t0
        rs.narrow(sorted(server.dealt))
        rs.needed = max(rs.needed, server.needed)
        log.event("secagg.setup", run=self.run_id, round=rs.round, attempt=rs.attempt, keys=len(server.keys),
                  dealt=len(server.dealt), needed=server.needed, seconds=round(attempt.setup_s, 3))
        self.notify(True)

    async def finish(self, rs: RoundState) -> Weights:
        """Unmask the closed round ``rs``: its mean delta, in the model's dtypes. SecAggFailure if it cannot."""
        attempt = self._attempt(rs)
        server = attempt.server
        t0 = time.monotonic()
        try:
            server.close_masked(rs.answered)
            self.set_phase(f"secure aggregation: unmasking ({len(server.survivors)} updates)")
            self.notify(True)
            deadline = time.monotonic() + self.round_timeout
            while time.monotonic() < deadline:
                waiting = [w for w in server.reveal_missing() if self.alive(w)]
                if not waiting:
                    break
                await self.wait_change(min(1.0, deadline - time.monotonic()))
                self.check_stopped()
            for message in server.bad_shares:
                log.event("secagg.bad_share", logging.WARNING, run=self.run_id, round=rs.round, attempt=rs.attempt,
                          message=message)
            acc = rs.accumulator
            if not isinstance(acc, MaskedSum):
                raise TypeError(f"a securely aggregated round with a {type(acc).__name__} accumulator")
            flat = await asyncio.to_thread(server.unmask, acc.total)
            acc.release()
            if self.dp is not None:
                # Each worker counted one example: ``flat`` is the sum over the survivors divided by their number;
                # DP-FedAvg divides by the fixed q·N instead (strategies.privacy).
                flat *= len(server.survivors) / self.dp.denominator
        finally:
            attempt.unmask_s = time.monotonic() - t0
        delta: Weights = {}
        pos = 0
        for spec in flat_order(attempt.model_schema):
            size = math.prod(spec.shape)
            delta[spec.name] = flat[pos:pos + size].reshape(spec.shape).astype(spec.dtype)
            pos += size
        attempt.delta = delta
        return delta

    def record(self, rs: RoundState) -> SecAggRecord:
        attempt = self._attempt(rs)
        s = attempt.server
        return SecAggRecord(
            neighbours=max((len(v) for v in s.neighbours.values()), default=0), needed=s.needed,
            sampled=len(s.sampled), keys=len(s.keys), dealt=len(s.dealt), uploaded=len(s.survivors),
            revealed=len(s.revealed), dropped_unmasked=len(s.dropped()), bad_shares=s.bad_shares[:1000],
            scale=s.scale, error_bound=ring.error_bound(s.scale, self.settings.clip),
            setup_s=attempt.setup_s, unmask_s=attempt.unmask_s, control_bytes_in=s.bytes_in)

    def delta(self, rs: RoundState) -> Weights:
        """The mean delta ``finish`` unmasked for ``rs``."""
        delta = self._attempt(rs).delta
        if delta is None:
            raise RuntimeError(f"round {rs.round} attempt {rs.attempt} was not unmasked")
        return delta

    def sampled(self, rs: RoundState) -> int:
        """How many workers the attempt sampled (``rs.sampled`` is narrowed to those that dealt shares)."""
        return len(self._attempt(rs).server.sampled)

    def end(self) -> None:
        self.current = None

    async def _phase(self, rs: RoundState, missing: Callable[[], list[str]]) -> None:
        """Wait until every live worker ``missing()`` names has answered, or the round's deadline."""
        while True:
            waiting = [w for w in missing() if self.alive(w)]
            now = time.monotonic()
            if not waiting or now >= rs.deadline:
                return
            await self.wait_change(min(1.0, rs.deadline - now))
            self.check_stopped()

    def _attempt(self, rs: RoundState) -> Attempt:
        a = self.current
        if a is None or a.rs is not rs:
            raise RuntimeError("secure aggregation state of another round attempt")
        return a

    # --- the workers' side -------------------------------------------------------------------------------
    def instruction(self, worker: str) -> Instruction | None:
        """The secure-aggregation instruction ``worker`` has to act on now, if any."""
        a = self.current
        if a is None:
            return None
        s, rs = a.server, a.rs
        if s.phase == "keys" and worker in s.sampled and worker not in s.keys:
            return SecAggKeysInstruction(round=rs.round, attempt=rs.attempt)
        if s.phase == "shares" and worker in s.keys and worker not in s.dealt:
            peers = [SecAggPeer(worker_id=w, x=x, enc_key=to_b64(e), mask_key=to_b64(m))
                     for w, x, e, m in s.roster(worker)]
            return SecAggShareInstruction(round=rs.round, attempt=rs.attempt, peers=peers,
                                          threshold=s.secret_threshold(worker))
        if s.phase == "unmask" and worker in s.survivors and worker not in s.revealed:
            survivors, dropped = s.reveal_request(worker)
            return SecAggUnmaskInstruction(round=rs.round, attempt=rs.attempt, survivors=survivors, dropped=dropped)
        return None

    def train_context(self, worker: str) -> SecAggTrainContext | None:
        a = self.current
        if a is None or a.server.phase != "masked" or worker not in a.server.dealt:
            return None
        neighbours, inbox = a.server.masking_for(worker)
        context = SecAggTrainContext(neighbours=neighbours, shares={d: to_b64(c) for d, c in inbox.items()},
                                     scale=a.server.scale, clip=self.settings.clip,
                                     num_examples=a.server.keys[worker].num_examples)
        if self.dp is None:
            return context
        # Σ of ``needed`` shares N(0, σ²C²/needed) is N(0, σ²C²): the round fails below ``needed`` uploads.
        return context.model_copy(update={"dp_clip": self.dp.clip, "dp_frozen": sorted(self.dp.frozen),
                                          "dp_noise_std": self.dp.noise_std / math.sqrt(a.server.needed)})

    def upload_problem(self, rs: RoundState, worker: str, num_examples: int) -> tuple[int, str] | None:
        a = self.current
        if a is None or a.rs is not rs:
            return 409, "this round attempt has no secure aggregation state"
        return a.server.upload_problem(worker, num_examples)

    def _server(self, round: int, attempt: int, worker: str) -> ServerRound:
        a = self.current
        if a is None or (a.rs.round, a.rs.attempt) != (round, attempt):
            raise RequestRejected(f"no securely aggregated round {round} attempt {attempt} is open", round=round,
                                  worker=worker, reason="stale")
        return a.server

    def take_keys(self, body: SecAggKeys, nbytes: int) -> str:
        s = self._server(body.round, body.attempt, body.worker_id)
        s.add_keys(body.worker_id, Keys(from_b64(body.enc_key, "enc_key"), from_b64(body.mask_key, "mask_key"),
                                        from_b64(body.seed_commitment, "seed_commitment"), body.num_examples))
        return self._took(s, nbytes)

    def take_shares(self, body: SecAggShares, nbytes: int) -> str:
        s = self._server(body.round, body.attempt, body.worker_id)
        s.add_shares(body.worker_id, {
            holder: (from_b64(d.ciphertext, "ciphertext"), from_b64(d.mask_key_commitment, "mask_key_commitment"),
                     from_b64(d.self_mask_commitment, "self_mask_commitment"))
            for holder, d in body.shares.items()})
        return self._took(s, nbytes)

    def take_reveal(self, body: SecAggReveal, nbytes: int) -> str:
        s = self._server(body.round, body.attempt, body.worker_id)
        s.add_reveal(body.worker_id, {d: from_b64(v, "share") for d, v in body.self_mask_shares.items()},
                     {d: from_b64(v, "share") for d, v in body.mask_key_shares.items()})
        return self._took(s, nbytes)

    def _took(self, s: ServerRound, nbytes: int) -> str:
        s.bytes_in += nbytes
        self.notify(False)
        return s.phase

