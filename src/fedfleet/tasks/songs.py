"""Song era: predict a song's era (1960s-70s, 80s-90s, 2000s-10s) from its Spotify audio features.

Data: the Spotify Hit Predictor CSVs (GPL-3.0, see data/spotify-hits/SOURCE.md), shipped with
fedfleet. Exact duplicates (same ``uri``) are kept once; tracks listed under decades of two different
eras are dropped, since their label is ambiguous. A fixed, seeded, stratified 20% stays on the
coordinator as the test set; the rest is split across workers.

Model: multinomial logistic regression in numpy, behind a standardisation layer whose mean and
scale are computed federatedly: workers report count, sum and sum of squares, never rows. With
``model=gbdt``, histogram gradient-boosted trees (``fedfleet.tasks.trees``): the statistics round then
counts each feature's values on a fine grid over its ``LIMITS`` (sums again, never rows), and the bins
are the global quantiles read off the summed grid.

Prediction (``fedfleet.tasks.predict``): the task predicts a song's era from its features, and offers
the predict page a search of the data set's songs by title and artist. The features' limits are what
Spotify's audio analysis can produce (its API documents 0..1 for the ratios, -1..11 for ``key``,
roughly -60..0 dB for ``loudness``), widened just enough that every song of the shipped data set
passes (a test checks that): a value outside them is a typo or a unit mix-up (seconds for
``duration_ms``, percent for a ratio), and a prediction from it would be noise, so it is refused.
"""

from __future__ import annotations

import csv
import functools
import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec, holdout_indices, split
from fedfleet.tasks import trees
from fedfleet.tasks.base import Dataset, FitResult, TrainParams, confusion_counts
from fedfleet.tasks.trees import booster
from fedfleet.tasks.trees.bins import grid_counts, quantile_edges
from fedfleet.types import Schema, TensorSpec, Weights

FEATURES = (
    "danceability", "energy", "key", "loudness", "mode", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo", "duration_ms", "time_signature",
    "chorus_hit", "sections",
)
DECADES = ("60", "70", "80", "90", "00", "10")
ERAS = ("1960s-70s", "1980s-90s", "2000s-10s")
_ERA_OF_DECADE = {"60": 0, "70": 0, "80": 1, "90": 1, "00": 2, "10": 2}
TEST_FRACTION = 0.2
TEST_SEED = 20_260_001  # fixed, so every run of every seed is scored on the same songs
# Bounds of one worker's statistics report (check_stats): far beyond any real partition or feature value.
MAX_STATS_COUNT = 1e9
MAX_FEATURE_ABS = 1e9
# model=gbdt: cells of the grid each feature's values are counted on before the first tree. Over the widest
# limits (duration_ms, 3 h) a cell is 2.6 s; over a 0..1 ratio, 0.00024: finer than any quantile bin needs.
GRID_CELLS = 4096
MODELS = ("logreg", "gbdt")


@dataclass(frozen=True)
class Limits:
    """What one audio feature can be at all (see the module's docstring), and what it is."""

    low: float
    high: float
    integer: bool
    unit: str
    description: str


LIMITS = {
    "danceability": Limits(0, 1, False, "", "how suitable for dancing, 0 to 1"),
    "energy": Limits(0, 1, False, "", "intensity and activity, 0 to 1"),
    "key": Limits(-1, 11, True, "", "pitch class, 0 = C … 11 = B; -1 if no key was detected"),
    "loudness": Limits(-60, 5, False, "dB", "average loudness in decibels, usually -60 to 0"),
    "mode": Limits(0, 1, True, "", "1 = major, 0 = minor"),
    "speechiness": Limits(0, 1, False, "", "presence of spoken words, 0 to 1"),
    "acousticness": Limits(0, 1, False, "", "confidence the track is acoustic, 0 to 1"),
    "instrumentalness": Limits(0, 1, False, "", "likelihood of no vocals, 0 to 1"),
    "liveness": Limits(0, 1, False, "", "presence of an audience, 0 to 1"),
    "valence": Limits(0, 1, False, "", "musical positiveness, 0 to 1"),
    "tempo": Limits(0, 300, False, "BPM", "estimated tempo in beats per minute"),
    "duration_ms": Limits(1_000, 3 * 3_600_000, False, "ms", "length in milliseconds"),
    "time_signature": Limits(0, 7, True, "", "estimated beats per bar (0 or 1 when none was detected)"),
    "chorus_hit": Limits(0, 3 * 3_600, False, "s", "when the chorus starts, in seconds from the beginning"),
    "sections": Limits(0, 1_000, True, "", "number of sections the track divides into"),
}


