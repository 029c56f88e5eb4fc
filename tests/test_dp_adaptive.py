"""Adaptive clipping (``--dp-clip adaptive``, Andrew et al. 2021) under central DP: two rounds through the real
intake against a numpy reference of the clip norm's geometric update, the noised count of unclipped updates
and the deltas' noise multiplier σ_Δ; the accountant counts the combined σ; the option's forms and refusals."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.errors import ConfigError
from fedfleet.protocol.messages import TrainInstruction
from fedfleet.strategies.privacy import default_delta, epsilon
from fedfleet.tasks import load_task
from test_engine import send

pytest.importorskip("dp_accounting")

PARAMS = 8
START, QUANTILE, SIGMA, SEED = 0.5, 0.5, 1.0, 7


def test_clip_norm_follows_the_noised_share_of_unclipped_updates(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"task": "null", "task_options": {"params": str(PARAMS)}, "workers": 3,
                                     "rounds": 2, "round_timeout": 10.0, "dp": "central", "dp_clip": START,
                                     "dp_clip_quantile": QUANTILE, "dp_noise_multiplier": SIGMA, "dp_seed": SEED})
    engine = Engine.open(config, load_task("null", {"params": str(PARAMS)}), tmp_path / "run", linger=0.0)
    rng = np.random.default_rng(5)
    # Norms about 2.3, 0.12 and 0.35: above, below and (in round 2, once the clip has moved) near the clip.
    deltas = {"w0": rng.standard_normal(PARAMS) * 0.8, "w1": rng.standard_normal(PARAMS) * 0.04,
              "w2": rng.standard_normal(PARAMS) * 0.12}
    models = [engine.model().weights["w"].copy()]

    async def drive() -> None:
        ids = [engine.register(w, w).worker_id for w in deltas]
        loop = asyncio.create_task(engine.run())
        for _ in range(2):
            msg = await engine.next_instruction(ids[0], 5.0)
            assert isinstance(msg, TrainInstruction)
            base = engine.model().weights["w"]
            for wid in ids:
                await send(engine, wid, msg, {"w": (base + deltas[wid]).astype(np.float32)}, num_examples=1)
            while len(engine.rounds()) < msg.round and not loop.done():
                await asyncio.sleep(0.01)
            models.append(engine.model().weights["w"].copy())
        await asyncio.wait_for(loop, 30)

    try:
        asyncio.run(drive())
    finally:
        engine.close()
    assert engine.state == "finished", engine.message
    records = engine.rounds()
    count_noise = max(3 / 20, SIGMA)  # σ_b = max(q·N/20, σ)
    sigma_delta = (SIGMA**-2 - (2 * count_noise) ** -2) ** -0.5
    clip = START
    for rnd, record in enumerate(records, start=1):
        base = models[rnd - 1].astype(np.float64)
        exact = {w: (models[rnd - 1] + d).astype(np.float32).astype(np.float64) - base for w, d in deltas.items()}
        unclipped = sum(np.linalg.norm(e) <= clip for e in exact.values())
        count_rng = np.random.default_rng(np.random.SeedSequence([SEED, rnd, 0, 2]))
        fraction = (unclipped + count_rng.normal(0.0, count_noise)) / 3
        assert record.dp_clip == pytest.approx(clip, rel=1e-12)
        assert record.dp_unclipped_fraction == pytest.approx(fraction, rel=1e-12)
        assert record.dp_clipped == 3 - unclipped
        # The round's delta: clipped at this round's norm, noise σ_Δ · C on the sum, over q·N = 3.
        noise = np.random.default_rng(np.random.SeedSequence([SEED, rnd, 0, 1])).standard_normal(PARAMS)
        total = sum(e * min(1.0, clip / np.linalg.norm(e)) for e in exact.values()) + noise * sigma_delta * clip
        expected = models[rnd - 1] + (total / 3).astype(np.float32)
        np.testing.assert_allclose(models[rnd], expected, rtol=1e-6, atol=1e-6)
        clip = clip * math.exp(-0.2 * (fraction - QUANTILE))
    # The accountant counts σ, the multiplier of both Gaussian releases together, not σ_Δ.
    assert records[-1].dp_epsilon == pytest.approx(epsilon(1.0, SIGMA, 2, default_delta(3)))
    summary = engine.summary().dp
    assert summary is not None and summary.clip_quantile == QUANTILE and summary.last_clip == records[-1].dp_clip
    assert summary.noise_multiplier == SIGMA


def test_adaptive_is_the_papers_start_and_median() -> None:
    config = RunConfig.from_mapping({"dp": "central", "dp_clip": "adaptive", "dp_noise_multiplier": 1.0,
                                     "workers": 4})
    assert (config.dp_clip, config.dp_clip_quantile) == (0.1, 0.5)
    again = RunConfig.from_mapping({"dp": "central", "dp_clip": "adaptive", "dp_clip_quantile": 0.8,
                                    "dp_noise_multiplier": 1.0, "workers": 4})
    assert again.dp_clip_quantile == 0.8


def test_adaptive_clipping_is_refused_where_it_is_not_built() -> None:
    with pytest.raises(ConfigError, match="not built for --dp distributed"):
        RunConfig.from_mapping({"dp": "distributed", "dp_clip": "adaptive", "dp_noise_multiplier": 1.0,
                                "workers": 4, "secure_aggregation": "on"})
    with pytest.raises(ConfigError, match="applies only with --dp central or distributed"):
        RunConfig.from_mapping({"dp_clip_quantile": 0.5})
