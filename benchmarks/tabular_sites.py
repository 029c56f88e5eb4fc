"""Train on your own data (issue 14): the tabular task on sites' own files, next to the same model trained centrally.

    python benchmarks/tabular_sites.py           # full: 30 rounds, 3 seeds (mlp: 1), memory at 1, 100, 400 MB
    python benchmarks/tabular_sites.py --quick   # smoke: 5 rounds, one seed, logreg, small files

Three parts, each federated run a real ``fedfleet run --task tabular --data-split TRAIN --test-data TEST``
(a coordinator and one worker process per site on loopback, every site reading its own CSV file):

1. **Song era** (the shipped Spotify data as one CSV, the song task's fixed test split as a second one),
   8 sites cut by ``--partition iid``, ``dirichlet:0.1`` and ``natural:decade``; models logreg and mlp.
2. **A generated regression** (house prices: numbers, categories, missing values), 4 sites, ``iid`` and
   ``natural:region``; scored by R² and RMSE.
3. **Streaming memory**: the peak RSS of one worker process training on a generated CSV of each size.

The central reference is the same plan and model trained in one place (``TabularTask.fit_central``: one
epoch per round) on exactly the rows the sites trained on, shuffled: each site keeps ``--val-fraction`` of
its rows for validation, and the union of those rows is the validation set of both. Nothing is chosen on
the test set: the learning rate is chosen by central training's validation score after the last epoch, on
the iid split of the first seed; "best" is the round (epoch) whose model scores best on the validation rows
(accuracy, or the lowest mean squared error for regression), scored on the test set. Prints the tables and
writes benchmarks/results/tabular_sites.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]

from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks.base import TrainParams
from fedfleet.tasks.songs import DECADES, ERAS, FEATURES, load_songs, test_mask
from fedfleet.tasks.tabular import TabularTask
from fedfleet.tasks.tabular.read import in_validation
from fedfleet.types import Weights

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers, also when imported by path
from machine import memory_gib, versions, vm_hwm

RESULTS = Path(__file__).resolve().parent / "results"
SCRIPT = "benchmarks/tabular_sites.py"  # as the results files name it: relative to the repository root
MB = 1_000_000
BATCH = 32  # the run's default batch size, for both sides
VAL_FRACTION = 0.1  # the run's default: each site keeps this share of its rows to validate on
LR_GRID = (0.02, 0.05, 0.1, 0.2)
QUICK_LR_GRID = (0.05, 0.1)
SONG_PARTITIONS = ("iid", "dirichlet:0.1", "natural:decade")
HOUSE_PARTITIONS = ("iid", "natural:region")
SONG_WORKERS, HOUSE_WORKERS = 8, 4
# A site whose worker cannot start makes a run wait this long for it before failing (the default is 300 s).
WAIT_S = 60
# Seeds start at 1: seed 0's dirichlet:0.1 cut of the song data leaves one site a single row, which its
# validation split takes, and that site's worker refuses to start ("all 1 rows went to validation").
FIRST_SEED = 1


@dataclass(frozen=True)
class Experiment:
    """One data set: its files, the sites it is cut into and the task options that read it."""

    name: str
    train: Path
    test: Path
    workers: int
    label: str
    ignore: str | None
    partitions: tuple[str, ...]
    regression: bool

    def options(self, model: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"label": self.label, "model": model}
        if self.ignore:
            opts["ignore"] = self.ignore
        return opts


@dataclass
class Curve:
    """Scores of a model after each round (epoch): on the validation rows and on the test set."""

    val: list[dict[str, float]] = field(default_factory=list)
    test: list[dict[str, float]] = field(default_factory=list)

    def best(self, regression: bool) -> int:
        """Index of the round with the best validation score; ties go to the earlier round."""
        if regression:
            return min(range(len(self.val)), key=lambda i: self.val[i]["loss"])
        return max(range(len(self.val)), key=lambda i: self.val[i]["accuracy"])

    def summary(self, regression: bool) -> dict[str, Any]:
        b = self.best(regression)
        out: dict[str, Any] = {"final": self.test[-1]["accuracy"], "best": self.test[b]["accuracy"],
                               "best_round": b + 1, "val_final": self.val[-1]["accuracy"],
                               "test_curve": [round(m["accuracy"], 6) for m in self.test],
                               "val_curve": [round(m["loss" if regression else "accuracy"], 6) for m in self.val]}
        if regression:
            out |= {"final_rmse": self.test[-1]["rmse"], "best_rmse": self.test[b]["rmse"]}
        return out


# --- data ---------------------------------------------------------------------------------------------


def _cell(value: float) -> str:
    # Whole numbers as integers, so that the plan sees key, mode, sections ... as the whole numbers they are.
    return str(int(value)) if value.is_integer() else repr(value)


def write_songs(folder: Path) -> tuple[Path, Path]:
    """The cleaned song data set as songs-train.csv and songs-test.csv, the test rows being the song task's
    fixed held-out 20% (``songs.test_mask``), so that scores compare with the song task's."""
    s = load_songs()
    held_out = test_mask(s.era)
    decade_name = {i: ("19" if d in ("60", "70", "80", "90") else "20") + d + "s" for i, d in enumerate(DECADES)}
    paths = folder / "songs-train.csv", folder / "songs-test.csv"
    for path, rows in zip(paths, (np.flatnonzero(~held_out), np.flatnonzero(held_out)), strict=True):
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["uri", "track", "artist", *FEATURES, "decade", "era"])
            for i in rows:
                w.writerow([s.uri[i], s.track[i], s.artist[i], *(_cell(float(v)) for v in s.x[i]),
                            decade_name[int(s.decade[i])], ERAS[s.era[i]]])
    return paths


