"""Central differential privacy (``--dp central``, DP-FedAvg): the clipping and the noise against a direct
numpy reference through the real intake, the accountant against dp-accounting and TF Privacy's published
values, σ solved for a target ε, a real run that stops at its budget, and the option combinations refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import run_fedfleet
from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.coordinator.privacy import plan_privacy
from fedfleet.errors import ConfigError, ProtocolError
from fedfleet.protocol import codec
from fedfleet.protocol.messages import UPDATE_META_KEY, TrainInstruction, UpdateMeta
from fedfleet.storage.run_dir import RunDir
from fedfleet.strategies.accumulate import BLOCK, WeightedSum, delta_norm
from fedfleet.strategies.privacy import clip_factor, default_delta, epsilon, noise_multiplier_for
from fedfleet.tasks import load_task
from fedfleet.types import TensorSpec
from fedfleet.worker.agent import WorkerProcess
from metrics_support import scrape, value
from test_engine import open_engine, plus, send, strict_lines
from test_metrics import RUN_BUDGET, make_engine, serving, wait_state

dp_accounting = pytest.importorskip("dp_accounting")

PARAMS = 8
CLIP, SIGMA, SEED = 1.0, 0.5, 7


# --- clipping and noise, through the real intake ---------------------------------------------------------
def test_clipped_noised_aggregate_equals_a_numpy_reference(tmp_path: Path) -> None:
    """Three workers answer round 1 with known updates (one over the clip norm, one under it, one sent through
    the resumable-upload path from a file), claiming very different example counts; the new model must be
    the global one plus (Σ clipped deltas + N(0, (σC)²)) / N, with the noise of the seeded generator."""
    config = RunConfig.from_mapping({"task": "null", "task_options": {"params": str(PARAMS)}, "workers": 3,
                                     "rounds": 1, "round_timeout": 10.0, "dp": "central", "dp_clip": CLIP,
                                     "dp_noise_multiplier": SIGMA, "dp_seed": SEED})
    engine = Engine.open(config, load_task("null", {"params": str(PARAMS)}), tmp_path / "run", linger=0.0)
    rng = np.random.default_rng(1)
    base = engine.model().weights["w"].copy()
    deltas = {"w0": (rng.standard_normal(PARAMS) * 3).astype(np.float32),  # norm ≈ 8: clipped
              "w1": (rng.standard_normal(PARAMS) * 0.05).astype(np.float32),  # norm ≈ 0.1: kept as it is
              "w2": (rng.standard_normal(PARAMS) * 2).astype(np.float32)}  # norm ≈ 5: clipped, from a file
    examples = {"w0": 10, "w1": 100_000, "w2": 3}

    async def drive() -> None:
        ids = [engine.register(w, w).worker_id for w in deltas]
        loop = asyncio.create_task(engine.run())
        msg = await engine.next_instruction(ids[0], 5.0)
        assert isinstance(msg, TrainInstruction)
        for wid in ("w0", "w1"):
            await send(engine, wid, msg, {"w": base + deltas[wid]}, num_examples=examples[wid])
        meta = UpdateMeta(worker_id="w2", round=msg.round, attempt=msg.attempt, num_examples=examples["w2"])
        body = codec.encode({"w": base + deltas["w2"]}, {UPDATE_META_KEY: meta.model_dump_json()})
        spool = tmp_path / "w2.safetensors"
        spool.write_bytes(body)
        slot = engine.intake.begin(meta, codec.parse_header(body[: 8 + codec.header_length(body[:8])]))
        await engine.intake.commit_file(slot, spool)
        await asyncio.wait_for(loop, 30)

    try:
        asyncio.run(drive())
    finally:
        engine.close()
    assert engine.state == "finished", engine.message
    # The reference, in float64: each delta as folded (the float32 update minus the float32 base), clipped
    # by its own norm, summed, plus the noise the seeded generator of round 1, attempt 0 draws.
    clipped = []
    for d in deltas.values():
        exact = (base + d).astype(np.float64) - base.astype(np.float64)
        clipped.append(exact * min(1.0, CLIP / np.linalg.norm(exact)))
    noise = np.random.default_rng(np.random.SeedSequence([SEED, 1, 0, 1])).standard_normal(PARAMS) * SIGMA * CLIP
    expected = base + ((np.sum(clipped, axis=0) + noise) / 3).astype(np.float32)
    np.testing.assert_allclose(engine.model().weights["w"], expected, rtol=1e-6, atol=1e-6)
    assert [np.linalg.norm(c) <= CLIP * (1 + 1e-12) for c in clipped] == [True] * 3
    record = RunDir(tmp_path / "run").read_rounds()[0]
    assert record.participants == 3 and record.dp_clipped == 2
    assert record.dp_epsilon == pytest.approx(epsilon(1.0, SIGMA, 1, default_delta(3)))


def test_noise_drawn_a_block_at_a_time_equals_one_draw_per_tensor() -> None:
    """The noised mean of a sum of several tensors, one larger than two blocks, one integer and one frozen
    (neither trained under DP: their delta is zero), equals (Σ + σC·z) / d with z = one standard_normal(size)
    per other tensor, in schema order, from the same seed."""
    schema = (TensorSpec("a", "float32", (3, 5)), TensorSpec("n", "int64", (4,)), TensorSpec("s", "float32", (6,)),
              TensorSpec("b", "float32", (2 * BLOCK + 17,)))
    base = {s.name: np.zeros(s.shape, s.dtype) for s in schema}
    acc = WeightedSum(schema, base, wide_deltas=True)
    rng = np.random.default_rng(3)
    updates = [{s.name: (rng.standard_normal(s.shape) * 4).astype(s.dtype) for s in schema} for _ in range(4)]
    factors = []
    for u in updates:
        norm, _ = delta_norm(u, base)
        factors.append(clip_factor(norm, 2.0))
        acc.add(u, factors[-1])
    out = acc.noised_mean(0.7, 3.5, np.random.default_rng(11), frozen={"s"})
    ref_rng = np.random.default_rng(11)
    for s in schema:
        if s.name in ("n", "s"):
            assert out[s.name].dtype == s.dtype and not out[s.name].any()
            continue
        total = sum(np.asarray(u[s.name], np.float64) * f for u, f in zip(updates, factors, strict=True))
        expected = (total + ref_rng.standard_normal(s.shape) * 0.7) / 3.5
        np.testing.assert_allclose(out[s.name], expected.astype(np.float32), rtol=1e-6, atol=1e-6)
        assert out[s.name].dtype == np.float32


def test_the_folded_term_of_a_clipped_update_is_within_the_clip_norm() -> None:
    """The norm measured before folding is the norm of what is folded (differences in float64), so a
    clipped term is within C up to float64 rounding, not float32's, even for awkward magnitudes."""
    rng = np.random.default_rng(5)
    for scale in (1e-3, 1.0, 1e3, 1e30):
        schema = (TensorSpec("w", "float32", (BLOCK + 3,)),)
        base = {"w": (rng.standard_normal(BLOCK + 3) * scale).astype(np.float32)}
        update = {"w": (base["w"] + rng.standard_normal(BLOCK + 3) * scale).astype(np.float32)}
        clip = scale / 7
        acc = WeightedSum(schema, base, wide_deltas=True)
        norm, _ = delta_norm(update, base)
        folded_norm = acc.add(update, clip_factor(norm, clip))
        assert folded_norm == pytest.approx(norm, rel=1e-12)
        assert np.linalg.norm(acc.sum()["w"].astype(np.float64)) <= clip * (1 + 1e-6)  # sum() casts to float32


