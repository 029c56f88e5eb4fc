"""Sampling workers for a round, the quorum, and a round's bookkeeping."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedfleet.coordinator.rounds import Answer, federated_eval, new_round, quorum_count, sample
from fedfleet.strategies.accumulate import WeightedSum
from fedfleet.types import TensorSpec


def names(n: int) -> list[str]:
    return [f"worker-{i:03d}" for i in range(n)]


def expected_size(n: int, percent: int, at_least: int) -> int:
    """min(n, max(at_least, ⌈percent/100 · n⌉)) in exact arithmetic."""
    return min(n, max(at_least, math.ceil(Fraction(percent, 100) * n)))


def is_subsequence(sub: list[str], seq: list[str]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


@given(n=st.integers(1, 60), percent=st.integers(1, 100), at_least=st.integers(0, 70),
       seed=st.integers(0, 2**32 - 1), round=st.integers(0, 10**6), attempt=st.integers(0, 5))
def test_sample_is_a_reproducible_ordered_subset(n: int, percent: int, at_least: int, seed: int, round: int,
                                                 attempt: int) -> None:
    candidates = names(n)
    chosen = sample(candidates, percent / 100, at_least, seed, round, attempt)
    assert chosen == sample(list(candidates), percent / 100, at_least, seed, round, attempt)
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(candidates)
    assert is_subsequence(chosen, candidates)  # chosen workers keep the candidates' order
    assert len(chosen) >= min(n, max(at_least, 1))


@given(n=st.integers(1, 200), percent=st.integers(1, 100), at_least=st.integers(0, 250))
def test_sample_size_is_ceil_fraction_at_least_at_least_capped_at_n(n: int, percent: int, at_least: int) -> None:
    # Fractions written in decimal (0.07, 0.14, ...) are not exact binary floats; the size must be the
    # ceiling of the decimal fraction times n all the same (0.07 × 100 workers is 7, not 8).
    chosen = sample(names(n), percent / 100, at_least, seed=0, round=1, attempt=0)
    assert len(chosen) == expected_size(n, percent, at_least)


@pytest.mark.parametrize(("n", "fraction", "at_least", "size"), [
    (10, 1.0, 1, 10), (10, 0.5, 1, 5), (10, 0.25, 1, 3), (10, 0.01, 1, 1), (10, 0.01, 4, 4),
    (10, 0.5, 20, 10), (3, 0.34, 0, 2), (1, 0.1, 0, 1),
])
def test_sample_size_examples(n: int, fraction: float, at_least: int, size: int) -> None:
    assert len(sample(names(n), fraction, at_least, seed=5, round=2, attempt=0)) == size


def test_sample_size_is_exact_for_decimal_fractions() -> None:
    # 0.07 × 100 is 7.000000000000001 in floating point; the sample must still be 7 workers, not 8.
    for n, percent in [(100, 7), (50, 14), (25, 28), (100, 57), (10, 70)]:
        assert len(sample(names(n), percent / 100, 1, seed=0, round=1, attempt=0)) == n * percent // 100, (
            n, percent)


def test_sample_varies_with_seed_round_and_attempt() -> None:
    candidates = names(40)
    base = sample(candidates, 0.25, 1, seed=1, round=1, attempt=0)
    others = [sample(candidates, 0.25, 1, seed=2, round=1, attempt=0),
              sample(candidates, 0.25, 1, seed=1, round=2, attempt=0),
              sample(candidates, 0.25, 1, seed=1, round=1, attempt=1)]
    for other in others:
        assert other != base
    # Over many rounds every worker gets picked.
    picked = {w for r in range(60) for w in sample(candidates, 0.25, 1, seed=1, round=r, attempt=0)}
    assert picked == set(candidates)


def test_sample_of_everyone_is_everyone_in_order() -> None:
    candidates = ["c", "a", "b"]
    assert sample(candidates, 1.0, 1, seed=9, round=3, attempt=0) == ["c", "a", "b"]


def test_sample_of_no_candidates_is_empty() -> None:
    assert sample([], 0.5, 0, seed=0, round=1, attempt=0) == []


@given(percent=st.integers(1, 100), sampled=st.integers(0, 10_000))
def test_quorum_count_is_exact_ceiling_and_at_least_one(percent: int, sampled: int) -> None:
    assert quorum_count(percent / 100, sampled) == max(1, math.ceil(Fraction(percent, 100) * sampled))


@pytest.mark.parametrize(("quorum", "sampled", "needed"), [
    (0.5, 4, 2), (0.5, 5, 3), (1.0, 7, 7), (0.01, 7, 1), (0.7, 10, 7), (0.3, 10, 3), (0.5, 0, 1), (1.0, 1, 1),
])
def test_quorum_count_examples(quorum: float, sampled: int, needed: int) -> None:
    assert quorum_count(quorum, sampled) == needed


def test_new_round_bookkeeping() -> None:
    schema = (TensorSpec("w", "float32", (4, 2)), TensorSpec("b", "float64", (2,)))
    state = new_round(3, 1, "train", ["a", "b", "c", "d"], quorum=0.5, schema=schema,
                      accumulator=WeightedSum(schema), timeout=5.0)
    assert state.needed == 2
    assert state.pool.size == 4 * 2 * 4 + 2 * 8
    assert state.deadline > state.started
    assert state.pending == ["a", "b", "c", "d"]
    state.answered["c"] = Answer(30, {"train_loss": 1.0, "train_accuracy": 0.5}, norm=1.0)
    state.answered["a"] = Answer(10, {"train_loss": 3.0}, norm=1.0)
    assert state.pending == ["b", "d"]
    metrics = state.worker_metrics()
    assert metrics["train_loss"] == pytest.approx((30 * 1.0 + 10 * 3.0) / 40)
    assert metrics["train_accuracy"] == pytest.approx(0.5)  # the mean of those who reported it
    assert new_round(1, 0, "stats", ["a"], 0.5, schema, None, 1.0).worker_metrics() == {}


@pytest.mark.parametrize("reports", [
    [{"val_examples": 1.0}],  # no val_accuracy: skipped, not a KeyError
    [{"val_accuracy": 0.9, "val_loss": 0.1}],  # no val_examples
    [{"val_examples": 5.0, "val_accuracy": 7.0, "val_loss": 0.1}],  # accuracy out of [0, 1]
    [{"val_examples": 0.0, "val_accuracy": 0.5, "val_loss": 0.1}],
    [],
])
def test_federated_evaluation_skips_reports_without_a_usable_score(reports: list[dict[str, float]]) -> None:
    assert federated_eval(reports) is None


def test_federated_evaluation_weights_by_split_size_and_ignores_partial_reports() -> None:
    fed = federated_eval([{"val_examples": 10.0, "val_accuracy": 0.5, "val_loss": 1.0},
                          {"val_examples": 30.0, "val_accuracy": 0.9, "val_loss": 0.5},
                          {"val_examples": 1e6}])
    assert fed is not None
    assert fed.accuracy == pytest.approx(0.8) and fed.loss == pytest.approx(0.625)
    assert (fed.accuracy_min, fed.accuracy_max, fed.examples) == (0.5, 0.9, 40)


def test_federated_evaluation_counts_a_negative_r2_when_the_task_says_scores_go_that_low() -> None:
    # A regression site whose model is still worse than predicting its mean reports R² < 0: an honest score.
    reports = [{"val_examples": 10.0, "val_accuracy": -0.5, "val_loss": 3.0},
               {"val_examples": 30.0, "val_accuracy": 0.5, "val_loss": 1.0}]
    skipped = federated_eval(reports)
    assert skipped is not None and skipped.examples == 30  # an accuracy cannot be negative: not counted
    fed = federated_eval(reports, low=-1e6)
    assert fed is not None and fed.examples == 40 and fed.accuracy == pytest.approx(0.25)
    assert fed.accuracy_min == -0.5
    assert federated_eval([{"val_examples": 1.0, "val_accuracy": -2e6, "val_loss": 1.0}], low=-1e6) is None


def test_a_planned_regression_task_says_its_score_may_be_negative(tmp_path: Path) -> None:
    from fedfleet.tasks import score_low, with_plan
    from fedfleet.tasks.tabular import TabularTask

    path = tmp_path / "site.csv"
    path.write_text("x,y\n" + "".join(f"{i},{2 * i + 0.5}\n" for i in range(40)))
    task = TabularTask(label="y")
    plan = task.make_plan([task.describe(task.load_site([path], 0.0, 0)[0])])
    assert score_low(task) == 0.0
    assert score_low(with_plan(task, plan)) < -1000