REGIONS = ("north", "south", "east", "west")
REGION_SHARE = (0.35, 0.30, 0.20, 0.15)  # sites of different sizes under natural:region
REGION_PRICE = np.array([40.0, -20.0, 0.0, 15.0])
REGION_SIZE = np.array([1.15, 0.9, 1.0, 1.05])  # and of different houses: natural:region is not IID
TYPES = ("flat", "terrace", "semi", "detached")
TYPE_SHARE = (0.3, 0.3, 0.25, 0.15)
TYPE_PRICE = np.array([-30.0, 0.0, 20.0, 60.0])
TYPE_SIZE = np.array([0.7, 0.9, 1.1, 1.5])
CONDITIONS = ("poor", "fair", "good", "excellent")
CONDITION_SHARE = (0.1, 0.3, 0.45, 0.15)
CONDITION_PRICE = np.array([-40.0, -10.0, 0.0, 25.0])
HEATING = ("gas", "electric", "oil", "heat_pump", "solar")
HEATING_SHARE = (0.6, 0.2, 0.1, 0.0999, 0.0001)  # solar: rarer than min_count at most sizes, so "other"
HEATING_PRICE = np.array([0.0, -5.0, -8.0, 10.0, 0.0])


def houses(rng: np.random.Generator, n: int) -> pa.Table:
    """``n`` generated house sales: numbers, categories, missing values (5% of sqft, 10% of age, 3% of
    condition) and a price that is linear in most of them plus one curved term (sqrt of the distance)."""
    region = rng.choice(len(REGIONS), n, p=REGION_SHARE)
    kind = rng.choice(len(TYPES), n, p=TYPE_SHARE)
    condition = rng.choice(len(CONDITIONS), n, p=CONDITION_SHARE)
    heating = rng.choice(len(HEATING), n, p=HEATING_SHARE)
    sqft = np.round(rng.lognormal(np.log(750 * TYPE_SIZE[kind] * REGION_SIZE[region]), 0.3), 1)
    rooms = np.clip(np.round(sqft / 250 + rng.normal(0, 0.7, n)), 1, 9).astype(np.int64)
    age = rng.integers(0, 121, n)
    distance = np.round(rng.exponential(8.0, n), 2)
    price = (50 + 0.15 * sqft + 6 * rooms - 0.5 * age + REGION_PRICE[region] + TYPE_PRICE[kind]
             + CONDITION_PRICE[condition] + HEATING_PRICE[heating] - 15 * np.sqrt(distance) + rng.normal(0, 20, n))

    def names(values: tuple[str, ...], codes: np.ndarray, missing: float = 0.0) -> pa.Array:
        return pa.array(np.array(values, dtype=object)[codes], mask=rng.random(n) < missing, type=pa.string())

    return pa.table({
        "region": names(REGIONS, region), "type": names(TYPES, kind),
        "sqft": pa.array(sqft, mask=rng.random(n) < 0.05), "rooms": pa.array(rooms),
        "age": pa.array(age, mask=rng.random(n) < 0.10), "condition": names(CONDITIONS, condition, 0.03),
        "heating": names(HEATING, heating), "distance_km": pa.array(distance), "price": pa.array(np.round(price, 2)),
    })