def test_a_resumed_run_counts_the_rounds_of_its_earlier_life(tmp_path: Path) -> None:
    """A coordinator stopped after round 1 and started again on the same data dir goes on from the recorded
    rounds' epsilon: the budget spent is the recorded rounds', whatever process recorded them; the stopped
    loop records nothing more."""
    options = {"dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 2.0, "rounds": 3}

    async def life(engine: Engine, stop_after: int | None) -> None:
        ids = [engine.register(f"w{i}", f"worker {i}").worker_id for i in range(3)]
        loop = asyncio.create_task(engine.run())

        async def worker(wid: str) -> None:
            done: set[tuple[int, int]] = set()
            while engine.state not in ("finished", "stopped", "failed"):
                msg = await engine.next_instruction(wid, 0.2)
                if isinstance(msg, TrainInstruction) and (msg.round, msg.attempt) not in done:
                    done.add((msg.round, msg.attempt))
                    with contextlib.suppress(ProtocolError):  # the round may close, or the run stop, meanwhile
                        await send(engine, wid, msg, plus(engine, 0.1))

        async def stopper() -> None:
            while stop_after is not None and len(engine.rounds()) < stop_after:
                await asyncio.sleep(0.005)
            if stop_after is not None:
                engine.stop("test")
                at_stop.append(len(engine.rounds()))

        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(loop, stopper(), *(worker(w) for w in ids)), 60)

    at_stop: list[int] = []
    first = open_engine(tmp_path, **options)
    try:
        asyncio.run(life(first, stop_after=1))
    finally:
        first.close()
    assert first.state == "stopped" and at_stop[0] < 3
    assert len(RunDir(tmp_path / "run").read_rounds()) == at_stop[0]
    second = open_engine(tmp_path, **options)
    try:
        asyncio.run(life(second, stop_after=None))
    finally:
        second.close()
    assert second.state == "finished", second.message
    records = RunDir(tmp_path / "run").read_rounds()
    assert [r.dp_epsilon for r in records] == pytest.approx([epsilon(1.0, 2.0, r, 1e-5) for r in (1, 2, 3)])
    summary = RunDir(tmp_path / "run").read_summary()
    assert summary is not None and summary.dp is not None and summary.dp.rounds == 3
    assert summary.dp.epsilon == pytest.approx(epsilon(1.0, 2.0, 3, 1e-5))


