"""Secure aggregation through the real engine and intake, in process: the securely aggregated model equals
the plaintext example-weighted mean of the clipped deltas within the stated quantisation bound (one masked
update sent whole, one through the resumable path from a spool file), and the intake refuses what does not
fit the protocol's phase or what the worker announced. Real processes: tests/test_secagg_runs.py."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import ConfigError, ProtocolError, RequestRejected
from fedfleet.protocol import codec
from fedfleet.protocol.messages import (
    UPDATE_META_KEY,
    DealtShare,
    SecAggKeys,
    SecAggKeysInstruction,
    SecAggReveal,
    SecAggShareInstruction,
    SecAggShares,
    SecAggUnmaskInstruction,
    TrainInstruction,
    UpdateMeta,
)
from fedfleet.secagg import ring
from fedfleet.secagg.client import ClientRound, NoiseShare, Peer, masked_update
from fedfleet.secagg.labels import Labels
from fedfleet.tasks import load_task
from fedfleet.types import Weights
from test_engine import send

PARAMS = 5000
CLIP = 2.0


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def open_secure(tmp_path: Path, workers: int = 4, **options: object) -> Engine:
    config = RunConfig.from_mapping({"task": "null", "task_options": {"params": str(PARAMS)}, "workers": workers,
                                     "rounds": 1, "round_timeout": 10.0, "secure_aggregation": "on",
                                     "secagg_clip": CLIP, **options})
    return Engine.open(config, load_task("null", {"params": str(PARAMS)}), tmp_path / "run", linger=0.0)


async def next_of(engine: Engine, worker: str, kind: type) -> object:
    msg = await engine.next_instruction(worker, 5.0)
    assert isinstance(msg, kind), msg
    return msg


async def setup(engine: Engine, ids: list[str], examples: dict[str, int]) -> dict[str, ClientRound]:
    """Keys and shares for every worker; returns each worker's session."""
    sessions: dict[str, ClientRound] = {}
    for w in ids:
        msg = await next_of(engine, w, SecAggKeysInstruction)
        assert isinstance(msg, SecAggKeysInstruction)
        s = sessions[w] = ClientRound(w, Labels(engine.run_id, msg.round, msg.attempt))
        enc, mask, commitment = s.keys()
        engine.secagg_keys(SecAggKeys(worker_id=w, round=msg.round, attempt=msg.attempt, enc_key=b64(enc),
                                      mask_key=b64(mask), seed_commitment=b64(commitment),
                                      num_examples=examples[w]), 0)
    for w in ids:
        msg = await next_of(engine, w, SecAggShareInstruction)
        assert isinstance(msg, SecAggShareInstruction)
        dealt = sessions[w].deal([Peer(p.worker_id, p.x, base64.b64decode(p.enc_key), base64.b64decode(p.mask_key))
                                  for p in msg.peers], msg.threshold)
        engine.secagg_shares(SecAggShares(worker_id=w, round=msg.round, attempt=msg.attempt, shares={
            d.to: DealtShare(ciphertext=b64(d.ciphertext), mask_key_commitment=b64(d.mask_key_commitment),
                             self_mask_commitment=b64(d.self_mask_commitment)) for d in dealt}), 0)
    return sessions


async def masked(engine: Engine, w: str, session: ClientRound, weights: Weights) -> tuple[TrainInstruction, Weights]:
    msg = await next_of(engine, w, TrainInstruction)
    assert isinstance(msg, TrainInstruction) and msg.secagg is not None
    ctx = msg.secagg
    assert not session.accept({d: base64.b64decode(c) for d, c in ctx.shares.items()})
    out, _, _ = masked_update(session, weights, engine.model().weights, ctx.neighbours, ctx.scale, ctx.clip,
                           ctx.num_examples)
    return msg, out


async def reveal(engine: Engine, w: str, session: ClientRound) -> None:
    msg = await next_of(engine, w, SecAggUnmaskInstruction)
    assert isinstance(msg, SecAggUnmaskInstruction)
    self_masks, keys = session.reveal(msg.survivors, msg.dropped)
    engine.secagg_reveal(SecAggReveal(worker_id=w, round=msg.round, attempt=msg.attempt,
                                      self_mask_shares={d: b64(v) for d, v in self_masks.items()},
                                      mask_key_shares={d: b64(v) for d, v in keys.items()}), 0)


