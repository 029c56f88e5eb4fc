"""Server optimisers and robust aggregators against direct numpy references, and planted attacks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedfleet.errors import ConfigError, RoundError
from fedfleet.strategies import PARAMS, STRATEGIES, make_strategy
from fedfleet.strategies.accumulate import Stack, WeightedSum
from fedfleet.strategies.robust import coordinate_median, krum_scores, trimmed_mean
from fedfleet.strategies.server_opt import ServerAdaptive, ServerMomentum
from fedfleet.types import schema_of

finite = st.floats(-3, 3, width=64)


def vectors(n: int, size: int) -> st.SearchStrategy[list[np.ndarray]]:
    return st.lists(hnp.arrays(np.float64, size, elements=finite), min_size=n, max_size=n)


# --- server optimisers -------------------------------------------------------------------------

def reference_adaptive(variant: str, x: np.ndarray, deltas: list[np.ndarray], lr: float, b1: float, b2: float,
                       tau: float) -> np.ndarray:
    """Reddi et al. (2021), Algorithm 2, written out element by element."""
    x = x.copy()
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    for d in deltas:
        for i in range(len(x)):
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            if variant == "adagrad":
                v[i] = v[i] + d[i] ** 2
            elif variant == "adam":
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            else:
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * float(np.sign(v[i] - d[i] ** 2))
            x[i] = x[i] + lr * m[i] / (v[i] ** 0.5 + tau)
    return x


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(["adagrad", "adam", "yogi"]), x=hnp.arrays(np.float64, 4, elements=finite),
       deltas=vectors(3, 4), lr=st.sampled_from([0.01, 0.1, 1.0]), b1=st.sampled_from([0.0, 0.9]),
       b2=st.sampled_from([0.9, 0.99]), tau=st.sampled_from([1e-3, 1e-1]))
def test_adaptive_optimisers_match_the_paper(variant: str, x: np.ndarray, deltas: list[np.ndarray], lr: float,
                                            b1: float, b2: float, tau: float) -> None:
    opt = ServerAdaptive(variant=variant, lr=lr, beta1=b1, beta2=b2, tau=tau)  # type: ignore[arg-type]
    weights, state = {"w": x}, opt.init({"w": x})
    for d in deltas:
        weights, state = opt.step(state, weights, {"w": d})
    np.testing.assert_allclose(weights["w"], reference_adaptive(variant, x, deltas, lr, b1, b2, tau),
                               rtol=1e-9, atol=1e-9)
    assert state.step == len(deltas)


@given(x=hnp.arrays(np.float64, 3, elements=finite), deltas=vectors(4, 3), beta=st.sampled_from([0.0, 0.5, 0.9]))
def test_server_momentum_matches_a_direct_loop(x: np.ndarray, deltas: list[np.ndarray], beta: float) -> None:
    opt = ServerMomentum(lr=0.7, momentum=beta)
    weights, state = {"w": x}, opt.init({"w": x})
    for d in deltas:
        weights, state = opt.step(state, weights, {"w": d})
    want, velocity = x.copy(), np.zeros_like(x)
    for d in deltas:
        velocity = beta * velocity + d
        want = want + 0.7 * velocity
    np.testing.assert_allclose(weights["w"], want, rtol=1e-12)


def test_optimiser_state_is_replaced_not_mutated() -> None:
    opt = ServerAdaptive(variant="adam")
    x = {"w": np.ones(3, np.float32), "count": np.array([5], np.int64)}
    s0 = opt.init(x)
    m0 = s0.m["w"].copy()
    new, s1 = opt.step(s0, x, {"w": np.full(3, 0.5, np.float32), "count": np.array([9], np.int64)})
    np.testing.assert_array_equal(s0.m["w"], m0)
    assert s1 is not s0 and new["w"].dtype == np.float32
    assert new["count"][0] == 5  # integer tensors are not moved


# --- robust aggregators --------------------------------------------------------------------------

@given(ds=st.integers(1, 7).flatmap(lambda n: vectors(n, 5)))
def test_median_matches_numpy(ds: list[np.ndarray]) -> None:
    got = coordinate_median([{"w": d} for d in ds])["w"]
    want = [sorted(col)[len(col) // 2] if len(col) % 2 else (sorted(col)[len(col) // 2 - 1] +
                                                               sorted(col)[len(col) // 2]) / 2
            for col in zip(*ds, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@given(data=st.data(), n=st.integers(1, 9))
def test_trimmed_mean_matches_sorting_by_hand(data: st.DataObject, n: int) -> None:
    ds = data.draw(vectors(n, 4))
    trim = data.draw(st.integers(0, (n - 1) // 2))
    got = trimmed_mean([{"w": d} for d in ds], trim)["w"]
    want = [np.mean(sorted(col)[trim:n - trim]) for col in zip(*ds, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def reference_krum_scores(ds: list[np.ndarray], f: int) -> list[float]:
    scores = []
    for i, di in enumerate(ds):
        dists = sorted(float(np.sum((di - dj) ** 2)) for j, dj in enumerate(ds) if j != i)
        scores.append(sum(dists[: len(ds) - f - 2]))
    return scores


@given(data=st.data(), f=st.integers(0, 2))
def test_krum_scores_match_pairwise_distances(data: st.DataObject, f: int) -> None:
    n = data.draw(st.integers(2 * f + 3, 2 * f + 6))
    ds = data.draw(vectors(n, 3))
    got = krum_scores([{"a": d[:2], "b": d[2:]} for d in ds], f)
    np.testing.assert_allclose(got, reference_krum_scores(ds, f), rtol=1e-7, atol=1e-7)


def planted(n_honest: int, n_bad: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    honest = [rng.normal(1.0, 0.05, 20) for _ in range(n_honest)]
    bad = [np.full(20, 1000.0) if i % 2 else np.full(20, -400.0) for i in range(n_bad)]
    return [{"w": d} for d in honest + bad], np.mean(honest, axis=0)


@pytest.mark.parametrize("name,options", [("median", {}), ("trimmed_mean", {"trim_fraction": "0.25"}),
                                          ("krum", {"byzantine": "2"}), ("krum", {"byzantine": "2", "select": "3"})])
def test_robust_aggregators_withstand_planted_attackers(name: str, options: dict[str, str]) -> None:
    deltas, honest_mean = planted(n_honest=7, n_bad=2)
    strategy = make_strategy(name, options)
    base = {"w": np.zeros(20)}
    acc = strategy.accumulator(schema_of(base), base)
    for d in deltas:
        acc.add(d, weight=10_000.0 if d["w"][0] > 100 else 10.0)  # attackers also claim many examples
    robust = strategy.aggregate(acc)["w"]
    assert np.abs(robust - honest_mean).max() < 0.2
    mean = WeightedSum(schema_of(base), base)
    for d in deltas:
        mean.add(d, weight=10.0)
    assert np.abs(mean.mean()["w"] - honest_mean).max() > 50  # what plain averaging would have done


def test_krum_with_too_few_updates_is_a_round_error() -> None:
    strategy = make_strategy("krum", {"byzantine": "2"})
    base = {"w": np.zeros(2)}
    acc = strategy.accumulator(schema_of(base), base)
    for v in range(5):
        acc.add({"w": np.full(2, float(v))}, 1.0)
    with pytest.raises(RoundError, match=r"krum cannot aggregate 5 updates.*at least 7"):
        strategy.aggregate(acc, round=4)


def test_stack_mean_equals_running_mean() -> None:
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=6).astype(np.float32)}
    stack, run = Stack(schema_of(base), base), WeightedSum(schema_of(base), base)
    for _ in range(4):
        u, n = {"w": rng.normal(size=6).astype(np.float32)}, float(rng.integers(1, 50))
        stack.add(u, n)
        run.add(u, n)
    np.testing.assert_allclose(stack.mean()["w"], run.mean()["w"], rtol=1e-5, atol=1e-6)


# --- configuration -------------------------------------------------------------------------------

def test_every_strategy_builds_with_its_defaults() -> None:
    for name in STRATEGIES:
        assert make_strategy(name).name == name
    assert make_strategy("fedprox").prox_mu == pytest.approx(0.01)
    assert make_strategy("fedavg").prox_mu == 0.0
    adam = make_strategy("fedadam", {"server_lr": "0.5", "beta2": "0.9"}).optimizer
    assert adam == ServerAdaptive(variant="adam", lr=0.5, beta1=0.9, beta2=0.9, tau=1e-3)


@pytest.mark.parametrize("name,key", [(n, k) for n, (_, _, _, allowed) in STRATEGIES.items() for k in allowed])
def test_bad_strategy_option_values_name_the_option(name: str, key: str) -> None:
    opt = PARAMS[key]
    bad = ["abc", "nan"]
    if opt.low is not None:
        bad.append(str(opt.low - 1))
    if opt.high is not None:
        bad.append(str(opt.high * 2 + 1))
    for value in bad:
        with pytest.raises(ConfigError, match=rf"'{key}' option must be .* Got '{value}' instead"):
            make_strategy(name, {key: value})


def test_options_a_strategy_does_not_take_are_refused() -> None:
    for name, (_, _, _, allowed) in STRATEGIES.items():
        for key in set(PARAMS) - set(allowed):
            with pytest.raises(ConfigError, match=f"takes the options .* Got '{key}'"):
                make_strategy(name, {key: "1"})


def test_every_pair_of_names_is_distinct() -> None:
    for a, b in itertools.combinations(STRATEGIES, 2):
        assert make_strategy(a) != make_strategy(b)


def test_fedprox_term_keeps_local_training_near_the_global_model() -> None:
    from fedfleet.tasks.base import TrainParams
    from fedfleet.tasks.songs import SongsTask

    task = SongsTask()
    pool = task.train_pool()
    w0 = task.apply_stats(task.init_weights(0), task.local_stats(pool))
    part = task.load_partition(__import__("fedfleet").parse_partition("iid"), 0, 8, 0)
    drift = {}
    for mu in (0.0, 1.0, 20.0):
        new = task.fit(w0, part, TrainParams(2, 32, 0.05, seed=1, prox_mu=mu)).weights
        drift[mu] = float(np.linalg.norm(new["linear.weight"] - w0["linear.weight"]))
    assert drift[0.0] > drift[1.0] > drift[20.0] > 0


def test_optimiser_state_survives_a_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedfleet.protocol import codec
    from fedfleet.storage.checkpoints import Checkpoints
    from fedfleet.strategies.server_opt import state_from_tensors, state_to_tensors

    opt = ServerAdaptive(variant="yogi")
    x = {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, np.float32)}
    _, state = opt.step(opt.init(x), x, {"w": np.full(4, 0.3, np.float32), "b": np.full(2, -0.1, np.float32)})
    tensors, meta = state_to_tensors(state)  # type: ignore[misc]
    ckpt = Checkpoints(tmp_path, keep=2)
    for r in (1, 2, 3):
        ckpt.save(r, codec.encode_parts(x), codec.encode_parts(tensors, meta))
    assert ckpt.load_state(1) is None  # pruned with its model
    loaded = ckpt.load_state(3)
    assert loaded is not None
    back = state_from_tensors(*loaded)
    assert back.step == state.step == 1
    for name in x:
        np.testing.assert_array_equal(back.m[name], state.m[name])
        np.testing.assert_array_equal(back.v[name], state.v[name])
    assert state_to_tensors(make_strategy("fedavg").init(x)) is None  # plain SGD has nothing to save
