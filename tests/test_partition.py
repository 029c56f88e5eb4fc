"""Partition specs and the iid / dirichlet / natural splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedfleet.partition import SCHEMES, PartitionSpec, parse_partition, partition_name, split

# --- parse_partition -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "spec"), [
    ("iid", PartitionSpec("iid")),
    ("natural", PartitionSpec("natural")),
    ("dirichlet:0.5", PartitionSpec("dirichlet", 0.5)),
    ("dirichlet:1", PartitionSpec("dirichlet", 1.0)),
    ("dirichlet:100", PartitionSpec("dirichlet", 100.0)),
    ("dirichlet:1e-3", PartitionSpec("dirichlet", 0.001)),
])
def test_parse_partition_good_values(text: str, spec: PartitionSpec) -> None:
    assert parse_partition(text) == spec


@pytest.mark.parametrize("text", ["iid", "natural", "dirichlet:0.5", "dirichlet:100", "dirichlet:0.001",
                                  "natural:region", "natural:2"])
def test_partition_spec_str_parses_back(text: str) -> None:
    spec = parse_partition(text)
    assert str(spec) == text
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize("text", [
    "", "IID", "Natural", " iid", "iid ", "iid:1", "natural:", "random", "dirichlet",
    "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf", "dirichlet:abc",
    "dirichlet:1:2", "dirichlet=0.5", ":0.5",
])
def test_parse_partition_bad_values_list_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_partition(text)
    message = str(info.value)
    for scheme in SCHEMES:
        assert scheme in message
    assert f"Got {text!r}" in message


def test_partition_names_sort_and_name_the_count() -> None:
    names = [partition_name(i, 12) for i in range(12)]
    assert names == sorted(names)
    assert names[3] == "part-003-of-012"
    assert len(set(names)) == 12


# --- split ---------------------------------------------------------------------------------------

SPECS = [PartitionSpec("iid"), PartitionSpec("natural"), PartitionSpec("dirichlet", 0.1),
         PartitionSpec("dirichlet", 1.0), PartitionSpec("dirichlet", 100.0)]
SPEC_IDS = [str(s) for s in SPECS]


def assert_valid_split(parts: list[np.ndarray], n: int, count: int) -> None:
    """Disjoint, non-empty, sorted parts that together cover 0..n-1 exactly once."""
    assert len(parts) == count
    for p in parts:
        assert len(p) > 0
        assert np.issubdtype(p.dtype, np.integer)
        assert np.all(np.diff(p) > 0)  # sorted, no repeats within a part
    joined = np.concatenate(parts)
    assert len(joined) == n  # no index twice across parts ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # ... and every index once


def dataset(n: int = 600, classes: int = 3, groups: int = 6, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, classes, n), rng.integers(0, groups, n)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("count", [1, 2, 7, 12])
def test_split_is_a_partition_of_all_indices(spec: PartitionSpec, count: int) -> None:
    labels, groups = dataset()
    assert_valid_split(split(labels, groups, spec, count, seed=3), len(labels), count)


@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    data=st.data(),
    alpha=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=150)
def test_any_split_is_a_partition(labels: list[int], data: st.DataObject, alpha: float, seed: int) -> None:
    y = np.array(labels)
    groups = np.array(data.draw(st.lists(st.integers(0, 5), min_size=len(y), max_size=len(y))))
    count = data.draw(st.integers(1, len(y)))
    for spec in (PartitionSpec("iid"), PartitionSpec("natural"), PartitionSpec("dirichlet", alpha)):
        assert_valid_split(split(y, groups, spec, count, seed), len(y), count)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_split_is_deterministic_for_a_seed_and_differs_between_seeds(spec: PartitionSpec) -> None:
    labels, groups = dataset()
    a = split(labels, groups, spec, 8, seed=11)
    b = split(labels.copy(), groups.copy(), spec, 8, seed=11)
    c = split(labels, groups, spec, 8, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_split_does_not_depend_on_global_random_state() -> None:
    labels, groups = dataset()
    np.random.seed(1)
    a = split(labels, groups, PartitionSpec("dirichlet", 0.5), 5, seed=0)
    np.random.seed(2)
    b = split(labels, groups, PartitionSpec("dirichlet", 0.5), 5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_parts_have_balanced_sizes() -> None:
    labels, groups = dataset(n=1003)
    sizes = [len(p) for p in split(labels, groups, PartitionSpec("iid"), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label distribution and the global one."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    tv = [0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - overall).sum() for p in parts]
    return float(np.mean(tv))


def test_small_dirichlet_alpha_is_more_label_skewed_than_large() -> None:
    labels = np.repeat(np.arange(3), 1000)
    skew = {alpha: np.mean([label_skew(labels, split(labels, None, PartitionSpec("dirichlet", alpha), 10, s))
                            for s in range(5)]) for alpha in (0.1, 100.0)}
    iid = np.mean([label_skew(labels, split(labels, None, PartitionSpec("iid"), 10, s)) for s in range(5)])
    assert skew[0.1] > 0.3  # most parts are dominated by one or two classes
    assert skew[100.0] < 0.1  # close to the global mix, like iid
    assert iid < 0.1
    assert skew[0.1] > 3 * skew[100.0]


def test_natural_parts_hold_few_groups() -> None:
    # 6 groups of unequal sizes, each at least as large as one part: a part spans at most two groups.
    sizes = [120, 80, 100, 90, 110, 100]
    groups = np.repeat(np.arange(6), sizes)
    rng = np.random.default_rng(5)
    perm = rng.permutation(len(groups))
    groups = groups[perm]
    labels = rng.integers(0, 3, len(groups))
    parts = split(labels, groups, PartitionSpec("natural"), 12, seed=0)
    assert_valid_split(parts, len(groups), 12)
    held = [len(np.unique(groups[p])) for p in parts]
    assert max(held) <= 2
    # Each group lands in few parts too (contiguous shards), while iid spreads every group everywhere.
    assert all(len({i for i, p in enumerate(parts) if np.any(groups[p] == g)}) <= 4 for g in range(6))
    iid = split(labels, groups, PartitionSpec("iid"), 12, seed=0)
    assert min(len(np.unique(groups[p])) for p in iid) == 6


def test_natural_with_as_many_parts_as_equal_groups_gives_one_group_per_part() -> None:
    groups = np.repeat(np.arange(4), 25)
    parts = split(np.zeros(100, int), groups, PartitionSpec("natural"), 4, seed=9)
    assert sorted(int(np.unique(groups[p])[0]) for p in parts) == [0, 1, 2, 3]
    assert all(len(np.unique(groups[p])) == 1 for p in parts)


def test_natural_needs_groups() -> None:
    with pytest.raises(ValueError, match="groups"):
        split(np.zeros(10, int), None, PartitionSpec("natural"), 2, seed=0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("count", [0, -1, 11, 100])
def test_count_outside_1_to_n_raises(spec: PartitionSpec, count: int) -> None:
    labels, groups = dataset(n=10)
    with pytest.raises(ValueError, match=f"cannot split 10 examples into {count} non-empty parts"):
        split(labels, groups, spec, count, seed=0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_as_many_parts_as_examples_gives_one_example_each(spec: PartitionSpec) -> None:
    labels, groups = dataset(n=9)
    parts = split(labels, groups, spec, 9, seed=4)
    assert_valid_split(parts, 9, 9)
    assert all(len(p) == 1 for p in parts)


def test_a_split_asked_again_is_remembered_and_read_only_and_new_labels_give_a_new_one() -> None:
    labels = np.random.default_rng(3).integers(0, 10, 5000)
    spec = parse_partition("dirichlet:0.5")
    first = split(labels, labels, spec, 50, seed=1)
    again = split(labels.copy(), labels.copy(), spec, 50, seed=1)  # equal labels in another array: the same split
    assert all(a is b for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="read-only"):
        first[0][0] = 1
    changed = labels.copy()
    changed[:2500] = (changed[:2500] + 1) % 10
    other = split(changed, changed, spec, 50, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, split(labels, labels, spec, 50, seed=2), strict=True))