@dataclass(frozen=True)
class Songs:
    """The whole cleaned data set, in a stable order (by uri)."""

    x: np.ndarray  # float64, n × 15, raw feature values
    era: np.ndarray  # int64 label 0..2
    decade: np.ndarray  # int64 index into DECADES, the natural grouping
    track: tuple[str, ...]
    artist: tuple[str, ...]
    uri: tuple[str, ...]


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where the CSVs are: the option, $FEDFLEET_SONGS_DIR, the installed copy, or the source tree."""
    here = Path(__file__).resolve()
    chosen = override or os.environ.get("FEDFLEET_SONGS_DIR")
    if chosen:
        # A folder the user named must hold the data: falling back to the bundled copy would hide a typo.
        candidates = [Path(chosen)]
    else:
        candidates = [here.parents[1] / "_data" / "spotify-hits", here.parents[3] / "data" / "spotify-hits"]
    for c in candidates:
        if (c / "dataset-of-60s.csv").is_file():
            return c
    raise TaskError("Spotify song CSVs (dataset-of-60s.csv ... dataset-of-10s.csv) not found; looked in "
                    + ", ".join(str(c) for c in candidates)
                    + ". Set FEDFLEET_SONGS_DIR or the task option data_dir to the folder holding them.")


@functools.cache
def load_songs(directory: str | None = None) -> Songs:
    """Read, clean and label the six decade files. Cached: every worker in a process shares it."""
    folder = data_dir(directory)
    rows: dict[str, tuple[list[str], set[str]]] = {}
    for decade in DECADES:
        path = folder / f"dataset-of-{decade}s.csv"
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                for rec in csv.DictReader(fh):
                    uri = rec["uri"]
                    values = [rec["track"], rec["artist"], *(rec[f] for f in FEATURES)]
                    if uri in rows:
                        rows[uri][1].add(decade)
                    else:
                        rows[uri] = (values, {decade})
        except (OSError, KeyError, csv.Error) as exc:
            raise TaskError(f"cannot read {path}: {exc!r}") from exc
    keep = sorted(u for u, (_, decs) in rows.items() if len({_ERA_OF_DECADE[d] for d in decs}) == 1)
    try:
        x = np.array([[float(v) for v in rows[u][0][2:]] for u in keep], dtype=np.float64)
    except ValueError as exc:
        raise TaskError(f"a feature value in {folder} is not a number: {exc}") from exc
    # A track listed under two decades of one era is labelled by its earliest decade.
    first = [min(rows[u][1], key=DECADES.index) for u in keep]
    return Songs(
        x=x,
        era=np.array([_ERA_OF_DECADE[d] for d in first], dtype=np.int64),
        decade=np.array([DECADES.index(d) for d in first], dtype=np.int64),
        track=tuple(rows[u][0][0] for u in keep),
        artist=tuple(rows[u][0][1] for u in keep),
        uri=tuple(keep),
    )


def test_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the fixed, stratified held-out test set."""
    return stratified_mask(labels, TEST_FRACTION, TEST_SEED)


def stratified_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a seeded ``fraction`` of each class's rows (rounded per class)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        mask[idx[: round(fraction * len(idx))]] = True
    return mask