# --- the accountant ----------------------------------------------------------------------------------------
def library_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("q", "sigma", "steps"), [(1.0, 1.0, 30), (0.25, 1.1, 100), (256 / 60_000, 1.12, 14_062)])
def test_epsilon_is_the_librarys_own(q: float, sigma: float, steps: int) -> None:
    assert epsilon(q, sigma, steps, 1e-5) == pytest.approx(library_epsilon(q, sigma, steps, 1e-5), rel=1e-12)


@pytest.mark.parametrize(("sigma", "epochs", "published"), [(1.12, 60, 2.92), (1.2, 10, 1.20)])
def test_the_librarys_rdp_reproduces_tf_privacys_published_epsilons(sigma: float, epochs: int,
                                                                   published: float) -> None:
    """TF Privacy's MNIST tutorial (tutorials/README.md, "Select Parameters") publishes ε at δ = 1e-5 for
    DP-SGD on 60,000 examples in batches of 256: 2.92 for σ 1.12 over 60 epochs, 1.20 for σ 1.2 over 10.
    It converted the RDP curve with the classic bound ε = min_α RDP(α) + log(1/δ)/(α − 1) (Mironov 2017,
    Prop. 3) over its orders of the time; the library's RDP through that bound gives the same two digits,
    and fedfleet's ε (the library's tighter conversion) is below it."""
    q, steps = 256 / 60_000, epochs * 60_000 // 256
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    accountant = dp_accounting.rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    classic = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip(orders, accountant.rdp, strict=True))
    assert round(classic, 2) == published
    assert epsilon(q, sigma, steps, 1e-5) < classic
    if sigma == 1.12:
        assert epsilon(q, sigma, steps, 1e-5) == pytest.approx(2.5186, abs=1e-4)  # hand-pinned, dp-accounting 0.6


def test_one_unsampled_round_bounds_the_exact_gaussian_mechanism() -> None:
    """At q = 1 one round is the plain Gaussian mechanism: RDP's ε is an upper bound of its exact ε (Balle
    and Wang 2018), and not a loose one."""
    for sigma in (0.8, 2.0, 5.0):
        exact = dp_accounting.get_epsilon_gaussian(sigma, 1e-5)
        assert exact <= epsilon(1.0, sigma, 1, 1e-5) <= 1.5 * exact


@pytest.mark.parametrize(("target", "q", "rounds"), [(1.0, 1.0, 30), (4.0, 1.0, 10), (3.0, 0.25, 20)])
def test_sigma_solved_for_a_target_epsilon_gives_that_epsilon_back(target: float, q: float, rounds: int) -> None:
    sigma = noise_multiplier_for(target, q, rounds, 1e-5)
    spent = epsilon(q, sigma, rounds, 1e-5)
    assert target * 0.999 <= spent <= target
    assert epsilon(q, sigma * 0.99, rounds, 1e-5) > target  # and it is the smallest such σ, near enough


