"""The songs task: cleaning, the fixed test set, partitions, federated standardisation, training."""

from __future__ import annotations

import copy
import csv
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec, parse_partition
from fedfleet.strategies.accumulate import WeightedSum
from fedfleet.tasks import Dataset, TrainParams, load_task
from fedfleet.tasks import songs as songs_mod
from fedfleet.tasks.songs import FEATURES, SongsTask, load_songs

DATA = Path(__file__).resolve().parents[1] / "data" / "spotify-hits"
DECADES = ["60", "70", "80", "90", "00", "10"]
ERA = {"60": 0, "70": 0, "80": 1, "90": 1, "00": 2, "10": 2}


def raw_rows() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """Every CSV row by uri, as (decade, row), read with the csv module only."""
    rows: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for decade in DECADES:
        with (DATA / f"dataset-of-{decade}s.csv").open(newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                rows.setdefault(rec["uri"], []).append((decade, rec))
    return rows


@pytest.fixture(scope="module")
def raw() -> dict[str, list[tuple[str, dict[str, str]]]]:
    return raw_rows()


@pytest.fixture(scope="module")
def expected(raw) -> dict[str, tuple[int, int]]:
    """uri → (era, decade index) of the tracks that survive cleaning."""
    out = {}
    for uri, entries in raw.items():
        eras = {ERA[d] for d, _ in entries}
        if len(eras) == 1:  # tracks listed under two different eras are ambiguous: dropped
            earliest = min((d for d, _ in entries), key=DECADES.index)
            out[uri] = (ERA[earliest], DECADES.index(earliest))
    return out


@pytest.fixture(scope="module")
def task() -> SongsTask:
    return SongsTask()


@pytest.fixture(scope="module")
def pool(task: SongsTask) -> Dataset:
    return task.train_pool()


@pytest.fixture(scope="module")
def test_set(task: SongsTask) -> Dataset:
    return task.load_test()


def rows_of(data: Dataset) -> np.ndarray:
    """Features and label side by side, rows in a canonical order: compare data sets as multisets."""
    table = np.column_stack([data.x, data.y.astype(np.float64)])
    return table[np.lexsort(table.T[::-1])]


# --- loading and cleaning ------------------------------------------------------------------------

def test_raw_files_are_the_documented_ones(raw) -> None:
    # SOURCE.md: 41 106 rows in all; some uris appear more than once.
    assert sum(len(v) for v in raw.values()) == 41_106
    assert len(raw) < 41_106


def test_cleaning_keeps_one_row_per_uri_and_drops_cross_era_tracks(raw, expected) -> None:
    s = load_songs()
    assert len(s.uri) == len(expected)
    assert set(s.uri) == set(expected)
    assert len(set(s.uri)) == len(s.uri)
    assert list(s.uri) == sorted(s.uri)  # stable order
    dropped = [u for u, entries in raw.items() if len({ERA[d] for d, _ in entries}) > 1]
    assert dropped and not set(dropped) & set(s.uri)
    assert s.x.shape == (len(expected), len(FEATURES))
    assert s.x.dtype == np.float64
    assert len(s.era) == len(s.decade) == len(s.track) == len(s.artist) == len(expected)


def test_labels_and_groups_come_from_the_earliest_decade(raw, expected) -> None:
    s = load_songs()
    got = {u: (int(e), int(d)) for u, e, d in zip(s.uri, s.era, s.decade, strict=True)}
    assert got == expected
    # A track listed under two decades of one era exists and is labelled by the earlier one.
    same_era_twice = [u for u, entries in raw.items() if len({d for d, _ in entries}) > 1 and u in expected]
    assert same_era_twice


def test_feature_values_are_the_csv_values(raw) -> None:
    s = load_songs()
    index = {u: i for i, u in enumerate(s.uri)}
    for uri in list(index)[::997]:
        _, rec = raw[uri][0]
        np.testing.assert_array_equal(s.x[index[uri]], [float(rec[f]) for f in FEATURES])
        assert s.track[index[uri]] == rec["track"]
        assert s.artist[index[uri]] == rec["artist"]


def test_three_classes_roughly_40_30_30() -> None:
    era = load_songs().era
    shares = np.bincount(era, minlength=3) / len(era)
    assert len(shares) == 3
    np.testing.assert_allclose(shares, [0.4, 0.3, 0.3], atol=0.03)


# --- the fixed test set --------------------------------------------------------------------------

def test_test_set_is_a_stratified_fifth(pool: Dataset, test_set: Dataset) -> None:
    era = load_songs().era
    total = np.bincount(era, minlength=3)
    held = np.bincount(test_set.y, minlength=3)
    for cls in range(3):
        assert abs(held[cls] / total[cls] - 0.2) <= 0.01
    assert abs(len(test_set) / len(era) - 0.2) <= 0.01
    assert len(test_set) + len(pool) == len(era)


def test_test_set_and_training_pool_split_the_data(pool: Dataset, test_set: Dataset) -> None:
    s = load_songs()
    both = Dataset(np.concatenate([test_set.x, pool.x]), np.concatenate([test_set.y, pool.y]))
    # Same multiset of (features, label) rows: every song is in exactly one of the two.
    np.testing.assert_array_equal(rows_of(both), rows_of(Dataset(s.x, s.era)))


def test_test_set_is_fixed_regardless_of_seeds(test_set: Dataset) -> None:
    np.random.seed(123)
    again = SongsTask().load_test()
    np.testing.assert_array_equal(again.x, test_set.x)
    np.testing.assert_array_equal(again.y, test_set.y)
    mask = songs_mod.test_mask(load_songs().era)
    np.random.seed(456)
    np.testing.assert_array_equal(songs_mod.test_mask(load_songs().era), mask)


# --- partitions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["iid", "natural", "dirichlet:0.5"])
@pytest.mark.parametrize("seed", [0, 1])
def test_partitions_cover_the_training_pool(task: SongsTask, pool: Dataset, scheme: str, seed: int) -> None:
    spec = parse_partition(scheme)
    count = 6
    parts = [task.load_partition(spec, i, count, seed) for i in range(count)]
    assert all(len(p) > 0 for p in parts)
    assert sum(len(p) for p in parts) == len(pool)
    joined = Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    np.testing.assert_array_equal(rows_of(joined), rows_of(pool))


def test_natural_partitions_follow_decades(task: SongsTask) -> None:
    # Contiguous shards of the pool sorted by decade. An era is two neighbouring decades, and each era
    # is larger than a sixth of the pool, so a part spans at most two eras; iid parts hold all three.
    pool_eras = np.bincount(task.train_pool().y)
    assert pool_eras.min() > pool_eras.sum() / 6
    natural = [task.load_partition(PartitionSpec("natural"), i, 6, 0) for i in range(6)]
    iid = [task.load_partition(PartitionSpec("iid"), i, 6, 0) for i in range(6)]
    assert max(len(np.unique(p.y)) for p in natural) <= 2
    assert sum(len(np.unique(p.y)) == 1 for p in natural) >= 3
    assert min(len(np.unique(p.y)) for p in iid) == 3


# --- federated standardisation -------------------------------------------------------------------

def test_summed_local_stats_give_the_central_mean_and_std(task: SongsTask, pool: Dataset) -> None:
    spec = PartitionSpec("dirichlet", 0.5)  # uneven parts
    acc = WeightedSum(task.stats_schema())
    for i in range(8):
        acc.add(task.local_stats(task.load_partition(spec, i, 8, seed=3)), 1.0)
    init = task.init_weights(0)
    weights = task.apply_stats(init, acc.sum())
    assert weights["scaler.mean"].dtype == weights["scaler.scale"].dtype == np.float32
    np.testing.assert_allclose(weights["scaler.mean"], pool.x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["scaler.scale"], pool.x.std(axis=0), rtol=1e-4)
    # The other tensors are untouched.
    for name in ("linear.weight", "linear.bias"):
        assert weights[name].tobytes() == init[name].tobytes()
    standardised = (pool.x - weights["scaler.mean"]) / weights["scaler.scale"]
    np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(standardised.std(axis=0), 1, atol=1e-3)


def test_local_stats_match_the_stats_schema(task: SongsTask, pool: Dataset) -> None:
    stats = task.local_stats(pool)
    schema = task.stats_schema()
    assert [s.name for s in schema] == list(stats)
    for spec in schema:
        assert stats[spec.name].dtype == np.dtype(spec.dtype)
        assert stats[spec.name].shape == spec.shape
    assert stats["count"][0] == len(pool)


def test_constant_feature_gets_scale_one(task: SongsTask) -> None:
    x = np.tile(np.arange(len(FEATURES), dtype=np.float64), (5, 1))
    x[:, 0] = [1, 2, 3, 4, 5]
    weights = task.apply_stats(task.init_weights(0), task.local_stats(Dataset(x, np.zeros(5, np.int64))))
    np.testing.assert_allclose(weights["scaler.scale"][1:], 1.0)
    assert weights["scaler.scale"][0] == pytest.approx(math.sqrt(2.0))


def test_apply_stats_without_examples_raises(task: SongsTask) -> None:
    empty = {s.name: np.zeros(s.shape, s.dtype) for s in task.stats_schema()}
    with pytest.raises(TaskError, match="no examples"):
        task.apply_stats(task.init_weights(0), empty)


# --- plausibility of one worker's statistics (the coordinator refuses an implausible report) --------

def test_every_partitions_honest_stats_are_plausible(task: SongsTask) -> None:
    for spec in (PartitionSpec("iid"), PartitionSpec("dirichlet", 0.1), PartitionSpec("natural")):
        for i in range(6):
            part = task.load_partition(spec, i, 6, seed=1)
            assert task.check_stats(task.local_stats(part), len(part)) is None


def test_stats_of_a_constant_and_a_single_song_are_plausible(task: SongsTask, pool: Dataset) -> None:
    # Cauchy–Schwarz holds with equality here: rounding must not make it look violated.
    one = Dataset(pool.x[:1], pool.y[:1])
    assert task.check_stats(task.local_stats(one), 1) is None
    same = Dataset(np.repeat(pool.x[:1] * 1.1, 997, axis=0), np.zeros(997, np.int64))
    assert task.check_stats(task.local_stats(same), 997) is None


def stats_with(task: SongsTask, pool: Dataset, **changes: tuple[int, float]) -> dict[str, np.ndarray]:
    stats = {k: v.copy() for k, v in task.local_stats(pool).items()}
    for name, (index, value) in changes.items():
        stats[name][index] = value
    return stats


@pytest.mark.parametrize(("changes", "num_examples", "message"), [
    ({"count": (0, 0.0)}, 1, r"count is 0; it must be a whole number in \[1, 1e\+09\]"),
    ({"count": (0, 2.5e9)}, 2_500_000_000, "count is 2.5e.09; it must be a whole number"),
    ({"count": (0, 10.5)}, 10, "count is 10.5; it must be a whole number"),
    ({"count": (0, -3.0)}, 1, "count is -3"),
    ({}, 7, r"count is \d+ but the report is for num_examples 7"),
    ({"sum": (3, 1e300)}, None, r"feature 'loudness': \|sum\| is 1e\+300, over count·1e\+09"),
    ({"sum": (0, -1e20)}, None, r"feature 'danceability': \|sum\| is 1e\+20"),
    ({"sumsq": (10, 1e300)}, None, r"feature 'tempo': sumsq is 1e\+300, outside \[0, count·1e\+18"),
    ({"sumsq": (1, -1.0)}, None, r"feature 'energy': sumsq is -1, outside \[0"),
    ({"sumsq": (11, 0.0)}, None, r"feature 'duration_ms': sumsq·count \(0\) is below sum² .*negative variance"),
])
def test_implausible_stats_are_named(task: SongsTask, pool: Dataset, changes: dict[str, tuple[int, float]],
                                     num_examples: int | None, message: str) -> None:
    stats = stats_with(task, pool, **changes)
    problem = task.check_stats(stats, len(pool) if num_examples is None else num_examples)
    assert problem is not None
    assert re.search(message, problem), problem


def test_stats_of_the_wrong_shape_are_implausible(task: SongsTask, pool: Dataset) -> None:
    stats = task.local_stats(pool)
    problem = task.check_stats({**stats, "sum": stats["sum"][:3]}, len(pool))
    assert problem == f"statistics must be count (1,), sum ({len(FEATURES)},) and sumsq ({len(FEATURES)},)"


def test_songs_mlp_checks_stats_like_songs(pool: Dataset) -> None:
    mlp = load_task("songs-mlp")
    stats = SongsTask().local_stats(pool)
    assert mlp.check_stats(stats, len(pool)) is None
    assert mlp.check_stats(stats, len(pool) - 1) is not None


@pytest.mark.parametrize(("total", "squares", "feature"), [
    (1e300, 1e300, "danceability"),  # finite in float64, but the mean overflows float32 (issue 12, item 3)
    (0.0, 1e300, "danceability"),  # a scale of 1e150
    (np.nan, 1.0, "danceability"),
])
def test_apply_stats_refuses_what_float32_cannot_hold(task: SongsTask, total: float, squares: float,
                                                     feature: str) -> None:
    stats = {s.name: np.zeros(s.shape, s.dtype) for s in task.stats_schema()}
    stats["count"][0] = 1.0
    stats["sum"][0], stats["sumsq"][0] = total, squares
    with pytest.raises(TaskError, match=f"feature '{feature}' .*not finite in float32"):
        task.apply_stats(task.init_weights(0), stats)


# --- training and evaluation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def standardised(task: SongsTask, pool: Dataset) -> dict[str, np.ndarray]:
    return task.apply_stats(task.init_weights(0), task.local_stats(pool))


def test_init_weights_are_seeded(task: SongsTask) -> None:
    a, b, c = task.init_weights(0), task.init_weights(0), task.init_weights(1)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert a["linear.weight"].tobytes() != c["linear.weight"].tobytes()
    assert a["linear.weight"].shape == (len(FEATURES), 3)
    assert all(v.dtype == np.float32 for v in a.values())


def test_untrained_model_is_near_uniform(task: SongsTask, standardised, test_set: Dataset) -> None:
    metrics = task.evaluate(standardised, test_set)
    assert metrics["loss"] == pytest.approx(math.log(3), abs=0.05)


def test_short_central_fit_beats_the_majority_class(task: SongsTask, standardised, pool: Dataset,
                                                    test_set: Dataset) -> None:
    before = copy.deepcopy(standardised)
    result = task.fit(standardised, pool, TrainParams(local_epochs=2, batch_size=64, lr=0.1, seed=0))
    # fit does not modify its input weights
    for name, array in before.items():
        assert standardised[name].tobytes() == array.tobytes()
    assert result.num_examples == len(pool)
    assert {"train_loss", "train_accuracy"} <= set(result.metrics)
    assert set(result.weights) == set(standardised)
    assert result.weights["linear.weight"].dtype == np.float32

    metrics = task.evaluate(result.weights, test_set)
    assert {"loss", "accuracy"} <= set(metrics)
    majority = np.bincount(test_set.y).max() / len(test_set)
    assert majority == pytest.approx(0.40, abs=0.02)
    assert metrics["accuracy"] > majority + 0.1
    assert metrics["loss"] < math.log(3) - 0.1

    # evaluate agrees with predictions computed here from the weights
    w = result.weights
    logits = ((test_set.x - w["scaler.mean"]) / w["scaler.scale"]) @ w["linear.weight"] + w["linear.bias"]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(logits.argmax(axis=1) == test_set.y)), abs=1e-3)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert metrics["loss"] == pytest.approx(float(-log_p[np.arange(len(test_set)), test_set.y].mean()),
                                            rel=1e-4)