@functools.cache
def training_rows(directory: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The songs outside the test set: features, era and decade, computed once per process (read-only): a
    process that loads partition after partition (a simulation's executor) does not select them again."""
    s = load_songs(directory)
    keep = ~test_mask(s.era)
    rows = (s.x[keep], s.era[keep], s.decade[keep])
    for a in rows:
        a.flags.writeable = False
    return rows


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


class SongsTask:
    """Multinomial logistic regression on 15 standardised audio features, 3 eras."""

    name = "songs"
    classes = ERAS
    features = FEATURES
    target_name = "era"
    # Set from statistics, never by training (fit leaves them as they are): a run with central DP keeps them
    # out of the noised aggregate, which would otherwise blur the standardisation for nothing.
    frozen_tensors = ("scaler.mean", "scaler.scale")
    DATA_OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("data_dir", str, None, "folder holding the song CSVs", optional=True,
               default_text="$FEDFLEET_SONGS_DIR, else the copy shipped with fedfleet"),
    )
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        *DATA_OPTIONS,
        Option("model", str, "logreg", "logreg: logistic regression; gbdt: histogram gradient-boosted trees, one "
               "tree level per round (--rounds n_trees x max_depth)", choices=MODELS),
        *trees.OPTIONS,
    )

    def __init__(self, data_dir: str | None = None, model: str = "logreg", **gbdt: Any) -> None:
        """``gbdt``: the options in ``trees.OPTIONS`` (checked by ``fedfleet.tasks.task_arguments``), used
        with ``model=gbdt`` only."""
        self.data_dir = data_dir
        self.model_name = model
        self.gbdt: trees.Gbdt | None = None
        unknown = sorted(set(gbdt) - set(trees.NAMES))
        if unknown:
            raise TaskError(f"the songs task takes no option {unknown[0]!r}")
        if model == "gbdt":
            checked = {o.name: o.check(gbdt[o.name], "task option") if o.name in gbdt else o.default
                       for o in trees.OPTIONS}
            self.gbdt = trees.Gbdt(trees.params(checked, len(FEATURES), len(ERAS)))
            # A standardisation from public knowledge (for central DP) is no stand-in for the bins: without
            # public_stats, privacy.task_problem refuses --dp and --secure-aggregation for this task too.
            self.public_stats = None  # type: ignore[assignment]
        elif model not in MODELS:
            raise TaskError(f"the songs task's model must be one of {', '.join(MODELS)}, not {model!r}")

    def check_run(self, config: Any) -> str | None:
        """Why the run's settings cannot train this model (``fedfleet.tasks.check_run``), or None."""
        return None if self.gbdt is None else trees.run_problem(config, self.gbdt.p)

    def _songs(self) -> Songs:
        return load_songs(self.data_dir)

    def train_pool(self) -> Dataset:
        x, y, _ = training_rows(self.data_dir)
        return Dataset(x, y)

    def load_test(self) -> Dataset:
        s = self._songs()
        mask = test_mask(s.era)
        return Dataset(s.x[mask], s.era[mask])

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        x, y, groups = training_rows(self.data_dir)
        part = split(y, groups, spec, count, seed)[index]
        return Dataset(x[part], y[part])

    def load_server_val(self, spec: PartitionSpec, seed: int) -> Dataset:
        """The coordinator's validation set (``--server-val``): the pool's examples ``load_partition`` leaves out."""
        x, y, _ = training_rows(self.data_dir)
        keep = holdout_indices(y, spec.holdout, seed)
        return Dataset(x[keep], y[keep])

    def init_weights(self, seed: int) -> Weights:
        if self.gbdt is not None:  # edges and examples are set from the statistics round (apply_stats)
            p = self.gbdt.p
            return booster.init_weights(p, np.zeros((p.features, p.bins - 1)), 1.0)
        rng = np.random.default_rng([seed, 0xA11])
        d, k = len(FEATURES), len(ERAS)
        return {
            "scaler.mean": np.zeros(d, dtype=np.float32),
            "scaler.scale": np.ones(d, dtype=np.float32),
            "linear.weight": (rng.standard_normal((d, k)) * 0.01).astype(np.float32),
            "linear.bias": np.zeros(k, dtype=np.float32),
        }

    def stats_schema(self) -> Schema:
        d = len(FEATURES)
        if self.gbdt is not None:
            return (TensorSpec("count", "float64", (1,)), TensorSpec("grid", "float64", (d, GRID_CELLS)))
        return (TensorSpec("count", "float64", (1,)), TensorSpec("sum", "float64", (d,)),
                TensorSpec("sumsq", "float64", (d,)))

    def local_stats(self, data: Dataset) -> Weights:
        if self.gbdt is not None:
            return {"count": np.array([len(data)], dtype=np.float64),
                    "grid": grid_counts(data.x, _LOW, _HIGH, GRID_CELLS)}
        return {"count": np.array([len(data)], dtype=np.float64), "sum": data.x.sum(axis=0),
                "sumsq": np.square(data.x).sum(axis=0)}

    def public_stats(self) -> Weights:
        """Statistics from public knowledge alone, for a run with central differential privacy, where the
        workers' own (a statistics round) would reach the model without noise: each feature as if uniform
        over its documented ``LIMITS`` (mean the midpoint, variance range²/12), one pseudo-example. The
        standardisation is coarser (tempo, loudness, duration_ms, chorus_hit and sections end up squeezed
        into a small part of their scale): with clipping and no noise to speak of, 30 rounds reach 0.63 with 8
        workers and 0.60 with 64, against 0.65 and 0.64 for plain FedAvg (benchmarks/results/dp_songs.md)."""
        low = np.array([LIMITS[f].low for f in FEATURES], dtype=np.float64)
        high = np.array([LIMITS[f].high for f in FEATURES], dtype=np.float64)
        mid = (low + high) / 2
        return {"count": np.array([1.0]), "sum": mid, "sumsq": mid**2 + (high - low) ** 2 / 12}

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        """Why one worker's count, sum and sum of squares cannot come from ``num_examples`` real songs.

        The bounds are loose (no audio feature is near 1e9 in magnitude; duration_ms, the largest, is
        ~1e7) but keep every report, and so every sum of them, far from what float64 and the float32
        model can hold. Cauchy–Schwarz (n·Σx² ≥ (Σx)²) rules out a negative variance.
        """
        if self.gbdt is not None:
            return _check_grid(stats, num_examples)
        count, total, squares = (np.asarray(stats.get(k, ()), dtype=np.float64).ravel()
                                 for k in ("count", "sum", "sumsq"))
        d = len(FEATURES)
        if count.shape != (1,) or total.shape != (d,) or squares.shape != (d,):
            return f"statistics must be count (1,), sum ({d},) and sumsq ({d},)"
        n = float(count[0])
        if not (n.is_integer() and 1 <= n <= MAX_STATS_COUNT):
            return f"count is {n:g}; it must be a whole number in [1, {MAX_STATS_COUNT:g}]"
        if n != num_examples:
            return f"count is {n:g} but the report is for num_examples {num_examples}"
        for j, feature in enumerate(FEATURES):
            s, sq = float(total[j]), float(squares[j])
            if not abs(s) <= n * MAX_FEATURE_ABS:
                return (f"feature {feature!r}: |sum| is {abs(s):g}, over count·{MAX_FEATURE_ABS:g} = "
                        f"{n * MAX_FEATURE_ABS:g}")
            if not 0 <= sq <= n * MAX_FEATURE_ABS**2:
                return (f"feature {feature!r}: sumsq is {sq:g}, outside [0, count·{MAX_FEATURE_ABS**2:g} = "
                        f"{n * MAX_FEATURE_ABS**2:g}]")
            if not sq * n >= s * s * (1 - 1e-9):
                return (f"feature {feature!r}: sumsq·count ({sq * n:g}) is below sum² ({s * s:g}), "
                        "a negative variance")
        return None

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        n = float(sums["count"][0])
        if not n > 0:
            raise TaskError(f"standardisation statistics cover no examples (count {n:g})")
        if self.gbdt is not None:
            edges = quantile_edges(sums["grid"], _LOW, _HIGH, self.gbdt.p.bins)
            return {**weights, booster.EDGES: edges, booster.EXAMPLES: np.array([n])}
        with np.errstate(over="ignore", invalid="ignore"):
            mean = sums["sum"] / n
            var = np.maximum(sums["sumsq"] / n - mean**2, 0.0)
            scale = np.where(var > 1e-12, np.sqrt(var), 1.0)
            mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
        # A finite float64 sum can still give a mean or scale float32 cannot hold: the model would hold Inf.
        bad = np.flatnonzero(~(np.isfinite(mean32) & np.isfinite(scale32)))
        if bad.size:
            j = int(bad[0])
            raise TaskError(f"standardisation statistics give feature {FEATURES[j]!r} mean {float(mean[j]):g} "
                            f"and scale {float(scale[j]):g}: not finite in float32 (|x| <= 3.4e38)")
        return {**weights, "scaler.mean": mean32, "scaler.scale": scale32}

    @staticmethod
    def _inputs(weights: Weights, x: np.ndarray) -> np.ndarray:
        return ((x - weights["scaler.mean"]) / weights["scaler.scale"]).astype(np.float32)

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        if self.gbdt is not None:  # one tree level; the SGD settings (lr, epochs, batch) do not apply
            return self.gbdt.fit(weights, data.x, data.y)
        x = self._inputs(weights, data.x)
        y = data.y
        w0, b0 = weights["linear.weight"], weights["linear.bias"]
        w, b = w0.astype(np.float32, copy=True), b0.astype(np.float32, copy=True)
        mu = np.float32(params.prox_mu)
        onehot = np.eye(len(ERAS), dtype=np.float32)[y]
        rng = np.random.default_rng(params.seed)
        lr = np.float32(params.lr)
        loss_sum, correct, seen = 0.0, 0, 0
        for _ in range(params.local_epochs):
            order = rng.permutation(len(y))
            loss_sum, correct, seen = 0.0, 0, 0
            for start in range(0, len(y), params.batch_size):
                idx = order[start:start + params.batch_size]
                p = softmax(x[idx] @ w + b)
                loss_sum += float(-np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).sum())
                correct += int((p.argmax(axis=1) == y[idx]).sum())
                seen += len(idx)
                grad = (p - onehot[idx]) / np.float32(len(idx))
                gw, gb = x[idx].T @ grad, grad.sum(axis=0)
                if mu:
                    gw, gb = gw + mu * (w - w0), gb + mu * (b - b0)
                w -= lr * gw
                b -= lr * gb
        new = {**weights, "linear.weight": w, "linear.bias": b}
        return FitResult(new, len(y), {"train_loss": loss_sum / max(seen, 1),
                                       "train_accuracy": correct / max(seen, 1)})

    def fit_central(self, epochs: int, lr: float, batch_size: int, seed: int = 0) -> Weights:
        """The reference federated runs are measured against: the same model and local SGD, trained
        on the whole training pool in one place, one epoch per federated round."""
        pool = self.train_pool()
        weights = self.apply_stats(self.init_weights(seed), self.local_stats(pool))
        for epoch in range(epochs):
            weights = self.fit(weights, pool, TrainParams(1, batch_size, lr, seed=epoch)).weights
        return weights

    def predict_proba(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        if self.gbdt is not None:
            return softmax(self.gbdt.raw(weights, x))
        return softmax(self._inputs(weights, x) @ weights["linear.weight"] + weights["linear.bias"])

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return self.evaluate_confusion(weights, data)[0]

    def evaluate_confusion(self, weights: Weights, data: Dataset) -> tuple[dict[str, float], np.ndarray | None]:
        """Loss and accuracy, and the era × predicted era counts of the same predictions."""
        p = self.predict_proba(weights, data.x)
        predicted = p.argmax(axis=1)
        loss = float(-np.log(p[np.arange(len(data)), data.y] + 1e-12).mean())
        return ({"loss": loss, "accuracy": float((predicted == data.y).mean())},
                confusion_counts(data.y, predicted, len(ERAS)))

    # --- prediction (fedfleet.tasks.predict) -----------------------------------------------------------

    def feature_schema(self) -> list[dict[str, Any]]:
        """The 15 audio features: the training songs' min, max and mean, and each feature's ``LIMITS``.
        Every feature is required: the era is predicted from a whole song, never a guessed part of one."""
        low, high, mean = _pool_ranges(self.data_dir)
        return [{"name": f, "kind": "number", "min": low[j], "max": high[j], "mean": mean[j],
                 "integer": LIMITS[f].integer, "unit": LIMITS[f].unit, "description": LIMITS[f].description,
                 "limits": [LIMITS[f].low, LIMITS[f].high], "required": True} for j, f in enumerate(FEATURES)]

    def predict_rows(self, weights: Weights, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Each era's probability for each row of feature name → value (rows × 3, in ``ERAS`` order)."""
        x = np.zeros((len(rows), len(FEATURES)), dtype=np.float64)
        for i, row in enumerate(rows):
            for j, feature in enumerate(FEATURES):
                value = row.get(feature)
                if value is None:
                    raise TaskError(f"row {i}: feature {feature!r} is missing")
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise TaskError(f"row {i}: feature {feature!r} takes a number, not {type(value).__name__}")
                x[i, j] = value
            chorus, duration = x[i, FEATURES.index("chorus_hit")], x[i, FEATURES.index("duration_ms")]
            if chorus > duration / 1000:
                raise TaskError(f"row {i}: 'chorus_hit' ({chorus:g} s) is after the end of the song "
                                f"('duration_ms' {duration:g} = {duration / 1000:g} s)")
        return self.predict_proba(weights, x).astype(np.float64)

    def search_songs(self, query: str, limit: int) -> dict[str, Any]:
        """The songs whose title or artist holds every word of ``query``, best matches first: titles that are
        the query, then titles that start with it, then the rest, each alphabetical."""
        songs = self._songs()
        haystack, held_out = _index(self.data_dir)
        words = query.casefold().split()
        hits = [i for i, text in enumerate(haystack) if all(w in text for w in words)]
        q = query.casefold().strip()
        best = heapq.nsmallest(limit, hits, key=lambda i: (
            songs.track[i].casefold() != q, not songs.track[i].casefold().startswith(q),
            songs.track[i].casefold(), songs.artist[i].casefold()))
        return {"query": query, "total": len(hits), "songs": [
            {"uri": songs.uri[i], "title": songs.track[i], "artist": songs.artist[i], "era": ERAS[songs.era[i]],
             "held_out": bool(held_out[i]), "features": dict(zip(FEATURES, songs.x[i].tolist(), strict=True))}
            for i in best]}


_LOW = np.array([LIMITS[f].low for f in FEATURES], dtype=np.float64)
_HIGH = np.array([LIMITS[f].high for f in FEATURES], dtype=np.float64)


def _check_grid(stats: Weights, num_examples: int) -> str | None:
    """Why one worker's model=gbdt statistics (count, and each feature's counts on the grid) cannot come from
    ``num_examples`` songs: every count a whole number, each feature's counts adding up to the count."""
    count = np.asarray(stats.get("count", ()), dtype=np.float64).ravel()
    grid = np.asarray(stats.get("grid", ()), dtype=np.float64)
    if count.shape != (1,) or grid.shape != (len(FEATURES), GRID_CELLS):
        return f"statistics must be count (1,) and grid ({len(FEATURES)}, {GRID_CELLS})"
    n = float(count[0])
    if not (n.is_integer() and 1 <= n <= MAX_STATS_COUNT) or n != num_examples:
        return f"count is {n:g}; it must be the report's num_examples {num_examples}"
    if not (np.all(grid >= 0) and np.all(grid == np.rint(grid))):
        return "grid counts must be whole numbers >= 0"
    off = np.flatnonzero(grid.sum(axis=1) != n)
    if off.size:
        return f"feature {FEATURES[int(off[0])]!r}: grid counts add up to {grid[off[0]].sum():g}, not count {n:g}"
    return None


@functools.cache
def _pool_ranges(directory: str | None) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Each feature's min, max and mean over the training songs (the coordinator's test set left out)."""
    pool = SongsTask(directory).train_pool().x
    return tuple(pool.min(axis=0).tolist()), tuple(pool.max(axis=0).tolist()), tuple(pool.mean(axis=0).tolist())


@functools.cache
def _index(directory: str | None) -> tuple[list[str], np.ndarray]:
    """Per song: its title and artist case-folded for search, and whether it is in the test set."""
    s = load_songs(directory)
    text = [f"{t}\n{a}".casefold() for t, a in zip(s.track, s.artist, strict=True)]
    return text, test_mask(s.era)