def test_secure_aggregate_equals_the_plaintext_mean_within_the_bound(tmp_path: Path) -> None:
    """Four workers with different deltas (some coordinates beyond the clipping range) and example counts; one
    uploads through the resumable path from a spool file, one drops out after dealing its shares (its pairwise
    masks must come off). The new model is the global one plus Σ nᵢ clip(Δᵢ) / Σ nᵢ over those that uploaded."""
    engine = open_secure(tmp_path, workers=5)
    rng = np.random.default_rng(3)
    names = [f"w{i}" for i in range(5)]
    examples = {w: int(rng.integers(5, 500)) for w in names}
    deltas = {w: rng.normal(0, 1.0, PARAMS).astype(np.float32) for w in names}  # |Δ| > 2 clipped now and then
    base = engine.model().weights["w"].copy()
    dropped = "w4"
    uploaded = [w for w in names if w != dropped]

    async def drive() -> None:
        ids = [engine.register(w, w).worker_id for w in names]
        loop = asyncio.create_task(engine.run())
        sessions = await setup(engine, ids, examples)
        for w in uploaded:
            msg, body = await masked(engine, w, sessions[w], {"w": base + deltas[w]})
            if w != "w3":
                await send(engine, w, msg, body, num_examples=examples[w])
                continue
            meta = UpdateMeta(worker_id=w, round=msg.round, attempt=msg.attempt, num_examples=examples[w])
            raw = codec.encode(body, {UPDATE_META_KEY: meta.model_dump_json()})
            spool = tmp_path / "w3.safetensors"
            spool.write_bytes(raw)
            slot = engine.intake.begin(meta, codec.parse_header(raw[: 8 + codec.header_length(raw[:8])]))
            await engine.intake.commit_file(slot, spool)
        # w4 goes silent after dealing: the round closes at its deadline... or as soon as it is seen dead; here
        # the engine is told it left by the registry (no heartbeats for --worker-timeout would do the same).
        engine._registry.workers[dropped].last_seen -= 10 * engine.config.worker_timeout
        for w in uploaded:
            await reveal(engine, w, sessions[w])
        await asyncio.wait_for(loop, 30)

    try:
        asyncio.run(drive())
    finally:
        engine.close()
    assert engine.state == "finished", engine.message
    record = engine.rounds()[0]
    assert record.secagg is not None
    assert (record.participants, record.secagg.uploaded, record.secagg.dealt) == (4, 4, 5)
    assert record.secagg.dropped_unmasked == 1
    clipped = {w: np.clip((base + deltas[w]).astype(np.float64) - base, -CLIP, CLIP) for w in uploaded}
    total = sum(examples[w] for w in uploaded)
    expected = base + sum(examples[w] * clipped[w] for w in uploaded) / total
    got = engine.model().weights["w"].astype(np.float64)
    bound = ring.error_bound(record.secagg.scale, CLIP) + np.spacing(np.abs(expected).astype(np.float32)).astype(float)
    assert np.all(np.abs(got - expected) <= bound + np.spacing(np.float32(1)) * np.abs(expected))
    # The clipping mattered: without it the mean would differ by far more than the bound.
    unclipped = base + sum(examples[w] * deltas[w].astype(np.float64) for w in uploaded) / total
    assert np.abs(unclipped - expected).max() > 1e-3