def test_fit_is_reproducible_for_a_seed(task: SongsTask, standardised, pool: Dataset) -> None:
    small = Dataset(pool.x[:500], pool.y[:500])
    params = TrainParams(local_epochs=1, batch_size=32, lr=0.05, seed=7)
    a = task.fit(standardised, small, params)
    b = task.fit(standardised, small, params)
    c = task.fit(standardised, small, TrainParams(1, 32, 0.05, seed=8))
    assert a.weights["linear.weight"].tobytes() == b.weights["linear.weight"].tobytes()
    assert a.weights["linear.weight"].tobytes() != c.weights["linear.weight"].tobytes()


def test_load_task_finds_songs() -> None:
    task = load_task("songs")
    assert isinstance(task, SongsTask)
    assert task.name == "songs"


# --- malformed data directories ------------------------------------------------------------------

HEADER = ["track", "artist", "uri", *FEATURES, "target"]


def write_decades(folder: Path, rows: dict[str, list[list[str]]]) -> None:
    for decade in DECADES:
        with (folder / f"dataset-of-{decade}s.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(HEADER)
            writer.writerows(rows.get(decade, []))


def song(uri: str, first: float = 0.5) -> list[str]:
    return [f"track {uri}", "artist", uri, str(first), *["1"] * (len(FEATURES) - 1), "1"]


def test_cleaning_rules_on_a_small_data_set(tmp_path: Path) -> None:
    write_decades(tmp_path, {
        "60": [song("a", 0.1), song("b", 0.2), song("b", 0.2)],  # b twice in one file: kept once
        "70": [song("b", 0.2), song("c", 0.3)],  # b again, same era: kept, labelled 60s
        "80": [song("c", 0.3), song("d", 0.4)],  # c in the 70s and 80s: two eras, dropped
        "10": [song("e", 0.5)],
        "00": [song("e", 0.5)],  # e in 00s and 10s: one era, decade 00
    })
    s = load_songs(str(tmp_path))
    assert s.uri == ("a", "b", "d", "e")
    assert s.era.tolist() == [0, 0, 1, 2]
    assert [DECADES[d] for d in s.decade] == ["60", "60", "80", "00"]
    np.testing.assert_array_equal(s.x[:, 0], [0.1, 0.2, 0.4, 0.5])
    assert Counter(s.era.tolist()) == {0: 2, 1: 1, 2: 1}


def test_missing_decade_file_is_a_task_error(tmp_path: Path) -> None:
    write_decades(tmp_path, {"60": [song("a")]})
    (tmp_path / "dataset-of-90s.csv").unlink()
    with pytest.raises(TaskError, match=r"dataset-of-90s\.csv"):
        load_songs(str(tmp_path))


def test_non_numeric_feature_is_a_task_error(tmp_path: Path) -> None:
    bad = song("x")
    bad[3] = "loud"
    write_decades(tmp_path, {"70": [song("a"), bad]})
    with pytest.raises(TaskError, match="not a number"):
        load_songs(str(tmp_path))


def test_missing_column_is_a_task_error(tmp_path: Path) -> None:
    write_decades(tmp_path, {})
    (tmp_path / "dataset-of-80s.csv").write_text("track,artist,uri\nx,y,z\n")
    with pytest.raises(TaskError, match=r"dataset-of-80s\.csv"):
        load_songs(str(tmp_path))
