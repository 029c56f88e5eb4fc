"""Running weighted sums and FedAvg against plain numpy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedfleet.errors import ConfigError
from fedfleet.strategies import make_strategy
from fedfleet.strategies.accumulate import WeightedSum, delta_norm, weighted_mean
from fedfleet.strategies.server_opt import ServerSGD
from fedfleet.types import TensorSpec, Weights, schema_of

RTOL, ATOL = 1e-4, 1e-5  # float32 accumulation
SHAPES = hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4)


@st.composite
def schemas(draw: st.DrawFn) -> tuple[TensorSpec, ...]:
    names = draw(st.lists(st.text("abcdefgh.", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    return tuple(TensorSpec(n, draw(st.sampled_from(["float32", "float64"])), draw(SHAPES)) for n in names)


def tensors(spec: TensorSpec) -> st.SearchStrategy[np.ndarray]:
    # Moderate magnitudes: float32 sums of a few terms stay well within the tolerances.
    elements = st.floats(-4, 4, width=32 if spec.dtype == "float32" else 64)
    return hnp.arrays(spec.dtype, spec.shape, elements=elements)


def models(schema: tuple[TensorSpec, ...]) -> st.SearchStrategy[Weights]:
    return st.fixed_dictionaries({s.name: tensors(s) for s in schema})


# Example counts, as the coordinator weights updates by them.
example_counts = st.integers(min_value=1, max_value=10_000).map(float)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[tuple[TensorSpec, ...], Weights, list[tuple[Weights, float]]]:
    schema = draw(schemas())
    base = draw(models(schema))
    updates = draw(st.lists(st.tuples(models(schema), example_counts), min_size=1, max_size=6))
    return schema, base, updates


def reference_sum(updates: list[tuple[Weights, float]], base: Weights | None) -> dict[str, np.ndarray]:
    """Σ wᵢ (xᵢ − base) in float64, written out directly."""
    out = {}
    for name in updates[0][0]:
        b = 0.0 if base is None else np.asarray(base[name], np.float64)
        out[name] = np.sum([w * (np.asarray(u[name], np.float64) - b) for u, w in updates], axis=0)
    return out


def fold(schema, updates, base=None) -> WeightedSum:
    acc = WeightedSum(schema, base)
    for update, weight in updates:
        acc.add(update, weight)
    return acc


def assert_close(got: Weights, want: dict[str, np.ndarray], schema) -> None:
    assert set(got) == {s.name for s in schema}
    for spec in schema:
        assert got[spec.name].dtype == np.dtype(spec.dtype), spec.name
        assert got[spec.name].shape == spec.shape, spec.name
        np.testing.assert_allclose(got[spec.name], want[spec.name], rtol=RTOL, atol=ATOL, err_msg=spec.name)


@given(case=rounds())
def test_sum_without_base_matches_numpy(case) -> None:
    schema, _, updates = case
    acc = fold(schema, copy.deepcopy(updates))
    total = sum(w for _, w in updates)
    # The plain sum grows with the weights: compare it relative to the total weight.
    want = {k: v / total for k, v in reference_sum(updates, None).items()}
    assert_close({k: v / v.dtype.type(total) for k, v in acc.sum().items()}, want, schema)
    assert acc.count == len(updates)
    assert acc.total_weight == total
    assert list(acc.sum()) == list(acc.mean()) == [s.name for s in schema]  # schema order


@given(case=rounds())
def test_mean_without_base_matches_reference_weighted_mean(case) -> None:
    schema, _, updates = case
    acc = fold(schema, copy.deepcopy(updates))
    assert_close(acc.mean(), weighted_mean(updates), schema)


@given(case=rounds())
def test_mean_with_base_is_the_mean_delta(case) -> None:
    schema, base, updates = case
    acc = fold(schema, copy.deepcopy(updates), base=base)
    total = sum(w for _, w in updates)
    want = {k: v / total for k, v in reference_sum(updates, base).items()}
    assert_close(acc.mean(), want, schema)
    reference = weighted_mean(updates)
    assert_close(acc.mean(), {k: reference[k] - base[k].astype(np.float64) for k in reference}, schema)


@given(case=rounds(), with_base=st.booleans())
def test_folding_in_parts_gives_the_same_sum_and_leaves_the_updates_alone(case, with_base: bool) -> None:
    schema, base, updates = case
    kept = copy.deepcopy(updates)
    whole = fold(schema, kept, base=base if with_base else None)
    parts = WeightedSum(schema, base if with_base else None)
    for update, weight in copy.deepcopy(updates):
        for name, array in update.items():
            flat = np.array(array).reshape(-1)
            half = flat.size // 2
            parts.add_part(name, 0, flat[:half], weight)
            parts.add_part(name, half, flat[half:], weight)
        parts.end_add(weight)
    for name, array in whole.sum().items():
        np.testing.assert_array_equal(parts.sum()[name], array)
    assert parts.total_weight == whole.total_weight
    for (got, _), (want, _) in zip(kept, updates, strict=True):
        for name in want:
            assert got[name].tobytes() == want[name].tobytes()


def test_adding_leaves_the_update_as_it_was() -> None:
    schema = (TensorSpec("w", "float32", (3,)),)
    update = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    WeightedSum(schema, {"w": np.ones(3, np.float32)}).add(update, 2.0)
    np.testing.assert_array_equal(update["w"], [1.0, 2.0, 3.0])


def test_a_huge_finite_update_keeps_the_sum_and_the_mean_finite() -> None:
    # 1e35 × 10,000 examples is 1e39: Inf in float32, which is where the product used to be taken.
    schema = (TensorSpec("w", "float32", (2,)),)
    base = {"w": np.zeros(2, np.float32)}
    acc = WeightedSum(schema, base)
    acc.add({"w": np.full(2, 1e35, np.float32)}, 10_000.0)
    acc.add({"w": np.full(2, -3.4e38, np.float32)}, 10_000.0)  # and a delta near float32's own limit
    acc.add({"w": np.ones(2, np.float32)}, 1.0)
    mean = acc.mean()["w"]
    assert mean.dtype == np.float32 and np.isfinite(mean).all()
    np.testing.assert_allclose(mean, (1e35 * 1e4 - 3.4e38 * 1e4 + 1.0) / 20_001, rtol=1e-6)


def test_a_delta_that_overflows_float32_is_folded_in_float64() -> None:
    schema = (TensorSpec("w", "float32", (3,)),)
    base = {"w": np.array([-3e38, 0.0, 1.0], np.float32)}
    acc = WeightedSum(schema, base)
    norm = acc.add({"w": np.array([3e38, 1.0, 1.0], np.float32)}, 2.0)
    # 3e38 − (−3e38) is Inf in float32; folded in float64 it is 6e38, times the weight 2.
    np.testing.assert_allclose(acc._sum["w"], [2 * (3e38 - np.float64(np.float32(-3e38))), 2.0, 0.0], rtol=1e-7)
    assert norm > 1e38  # the update stands out by its norm, whatever the precision it was taken in


def test_delta_norm_is_the_float64_norm_and_names_a_non_finite_tensor() -> None:
    update = {"a": np.array([1e35, 0.0], np.float32), "b": np.array([3.0, 4.0], np.float32)}
    base = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    norm, bad = delta_norm(update, base)
    assert bad is None
    np.testing.assert_allclose(norm, 1e35, rtol=1e-6)
    assert delta_norm({"a": np.array([1.0, np.nan], np.float32)}, None)[1] == "a"


def test_sum_returns_copies() -> None:
    schema = (TensorSpec("w", "float64", (2,)),)
    acc = WeightedSum(schema)
    acc.add({"w": np.array([1.0, 1.0])}, 1.0)
    acc.sum()["w"][:] = 100.0
    np.testing.assert_array_equal(acc.sum()["w"], [1.0, 1.0])


def test_small_known_example() -> None:
    # (1·[0, 1] + 3·[4, 5]) / 4 = [3, 4]; minus base [1, 1] → [2, 3].
    schema = (TensorSpec("w", "float32", (2,)),)
    base = {"w": np.array([1.0, 1.0], np.float32)}
    acc = WeightedSum(schema, base)
    acc.add({"w": np.array([0.0, 1.0], np.float32)}, 1.0)
    acc.add({"w": np.array([4.0, 5.0], np.float32)}, 3.0)
    np.testing.assert_array_equal(acc.mean()["w"], np.array([2.0, 3.0], np.float32))
    np.testing.assert_array_equal(acc.sum()["w"], np.array([8.0, 12.0], np.float32))


@pytest.mark.parametrize("base", [None, {"w": np.zeros(2, np.float32)}], ids=["no-base", "base"])
def test_mean_of_empty_sum_raises(base) -> None:
    acc = WeightedSum((TensorSpec("w", "float32", (2,)),), base)
    with pytest.raises(ZeroDivisionError):
        acc.mean()


def test_weighted_mean_reference_small_example() -> None:
    got = weighted_mean([({"w": np.array([0.0, 2.0])}, 1.0), ({"w": np.array([3.0, 2.0])}, 2.0)])
    np.testing.assert_allclose(got["w"], [2.0, 2.0])


# --- FedAvg --------------------------------------------------------------------------------------

@st.composite
def frozen_rounds(draw: st.DrawFn):
    """A round where tensor 'frozen' is returned unchanged by every worker and 'trained' is not."""
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5))
    # Any finite float32 magnitudes; +0.0 only (w + 0.0 turns -0.0 into +0.0, equal but not bit-equal).
    frozen = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False,
                                                                    allow_infinity=False)))
    frozen = np.where(frozen == 0, np.float32(0), frozen).astype(np.float32)
    trained = draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32)))
    base = {"frozen": frozen, "trained": trained}
    updates = [({"frozen": frozen.copy(), "trained": draw(hnp.arrays(np.float32, shape,
                                                                     elements=st.floats(-4, 4, width=32)))},
                draw(example_counts)) for _ in range(draw(st.integers(1, 5)))]
    return base, updates


@given(case=frozen_rounds(), server_lr=st.sampled_from([1.0, 0.5, 2.0]))
def test_fedavg_leaves_unchanged_tensors_bit_exact(case, server_lr: float) -> None:
    base, updates = case
    schema = schema_of(base)
    acc = fold(schema, updates, base=base)
    fedavg = make_strategy("fedavg", {"server_lr": str(server_lr)})
    new, _ = fedavg.apply(fedavg.init(base), base, fedavg.aggregate(acc))
    assert new["frozen"].dtype == np.float32
    assert new["frozen"].tobytes() == base["frozen"].tobytes()


@given(case=rounds())
def test_fedavg_with_server_lr_1_is_the_weighted_mean_of_the_models(case) -> None:
    schema, base, updates = case
    acc = fold(schema, copy.deepcopy(updates), base=base)
    fedavg = make_strategy("fedavg")
    new, state = fedavg.apply(fedavg.init(base), base, fedavg.aggregate(acc))
    assert state.step == 1
    assert_close(new, weighted_mean(updates), schema)


@pytest.mark.parametrize("server_lr", [0.0, 0.5, 1.0, 1.7])
def test_server_sgd_scales_the_delta_by_server_lr(server_lr: float) -> None:
    weights = {"w": np.array([1.0, -2.0, 3.0], np.float32), "n": np.array([10.0], np.float64)}
    delta = {"w": np.array([0.5, 0.5, -1.0], np.float32), "n": np.array([-4.0], np.float64)}
    before = copy.deepcopy(weights), copy.deepcopy(delta)
    opt = ServerSGD(lr=server_lr)
    new, state = opt.step(opt.init(weights), weights, delta)
    assert state.step == 1
    np.testing.assert_allclose(new["w"], [1.0 + 0.5 * server_lr, -2.0 + 0.5 * server_lr, 3.0 - server_lr],
                               rtol=1e-6)
    np.testing.assert_allclose(new["n"], [10.0 - 4.0 * server_lr], rtol=1e-12)
    assert new["w"].dtype == np.float32 and new["n"].dtype == np.float64
    # Inputs are not modified.
    for got, want in zip((weights, delta), before, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_make_strategy() -> None:
    fedavg = make_strategy("fedavg")
    assert (fedavg.name, fedavg.aggregator, fedavg.optimizer) == ("fedavg", "mean", ServerSGD(lr=1.0))
    with pytest.raises(ConfigError, match=r"'strategy'.*Got 'fedsomething'") as info:
        make_strategy("fedsomething")
    assert info.value.option == "strategy"