def test_intake_refuses_updates_out_of_phase_or_unlike_what_was_announced(tmp_path: Path) -> None:
    engine = open_secure(tmp_path, workers=3)
    names = ["a", "b", "c"]
    base = engine.model().weights["w"]
    errors: list[BaseException] = []

    async def drive() -> None:
        ids = [engine.register(w, w).worker_id for w in names]
        loop = asyncio.create_task(engine.run())
        first = await next_of(engine, ids[0], SecAggKeysInstruction)
        assert isinstance(first, SecAggKeysInstruction)
        # The status and the dashboard say which phase the round is in.
        assert engine.snapshot().phase == "secure aggregation: keys (3 sampled)"
        early = TrainInstruction.model_validate({"round": first.round, "attempt": first.attempt, "model_version": 0,
                                                 "params": {"local_epochs": 1, "batch_size": 1, "lr": 0.1, "seed": 0}})
        with pytest.raises(RequestRejected, match="keys phase"):
            await send(engine, "a", early, {"w": np.zeros(PARAMS, np.uint64)})
        sessions = await setup(engine, ids, dict.fromkeys(ids, 10))
        msg, body = await masked(engine, "a", sessions["a"], {"w": base + 1})
        try:
            await send(engine, "a", msg, body, num_examples=11)
        except ProtocolError as exc:
            errors.append(exc)
        engine.stop("test over")
        loop.cancel()

    try:
        asyncio.run(drive())
    except asyncio.CancelledError:
        pass
    finally:
        engine.close()
    assert len(errors) == 1 and errors[0].status == 422 and "announced" in str(errors[0])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("options", "words"), [
    ({"strategy": "median"}, "every worker's update in the clear"),
    ({"strategy": "krum"}, "every worker's update in the clear"),
    ({"max_update_norm": 5.0}, "never sees an update's norm"),
    ({"dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0}, "--dp central cannot be used"),
    ({"workers": 2}, "at least 3 workers sampled"),
    ({"fraction": 0.2, "workers": 10}, "at least 3 workers sampled"),
])
def test_combinations_that_need_plaintext_updates_are_refused(options: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_mapping({"workers": 5, "secure_aggregation": "on", **options})


def test_secure_aggregation_options_need_it_on() -> None:
    with pytest.raises(ConfigError, match="applies only with --secure-aggregation"):
        RunConfig.from_mapping({"secagg_clip": 5.0})


def test_a_task_that_would_send_data_statistics_in_the_clear_is_refused(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"task": "tabular", "task_options": {"label": "y"}, "workers": 3,
                                     "secure_aggregation": "on"})
    with pytest.raises(ConfigError, match="cannot be trained with --secure-aggregation: it agrees a plan"):
        Engine.open(config, load_task("tabular", {"label": "y"}), tmp_path / "run")


def test_distributed_dp_aggregate_is_the_clipped_noised_sum_over_q_n(tmp_path: Path) -> None:
    """--dp distributed: each worker clips its delta to C and adds N(0, (σC)²/needed) (drawn here from seeded
    generators, as a reference can repeat them); the coordinator unmasks the sum and divides by q·N. The new
    model is base + Σ (clip_C(Δᵢ) + zᵢ) / (q·N) within the ring's bound, and ε is recorded."""
    pytest.importorskip("dp_accounting")
    sigma, c = 0.8, 1.5
    # The ring's coordinate clipping (--secagg-clip) wide enough that no noised coordinate reaches it.
    engine = open_secure(tmp_path, workers=3, dp="distributed", dp_clip=c, dp_noise_multiplier=sigma, secagg_clip=100.0)
    rng = np.random.default_rng(11)
    names = ["a", "b", "c"]
    deltas = {"a": rng.normal(0, 1.0, PARAMS), "b": rng.normal(0, 0.001, PARAMS), "c": rng.normal(0, 0.5, PARAMS)}
    base = engine.model().weights["w"].copy()
    sent: dict[str, np.ndarray] = {}
    stds: list[float] = []
    honest_clipped: list[bool] = []

    async def drive() -> None:
        ids = [engine.register(w, w).worker_id for w in names]
        loop = asyncio.create_task(engine.run())
        sessions = await setup(engine, ids, {"a": 10, "b": 1000, "c": 3})
        for i, w in enumerate(names):
            msg = await next_of(engine, w, TrainInstruction)
            assert isinstance(msg, TrainInstruction) and msg.secagg is not None
            ctx = msg.secagg
            assert ctx.dp_clip == c and ctx.dp_noise_std is not None
            stds.append(ctx.dp_noise_std)
            assert not sessions[w].accept({d: base64.b64decode(v) for d, v in ctx.shares.items()})
            weights = {"w": (base + deltas[w]).astype(np.float32)}
            body, _, scaled = masked_update(sessions[w], weights, engine.model().weights, ctx.neighbours, ctx.scale,
                                            ctx.clip, ctx.num_examples, NoiseShare(c, ctx.dp_noise_std),
                                            np.random.default_rng(100 + i))
            delta = weights["w"].astype(np.float64) - base
            norm = float(np.linalg.norm(delta))
            assert scaled == (norm > c)
            noise = np.random.default_rng(100 + i).normal(0.0, ctx.dp_noise_std, PARAMS)
            sent[w] = delta * min(1.0, c / norm) + noise
            # Worker "b" lies about its clipping with a value that must not reach the record's count.
            said = -1e15 if w == "b" else float(scaled)
            honest_clipped.append(w != "b" and scaled)
            await send(engine, w, msg, body, num_examples=ctx.num_examples, metrics={"dp_clipped": said})
        for w in names:
            await reveal(engine, w, sessions[w])
        await asyncio.wait_for(loop, 30)

    try:
        asyncio.run(drive())
    finally:
        engine.close()
    assert engine.state == "finished", engine.message
    record = engine.rounds()[0]
    assert record.secagg is not None and record.dp_epsilon is not None and record.dp_epsilon > 0
    assert record.dp_clipped == sum(honest_clipped)
    needed = record.secagg.needed
    assert stds == pytest.approx([sigma * c / np.sqrt(needed)] * 3)
    expected = base + sum(sent.values()) / (1.0 * 3)  # q = 1, N = 3
    got = engine.model().weights["w"].astype(np.float64)
    tolerance = ring.error_bound(record.secagg.scale, 100.0) + np.spacing(np.abs(expected).astype(np.float32))
    worst = np.argmax(np.abs(got - expected) / tolerance)
    assert np.all(np.abs(got - expected) <= tolerance), (got[worst], expected[worst], tolerance[worst])
    assert engine.summary().dp is not None and engine.summary().dp.mechanism == "distributed"


def test_distributed_dp_needs_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="--dp distributed needs --secure-aggregation"):
        RunConfig.from_mapping({"workers": 5, "dp": "distributed", "dp_clip": 1.0, "dp_noise_multiplier": 1.0})