def write_houses(path: Path, seed: int, rows: int | None = None, size: int | None = None) -> int:
    """Generated houses into ``path`` a chunk at a time (so a file of any size is written in little memory):
    ``rows`` rows, or chunks until the file holds about ``size`` bytes. Returns the rows written."""
    rng = np.random.default_rng([seed, 0x4A5E])
    # About a tenth of the file a chunk (a row is ~55 bytes), so that a small file does not overshoot its size.
    chunk = 200_000 if size is None else int(np.clip(size // 550, 1_000, 200_000))
    written = 0
    with pa_csv.CSVWriter(path, houses(rng, 1).schema) as writer:
        while (rows is not None and written < rows) or (size is not None and path.stat().st_size < size):
            n = chunk if rows is None else min(chunk, rows - written)
            writer.write_table(houses(rng, n))
            written += n
    return written


def central_files(sites: Sequence[Path], seed: int, folder: Path) -> tuple[Path, Path]:
    """The rows the sites trained on and the rows they validated on, each as one CSV file: every site's file
    split by the rule its worker used (``read.in_validation`` of its seed and the row's index in its file),
    cells copied as text, so that the central model sees exactly the federated run's training rows.

    The training rows are shuffled (seeded), as a central pipeline would: the tabular task shuffles a site's
    rows together only up to ``task.SHUFFLE_BYTES`` of encoded rows, so a union larger than that, written as
    the sites' files one after another, each skewed to a few labels or decades, would be trained on in blocks."""
    train_tables, val_tables = [], []
    for site in sites:
        with site.open(newline="") as fh:
            header = next(csv.reader(fh))
        convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()), null_values=[],
                                        strings_can_be_null=False)
        table = pa_csv.read_csv(site, convert_options=convert)  # a site's file is small: whole is fine
        val = in_validation(seed, 0, table.num_rows, VAL_FRACTION)
        train_tables.append(table.filter(pa.array(~val)))
        val_tables.append(table.filter(pa.array(val)))
    train = pa.concat_tables(train_tables)
    train = train.take(pa.array(np.random.default_rng([seed, 0xC5]).permutation(train.num_rows)))
    paths = folder / "central-train.csv", folder / "central-val.csv"
    for path, table in zip(paths, (train, pa.concat_tables(val_tables)), strict=True):
        pa_csv.write_csv(table, path)
    return paths


# --- central ------------------------------------------------------------------------------------------


@dataclass
class Central:
    curve: Curve
    plan: dict[str, Any]
    weights: Weights
    seconds: float


def central_curve(options: Mapping[str, Any], train: Path, val: Path, test: Path, epochs: int, lr: float,
                  seed: int) -> Central:
    """``TabularTask.fit_central(train, epochs, lr, BATCH, seed)``, step for step (the smoke test checks
    the weights are the same), scored on ``val`` and ``test`` after every epoch as a run scores rounds."""
    task = TabularTask(**options)
    t0 = time.perf_counter()
    data, _ = task.load_site([train], 0.0, seed)
    planned = task.with_plan(task.make_plan([task.describe(data)]))
    val_data, test_data = planned.load_site([val], 0.0, seed)[0], planned.load_site([test], 0.0, seed)[0]
    weights = planned.init_weights(seed)
    curve = Curve()
    for epoch in range(epochs):
        weights = planned.fit(weights, data, TrainParams(1, BATCH, lr, seed=epoch)).weights
        curve.val.append(planned.evaluate(weights, val_data))
        curve.test.append(planned.evaluate(weights, test_data))
    return Central(curve, planned.plan, weights, time.perf_counter() - t0)