def test_the_core_imports_without_the_library_and_dp_asks_for_the_extra() -> None:
    code = (
        "import sys; sys.modules['dp_accounting'] = None\n"  # import dp_accounting now raises ImportError
        "import fedfleet.cli, fedfleet.coordinator.engine\n"
        "from fedfleet.config import RunConfig\n"
        "from fedfleet.coordinator.privacy import plan_privacy\n"
        "from fedfleet.errors import ConfigError\n"
        "from fedfleet.tasks import load_task\n"
        "c = RunConfig.from_mapping({'dp': 'central', 'dp_clip': 1.0, 'dp_noise_multiplier': 1.0})\n"
        "try:\n"
        "    plan_privacy(c, load_task('songs'))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'fedfleet[privacy]'" in out.stdout, out.stdout + out.stderr


# --- a real run that stops at its budget ---------------------------------------------------------------
def test_a_run_stops_cleanly_at_its_privacy_budget(tmp_path: Path) -> None:
    """4 real workers (the worker agent over HTTP) train songs with σ = 2 and --dp-max-epsilon between what 3
    and 4 rounds spend: the run finishes after round 3 saying so, and ε is the same in metrics.jsonl,
    summary.json and /metrics."""
    sigma, delta = 2.0, 1e-5
    budget = (epsilon(1.0, sigma, 3, delta) + epsilon(1.0, sigma, 4, delta)) / 2
    (tmp_path / "coordinator").mkdir()
    engine = make_engine(tmp_path, workers=4, rounds=10, dp="central", dp_clip=0.5, dp_noise_multiplier=sigma,
                         dp_max_epsilon=budget)
    with serving(engine) as url:
        proc = WorkerProcess(url, 4, tmp_path / "worker", name="dp", give_up=30.0)
        thread = threading.Thread(target=proc.run, name="workers", daemon=True)
        thread.start()
        try:
            status = wait_state(url, "finished")
            thread.join(RUN_BUDGET)
            m = scrape(f"{url}/metrics")
            rounds = httpx.get(f"{url}/v1/rounds", timeout=30).json()
        finally:
            proc.stop.set()
    spent = [epsilon(1.0, sigma, r, delta) for r in (1, 2, 3)]
    assert status["round"] == 3
    assert status["message"].startswith("privacy budget reached: epsilon ")
    assert f"round 4 would take it to {epsilon(1.0, sigma, 4, delta):.4g}, over --dp-max-epsilon {budget:g}" \
        in status["message"]
    records = strict_lines(tmp_path / "coordinator" / "metrics.jsonl")
    assert [r["dp_epsilon"] for r in records] == pytest.approx(spent)
    assert [r["dp_epsilon"] for r in rounds] == pytest.approx(spent)
    summary = json.loads((tmp_path / "coordinator" / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["rounds"] == 3 and summary["message"] == status["message"]
    assert summary["dp"] | {"accountant": ""} == {
        "mechanism": "central", "clip": 0.5, "noise_multiplier": sigma, "target_epsilon": None, "delta": delta,
        "epsilon": pytest.approx(spent[-1]), "max_epsilon": budget, "sample_rate": 1.0, "denominator": 4.0,
        "rounds": 3, "accountant": "", "seeded": False, "clip_quantile": None, "last_clip": None}
    assert value(m, "fedfleet_dp_epsilon") == pytest.approx(spent[-1])
    # No statistics round under DP: the song task's public standardisation is in the model from the start,
    # and stays as it is (frozen: no noise on it).
    assert value(m, "fedfleet_updates_accepted_total", kind="stats") == 0
    task = load_task("songs")
    public = task.apply_stats(task.init_weights(0), task.public_stats())  # type: ignore[attr-defined]
    for name in ("scaler.mean", "scaler.scale"):
        np.testing.assert_array_equal(engine.model().weights[name], public[name])


def test_fedfleet_run_with_a_target_epsilon_and_sampling(tmp_path: Path) -> None:
    """The command line end to end: σ solved for --dp-target-epsilon over the planned rounds at --fraction
    0.5 (Poisson sampling); the run spends at most the target, and says what it spent."""
    out = tmp_path / "run"
    r = run_fedfleet("run", "--task", "songs", "--workers", "4", "--rounds", "4", "--fraction", "0.5",
                     "--dp", "central", "--dp-clip", "0.5", "--dp-target-epsilon", "8", "--out", str(out), "--quiet",
                     timeout=180)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["rounds"] == 4
    dp = summary["dp"]
    assert dp["sample_rate"] == 0.5 and dp["denominator"] == 2.0 and dp["target_epsilon"] == 8.0
    assert dp["noise_multiplier"] == pytest.approx(noise_multiplier_for(8.0, 0.5, 4, 1e-5))
    assert dp["epsilon"] <= 8.0 and dp["epsilon"] == pytest.approx(8.0, rel=1e-3)
    records = strict_lines(out / "metrics.jsonl")
    assert all(0 <= r["participants"] <= 4 for r in records)  # a Poisson sample: any size, even none


# --- combinations refused ----------------------------------------------------------------------------------
DP = {"dp": "central", "dp_clip": 1.0, "dp_noise_multiplier": 1.0}


@pytest.mark.parametrize(("values", "option", "words"), [
    ({"dp_clip": 1.0}, "dp_clip", "applies only with --dp central"),
    ({"dp_seed": 3}, "dp_seed", "applies only with --dp central"),
    ({"dp": "central", "dp_noise_multiplier": 1.0}, "dp_clip", "is required with --dp central"),
    ({**DP, "dp_target_epsilon": 2.0}, "dp_noise_multiplier", "exactly one of"),
    ({"dp": "central", "dp_clip": 1.0}, "dp_noise_multiplier", "exactly one of"),
    ({**DP, "strategy": "median"}, "strategy", "cannot be used with --dp central"),
    ({**DP, "strategy": "krum"}, "strategy", "cannot be used with --dp central"),
    ({**DP, "strategy": "trimmed_mean"}, "strategy", "cannot be used with --dp central"),
    ({**DP, "max_update_norm": 0.5}, "max_update_norm", "must be at least 'dp_clip'"),
    ({**DP, "workers": 10, "dp_delta": 0.1}, "dp_delta", "must be below 1/workers"),
])
def test_option_combinations_that_make_no_sense_are_refused(values: dict[str, Any], option: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        RunConfig.from_mapping(values)
    assert info.value.option == option


@pytest.mark.parametrize(("values", "task", "option", "words"), [
    ({**DP, "dp_max_epsilon": 0.5}, "songs", "dp_max_epsilon", "below what one round spends"),
    ({"dp": "central", "dp_clip": 1.0, "dp_target_epsilon": 0.01, "rounds": 1_000_000}, "songs", "dp_target_epsilon",
     "cannot be met"),
    (DP, "tabular", "dp", "agrees a plan from the sites' descriptions"),
])
def test_plans_that_cannot_run_are_refused(values: dict[str, Any], task: str, option: str, words: str) -> None:
    config = RunConfig.from_mapping({"rounds": 1000, **values, "task": task})
    with pytest.raises(ConfigError, match=words) as info:
        plan_privacy(config, load_task(task))
    assert info.value.option == option


def test_a_task_whose_statistics_have_no_public_stand_in_is_refused() -> None:
    songs = load_task("songs")

    class Private:
        """The song task without public_stats."""

        name = "songs"

        def __getattr__(self, name: str) -> Any:
            if name == "public_stats":
                raise AttributeError(name)
            return getattr(songs, name)

    with pytest.raises(ConfigError, match=r"statistics round.*offers no public_stats"):
        plan_privacy(RunConfig.from_mapping(DP), Private())  # type: ignore[arg-type]


def test_the_command_line_refuses_in_one_line_before_starting_anything(tmp_path: Path) -> None:
    for args in (["--dp", "central", "--dp-clip", "1", "--dp-noise-multiplier", "1", "--strategy", "median"],
                 ["--dp", "central", "--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-max-epsilon", "0.1"]):
        r = run_fedfleet("run", "--task", "songs", "--out", str(tmp_path / "never"), *args, timeout=60)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedfleet: error: The '"), r.stderr
        assert not (tmp_path / "never").exists()