class CentralCache:
    """Central curves by what they depend on (files' contents, options, lr, seed, epochs): the lr sweep's
    curve on the first seed's iid split is the central reference of that run too, without training it twice."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, ...], Central] = {}

    def get(self, options: Mapping[str, Any], train: Path, val: Path, test: Path, epochs: int, lr: float,
            seed: int) -> Central:
        key = (*(hashlib.sha256(p.read_bytes()).hexdigest() for p in (train, val, test)),
               json.dumps(dict(options), sort_keys=True), repr(lr), str(seed), str(epochs))
        if key not in self._done:
            self._done[key] = central_curve(options, train, val, test, epochs, lr, seed)
        return self._done[key]


def same_plan(a: Any, b: Any) -> bool:
    """Whether two plans agree: the same names, vocabularies and counts, numbers equal to rounding (the
    federated plan sums the sites' sums, the central one sums the rows: the order of additions differs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_plan(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_plan(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


# --- federated ----------------------------------------------------------------------------------------


def fedfleet_run_args(exp: Experiment, model: str, partition: str, seed: int, lr: float, rounds: int,
                      train: str, test: str, out: str) -> list[str]:
    options = [a for k, v in exp.options(model).items() for a in ("--task-option", f"{k}={v}")]
    return ["fedfleet", "run", "--task", "tabular", *options, "--workers", str(exp.workers), "--rounds", str(rounds),
            "--partition", partition, "--seed", str(seed), "--lr", str(lr), "--batch-size", str(BATCH),
            "--val-fraction", str(VAL_FRACTION), "--wait-timeout", str(WAIT_S), "--data-split", train,
            "--test-data", test, "--out", out]


def federated(exp: Experiment, model: str, partition: str, seed: int, lr: float, rounds: int, out: Path,
              cache: CentralCache) -> dict[str, Any]:
    """One real ``fedfleet run`` and the central reference on the same rows; both scored the same way."""
    args = fedfleet_run_args(exp, model, partition, seed, lr, rounds, str(exp.train), str(exp.test), str(out))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedfleet", *args[1:], "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    run = RunDir(out)
    summary = run.read_summary()
    if done.returncode != 0 or summary is None or summary.state != "finished":
        failed = [line for log in sorted((out / "logs").glob("*.log")) for line in log.read_text().splitlines()
                  if "worker.failed" in line or "run.failed" in line]
        raise RuntimeError(f"fedfleet run {shlex.join(args[2:])} failed ({done.returncode}):\n" + "\n".join(failed))
    records = run.read_rounds()
    sites = sorted(run.sites_path.iterdir())
    train, val = central_files(sites, seed, out)
    central = cache.get(exp.options(model), train, val, exp.test, rounds, lr, seed)

    # A round's record holds the test scores of the model it made, and the workers' validation scores of
    # the model they were sent, the previous round's; the last model is scored here on the same rows.
    plan = run.read_plan()
    if plan is None:
        raise RuntimeError(f"the run in {out} finished without a plan.json")
    fed_task = TabularTask(**exp.options(model)).with_plan(plan)
    weights, _ = run.read_model()
    # The central files must hold exactly the sites' rows, split as the workers split them: checked by counts
    # here (the sites' training rows; the rows the sites' federated evaluation reported each round).
    splits = [fed_task.load_site([s], VAL_FRACTION, seed) for s in sites]
    site_train = [len(t) for t, _ in splits]
    site_val = [0 if v is None else len(v) for _, v in splits]
    val_rows = fed_task.load_site([val], 0.0, seed)[0]
    train_rows = len(fed_task.load_site([train], 0.0, seed)[0])
    # Round 1 scores the initial model, whose R² is below 0 at every site: federated evaluation leaves such a
    # score out (it takes scores in [0, 1]), so only rounds 2 on, the ones used here, are checked.
    if train_rows != sum(site_train) or any(r.fed_examples != len(val_rows) for r in records[1:]):
        raise RuntimeError(f"central-train.csv holds {train_rows} rows, the sites trained on {sum(site_train)}; "
                           f"central-val.csv holds {len(val_rows)}, the sites validated on "
                           f"{[r.fed_examples for r in records]}")
    curve = Curve()
    for r in records:
        if r.accuracy is None or r.loss is None:
            raise RuntimeError(f"round {r.round} of {out} has no test score")
        curve.test.append({"accuracy": r.accuracy, "loss": r.loss, **r.test_metrics})
    for r in records[1:]:
        if r.fed_accuracy is None or r.fed_loss is None:
            raise RuntimeError(f"round {r.round} of {out} has no federated evaluation")
        curve.val.append({"accuracy": r.fed_accuracy, "loss": r.fed_loss})
    curve.val.append(fed_task.evaluate(weights, val_rows))
    return {
        "seed": seed,
        "federated": {**curve.summary(exp.regression), "rounds": len(records),
                      "bytes_in": sum(r.bytes_in for r in records), "bytes_out": sum(r.bytes_out for r in records),
                      "s_per_round": statistics.median(r.seconds for r in records), "wall_s": wall,
                      "site_train_rows": site_train, "site_val_rows": site_val},
        "central": {**central.curve.summary(exp.regression), "seconds": central.seconds, "train_rows": train_rows,
                    "val_rows": len(val_rows)},
        "plan_matches_central": same_plan(plan, central.plan),
    }


def choose_lr(exp: Experiment, model: str, grid: Sequence[float], rounds: int, seed: int, work: Path,
              cache: CentralCache) -> tuple[float, dict[str, float]]:
    """The learning rate from ``grid`` whose central model scores best on the validation rows after the last
    epoch, on ``seed``'s iid split (cut as ``fedfleet run --data-split`` cuts it); and every lr's score."""
    from fedfleet.partition import parse_partition

    folder = work / f"lr-{exp.name}-{model}"
    sites = TabularTask(**exp.options(model)).split_data(exp.train, folder / "sites", exp.workers,
                                                         parse_partition("iid"), seed)
    train, val = central_files(sites, seed, folder)
    scores: dict[str, float] = {}
    for lr in grid:
        last = cache.get(exp.options(model), train, val, exp.test, rounds, lr, seed).curve.val[-1]
        scores[str(lr)] = last["loss"] if exp.regression else last["accuracy"]
    pick = (min if exp.regression else max)(grid, key=lambda lr: scores[str(lr)])
    return pick, scores


# --- memory -------------------------------------------------------------------------------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", *args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def worker_peak(data: Path, folder: Path) -> dict[str, float]:
    """Peak RSS of one ``fedfleet worker --data FILE`` process through a run of one round: it scans the
    file, describes it, scores the global model on its validation rows and trains on the rest.

    The peak is the worker's VmHWM, read while it runs (it only grows, so the last reading is the peak).
    Not ``ru_maxrss`` from wait4 or RUSAGE_CHILDREN: Linux starts a child's ru_maxrss at its parent's
    resident set when forked, so it would report this script's own size for a small worker."""
    coord_dir = folder / "coordinator"
    procs = [_spawn(["coordinator", "--task", "tabular", "--task-option", "label=price", "--workers", "1",
                     "--rounds", "1", "--round-timeout", "3600", "--linger", "1", "--data-dir", str(coord_dir),
                     "--host", "127.0.0.1", "--port", "0"], folder / "coordinator.log")]
    coord = procs[0]
    try:
        address = coord_dir / "coordinator.json"
        end = time.monotonic() + 120
        while not address.exists() or json.loads(address.read_text() or "{}").get("pid") != coord.pid:
            if coord.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the coordinator did not start; see {folder / 'coordinator.log'}")
            time.sleep(0.1)
        url = json.loads(address.read_text())["url"]
        t0 = time.perf_counter()
        worker = _spawn(["worker", "--coordinator", url, "--data", str(data), "--state-dir", str(folder / "worker"),
                         "--give-up", "30"], folder / "worker.log")
        procs.append(worker)
        peak = 0
        while worker.poll() is None:
            peak = max(peak, vm_hwm(worker.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        if worker.returncode != 0 or coord.wait(timeout=60) != 0:
            raise RuntimeError(f"the memory run failed; see {folder}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    records = RunDir(coord_dir).read_rounds()
    return {"peak_rss_mb": peak / MB, "worker_wall_s": wall, "round_s": records[-1].seconds,
            "train_r2": records[-1].worker_metrics["train_r2"]}


def memory(sizes_mb: Sequence[int], work: Path) -> list[dict[str, float]]:
    """Peak worker RSS for a generated CSV of each size; each file is deleted once measured."""
    if sizes_mb and not Path("/proc/self/status").exists():
        print("memory: skipped: the peak resident set is read from /proc, which this system does not have")
        return []
    out = []
    for size in sizes_mb:
        folder = work / f"memory-{size}"
        folder.mkdir()
        path = folder / "houses.csv"
        rows = write_houses(path, seed=size, size=size * MB)
        file_mb = path.stat().st_size / MB
        result = worker_peak(path, folder)
        path.unlink()
        out.append({"target_mb": size, "file_mb": file_mb, "rows": rows, **result})
        print(f"memory: {file_mb:7.1f} MB, {rows:>9,} rows: worker peak RSS {result['peak_rss_mb']:.0f} MB, "
              f"{result['worker_wall_s']:.1f} s", flush=True)
    return out


# --- report -------------------------------------------------------------------------------------------


def _stat(values: Sequence[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _kb(n: float) -> str:
    return f"{n / 1000:,.0f} KB" if n < 10 * MB else f"{n / MB:,.1f} MB"


def cell_rows(cells: Sequence[dict[str, Any]], regression: bool) -> list[str]:
    rows = []
    for c in cells:
        runs = c["runs"]
        fed = [r["federated"] for r in runs]
        cen = [r["central"] for r in runs]
        gap = [100 * (f["final"] - k["final"]) for f, k in zip(fed, cen, strict=True)]
        common = [c["model"], c["partition"], str(len(runs)), str(c["lr"])]
        scores = [_stat([f["final"] for f in fed]), _stat([f["best"] for f in fed]),
                  _stat([k["final"] for k in cen]), _stat([k["best"] for k in cen]), _stat(gap, 2)]
        if regression:
            scores[1:1] = [_stat([f["final_rmse"] for f in fed], 2)]
            scores[4:4] = [_stat([k["final_rmse"] for k in cen], 2)]
        rest = [str(fed[0]["rounds"]), _kb(statistics.mean(f["bytes_in"] + f["bytes_out"] for f in fed)),
                f"{statistics.median(f['s_per_round'] for f in fed):.2f}",
                f"{statistics.mean(f['wall_s'] for f in fed):.0f}",
                "yes" if all(r["plan_matches_central"] for r in runs) else "NO"]
        rows.append("| " + " | ".join(common + scores + rest) + " |")
    return rows


def tables(result: dict[str, Any]) -> str:
    rest = "| rounds | bytes moved / run | s / round | run wall s | plan = central's |"
    songs = ("| model | partition | seeds | lr | federated final | federated best-val | central final | "
             "central best-val | final gap (points) " + rest + "\n|---|---|---:|---:|" + "---:|" * 10)
    houses_ = ("| model | partition | seeds | lr | federated R² final | federated RMSE final | federated R² best-val | "
               "central R² final | central RMSE final | central R² best-val | final R² gap (points) " + rest
               + "\n|---|---|---:|---:|" + "---:|" * 12)
    mem = ("| file MB | rows | worker peak RSS MB | round s | worker wall s | train R² (its one epoch) |\n"
           "|---:|---:|---:|---:|---:|---:|")
    parts = [f"Song era, {SONG_WORKERS} sites, test accuracy:\n\n"
             + "\n".join([songs, *cell_rows(result["songs"], False)]),
             f"House prices (generated), {HOUSE_WORKERS} sites, test R² and RMSE (thousands):\n\n"
             + "\n".join([houses_, *cell_rows(result["regression"], True)])]
    if result["memory"]:
        parts.append("Streaming: one worker process through a round on a generated CSV:\n\n" + "\n".join(
            [mem, *(f"| {m['file_mb']:.1f} | {m['rows']:,} | {m['peak_rss_mb']:.0f} | {m['round_s']:.1f} | "
                    f"{m['worker_wall_s']:.1f} | {m['train_r2']:.4f} |" for m in result["memory"])]))
    return "\n\n".join(parts)


def _commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return None


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lrs = "\n".join(f"  - {k}: **{v['chosen']}** (validation {'MSE' if k.startswith('regression') else 'accuracy'}"
                    " by lr: " + ", ".join(f"{lr}: {s:.4f}" for lr, s in v["scores"].items()) + ")"
                    for k, v in result["lr"].items())
    return f"""# Train on your own data: federated tabular runs next to central training ({m['date']})

- Command: `{m['command']}` ({m['seconds'] / 60:.1f} min), at commit {m['commit']}
- Machine: {m['machine']}
- Seeds: {', '.join(map(str, m['seeds']))} (mlp: {', '.join(map(str, m['mlp_seeds']))}); {m['rounds']} rounds
- Learning rates, chosen on validation rows (below):
{lrs}

Every federated number is a real `fedfleet run --task tabular --data-split TRAIN --test-data TEST` (a coordinator
and one worker process per site on loopback, each site reading its own CSV); the central reference is the same plan
and model (`TabularTask.fit_central`, one epoch per round, batch {BATCH}) trained on exactly the rows the sites
trained on. For example (song era, the last split, the first seed; the script writes the two CSVs into a temporary
folder):

    {m['example']}

- **Data.** Song era: the shipped Spotify data (`load_songs()`: 40,353 songs) as one CSV, the test CSV being the song
  task's fixed stratified 20% (8,071 songs); label `era`, features the 15 audio features
  (`ignore=uri,track,artist,decade`; `decade` is only the group of `natural:decade`: 6 decades over 8 sites, so
  groups are cut). House prices:
  {m['house_rows']:,} generated training rows and {m['house_test_rows']:,} test rows (region, type, sqft 5%
  missing, rooms, age 10% missing, condition 3% missing, heating with a rare value, distance; price linear in them
  but for a sqrt(distance) term, noise sd 20), the region both a feature and the group of `natural:region`.
- **Validation, and what was chosen on what.** Each site keeps a seeded {VAL_FRACTION:.0%} of its rows
  (`--val-fraction`); the central model trains on the union of the other rows, shuffled (the task shuffles a
  site's rows together up to 128 MiB encoded, so a larger union of the site files one after another would be
  trained on in blocks of a few labels), and is validated on the union of those. The learning rate was chosen
  from the grid
  {', '.join(map(str, m['lr_grid']))} by central training's validation score after the last epoch, on the first
  seed's iid split, and used on both sides. "best-val" is the test score of the round (epoch) whose model scored
  best on the validation rows (federated: the sites' federated evaluation, which scores the model each site is
  sent; the last round's model scored by this script on the same rows). Nothing was chosen on the test set.
  Seeds start at 1: seed 0's dirichlet:0.1 cut of the song data leaves one site a single row, which its
  validation split takes, and that site's worker refuses to start.
- **Columns.** Scores are means ± sd over seeds; "final gap" is federated final − central final in points. Bytes are
  the model transfers of all rounds (`bytes_in` + `bytes_out` of metrics.jsonl; the sites' descriptions are extra).
  s / round is the median round as the coordinator times it; run wall s includes starting every process.
  "plan = central's" says the plan the sites agreed equals the one computed from the union of their rows.

{tables(result)}

The streaming rows: a coordinator and one `fedfleet worker --data FILE` process (default `chunk_rows` 65536), one
round; the worker's peak resident set is its VmHWM (`/proc/PID/status`), read while it runs. Each file was generated
on the fly and deleted.
"""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 rounds, one seed, logreg, small files")
    ap.add_argument("--rounds", type=int, help="rounds (central epochs) of every run [30; --quick 5]")
    ap.add_argument("--seeds", type=int, help="seeds of each logreg cell [3; --quick 1]")
    ap.add_argument("--mlp-seeds", type=int, help="seeds of each mlp cell [1]")
    ap.add_argument("--model", action="append", choices=("logreg", "mlp"), help="[both; --quick logreg]")
    ap.add_argument("--partition", action="append", choices=SONG_PARTITIONS, help="song splits [all]")
    ap.add_argument("--house-rows", type=int, help="generated training rows [40000; --quick 8000]")
    ap.add_argument("--memory-mb", help="comma list of file sizes for the streaming part, or 'none' [1,100,400; "
                                        "--quick 1,10,40]")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where tabular_sites.{json,md} go")
    args = ap.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 30)
    seeds = list(range(FIRST_SEED, FIRST_SEED + (args.seeds or (1 if args.quick else 3))))
    mlp_seeds = list(range(FIRST_SEED, FIRST_SEED + (args.mlp_seeds or 1)))
    models = args.model or (["logreg"] if args.quick else ["logreg", "mlp"])
    house_rows = args.house_rows or (8_000 if args.quick else 40_000)
    sizes_text = args.memory_mb or ("1,10,40" if args.quick else "1,100,400")
    sizes = [] if sizes_text == "none" else [int(s) for s in sizes_text.split(",")]
    grid = QUICK_LR_GRID if args.quick else LR_GRID
    t0 = time.perf_counter()
    cache = CentralCache()
    result: dict[str, Any] = {"songs": [], "regression": [], "memory": [], "lr": {}}
    with tempfile.TemporaryDirectory(prefix="fedfleet-tabular-") as tmp:
        work = Path(tmp)
        song_train, song_test = write_songs(work)
        house_train, house_test = work / "houses-train.csv", work / "houses-test.csv"
        write_houses(house_train, seed=1, rows=house_rows)
        write_houses(house_test, seed=2, rows=house_rows // 4)
        experiments = {
            "songs": Experiment("songs", song_train, song_test, SONG_WORKERS, "era", "uri,track,artist,decade",
                                tuple(args.partition or SONG_PARTITIONS), False),
            "regression": Experiment("regression", house_train, house_test, HOUSE_WORKERS, "price", None,
                                     HOUSE_PARTITIONS, True),
        }
        for exp in experiments.values():
            for model in models:
                lr, scores = choose_lr(exp, model, grid, rounds, (mlp_seeds if model == "mlp" else seeds)[0], work,
                                       cache)
                result["lr"][f"{exp.name}/{model}"] = {"chosen": lr, "scores": scores}
                print(f"{exp.name}/{model}: lr {lr} (validation: {scores})", flush=True)
                for partition in exp.partitions:
                    cell: dict[str, Any] = {"model": model, "partition": partition, "lr": lr, "runs": []}
                    for seed in mlp_seeds if model == "mlp" else seeds:
                        out = work / f"{exp.name}-{model}-{partition.replace(':', '')}-{seed}"
                        r = federated(exp, model, partition, seed, lr, rounds, out, cache)
                        cell["runs"].append(r)
                        f, c = r["federated"], r["central"]
                        print(f"{exp.name} {model:>6} {partition:>14} seed {seed}: federated {f['final']:.4f} "
                              f"(best-val {f['best']:.4f}), central {c['final']:.4f} (best-val {c['best']:.4f}), "
                              f"{f['s_per_round']:.2f} s/round, plan = central's: {r['plan_matches_central']}",
                              flush=True)
                    result[exp.name].append(cell)
        result["memory"] = memory(sizes, work)
    argv_shown = list(sys.argv[1:] if argv is None else argv)
    mem = memory_gib()
    songs = experiments["songs"]
    example = fedfleet_run_args(songs, models[0], songs.partitions[-1], seeds[0],
                                result["lr"][f"songs/{models[0]}"]["chosen"], rounds, "songs-train.csv",
                                "songs-test.csv", "runs/songs")
    result["experiments"] = {k: {"workers": e.workers, "label": e.label, "ignore": e.ignore,
                                 "partitions": list(e.partitions)} for k, e in experiments.items()}
    installed = versions("fedfleet", "numpy", "pyarrow", "torch")
    result["meta"] = {
        "command": shlex.join(["python", SCRIPT, *argv_shown]), "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - t0, "rounds": rounds, "seeds": seeds, "mlp_seeds": mlp_seeds,
        "models": models, "lr_grid": list(grid), "batch_size": BATCH, "val_fraction": VAL_FRACTION,
        "house_rows": house_rows, "house_test_rows": house_rows // 4, "memory_mb": sizes, "commit": _commit(),
        "example": shlex.join(example),
        "machine": f"{os.cpu_count()} CPUs" + (f", {mem} GiB" if mem else "") + f", {platform.system()} "
                   f"{platform.machine()}, " + ", ".join(f"{k} {v}" for k, v in installed.items()),
    }
    text = tables(result)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "tabular_sites.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "tabular_sites.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
