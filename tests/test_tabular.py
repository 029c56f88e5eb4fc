"""The tabular task: reading CSV and Parquet in chunks, descriptions and the plan, errors, training.

Small synthetic files are written to a temporary folder: a three-class set (a number column, a
category column with rare values, a number column with missing values) split over two sites of
different formats, and a regression set. Federated training is simulated in-process: FedAvg rounds
of ``fit`` on each site, averaged by examples, compared with ``fit_central`` on the union.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from fedfleet.errors import ConfigError, TaskError
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import load_task
from fedfleet.tasks.base import TrainParams, has_plan, loads_sites
from fedfleet.tasks.tabular import TabularTask
from fedfleet.tasks.tabular.read import NUMBER, read_chunks
from fedfleet.tasks.tabular.split import split_file
from fedfleet.types import Weights

CLASSES = ["high", "low", "mid"]


def classification_rows(n: int, seed: int, rare: dict[str, int] | None = None) -> pa.Table:
    """Age, colour, income (15% missing), an id, and a noisy three-class label that depends on all three."""
    rng = np.random.default_rng(seed)
    age = rng.normal(40, 12, n).round(1)
    colour = rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2]).astype(object)
    at = 0
    for value, times in (rare or {}).items():  # rare category values, for min_count
        colour[at:at + times] = value
        at += times
    income = rng.lognormal(10, 0.5, n)
    missing = rng.random(n) < 0.15
    score = (age - 40) / 12 + np.where(colour == "red", 0.8, np.where(colour == "blue", -0.8, 0.0))
    score = score + np.where(missing, 0.0, (np.log(income) - 10) / 0.5) + rng.normal(0, 0.5, n)
    label = np.where(score > 0.6, "high", np.where(score < -0.6, "low", "mid"))
    return pa.table({"id": np.arange(n) + 1000 * seed, "age": age, "colour": pa.array(colour, pa.string()),
                     "income": pa.array(income, mask=missing), "y": label})


def regression_rows(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(5, 2, n), rng.uniform(-1, 1, n)
    kind = rng.choice(["a", "b"], n)
    price = 1000 + 300 * x1 - 500 * x2 + np.where(kind == "a", 400, 0) + rng.normal(0, 150, n)
    return pa.table({"x1": x1, "x2": x2, "kind": kind, "price": price})


def write(table: pa.Table, path: Path) -> Path:
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tabular")
    # teal: 3 + 3 rows (kept with min_count 5 only when the sites' counts are summed); plum: 2 + 2 (other);
    # gold: 5 at one site (kept).
    s1 = classification_rows(3000, 1, {"teal": 3, "plum": 2, "gold": 5})
    s2 = classification_rows(2500, 2, {"teal": 3, "plum": 2})
    r1, r2 = regression_rows(2000, 11), regression_rows(2000, 12)
    out = {"s1": write(s1, d / "s1.csv"), "s2": write(s2, d / "s2.parquet"),
           "union": write(pa.concat_tables([s1, s2]), d / "union.csv"),
           "test": write(classification_rows(3000, 3), d / "test.csv"),
           "r1": write(r1, d / "r1.csv"), "r2": write(r2, d / "r2.parquet"),
           "runion": write(pa.concat_tables([r1, r2]), d / "runion.csv"),
           "rtest": write(regression_rows(2000, 13), d / "rtest.csv")}
    folder = d / "folder"
    folder.mkdir()
    write(s1.slice(0, 1000), folder / "a.csv")
    write(s1.slice(1000), folder / "b.parquet")
    out["folder"] = folder
    return out


def task(**options: Any) -> TabularTask:
    return TabularTask(**{"label": "y", "ignore": "id", **options})


def plan_of(t: TabularTask, *paths: Path) -> dict[str, Any]:
    return t.make_plan([t.describe(t.load_site([p], 0.0, 0)[0]) for p in paths])


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- descriptions and the plan ----------------------------------------------------------------------

def test_the_plan_of_two_sites_is_the_plan_of_their_union(files: dict[str, Path]) -> None:
    t = task()
    federated, central = plan_of(t, files["s1"], files["s2"]), plan_of(t, files["union"])
    assert federated["classes"] == central["classes"] == CLASSES
    assert federated["rows"] == central["rows"] == 5500
    fed, cen = ({f["name"]: f for f in p["features"]} for p in (federated, central))
    assert list(fed) == list(cen) == ["age", "colour", "income"]  # sorted by name; id ignored
    # min_count 5 over all sites: teal (3 + 3) and gold (5) stay, plum (2 + 2) is "other"
    assert fed["colour"]["values"] == cen["colour"]["values"] == ["blue", "gold", "green", "red", "teal"]
    for name in ("age", "income"):
        for key in ("mean", "scale", "min", "max"):
            assert fed[name][key] == pytest.approx(cen[name][key], rel=1e-9)
    assert fed["income"]["missing"] and not fed["age"]["missing"]
    union = pa_csv.read_csv(files["union"])
    age = union.column("age").to_numpy()
    assert fed["age"]["mean"] == pytest.approx(age.mean()) and fed["age"]["scale"] == pytest.approx(age.std())
    json.dumps(federated, allow_nan=False)  # the plan travels as strict JSON


def test_min_count_decides_the_vocabulary(files: dict[str, Path]) -> None:
    values = next(f for f in plan_of(task(min_count=7), files["s1"], files["s2"])["features"]
                  if f["name"] == "colour")["values"]
    assert values == ["blue", "green", "red"]


def test_a_description_is_json_with_aggregates_only(files: dict[str, Path]) -> None:
    t = task()
    desc = t.describe(t.load_site([files["s1"]], 0.0, 0)[0])
    assert set(desc) == {"format", "label", "rows", "unlabelled", "columns"}
    assert [c["name"] for c in desc["columns"]] == ["y", "age", "colour", "income"]
    income = desc["columns"][3]
    assert income["count"] + income["missing"] == desc["rows"] == 3000 and income["missing"] > 300
    assert set(income) == {"name", "type", "kind", "count", "missing", "sum", "sumsq", "min", "max", "integer"}
    assert desc["columns"][0]["values"] == {c: n for c, n in desc["columns"][0]["values"].items()} and \
        sum(desc["columns"][0]["values"].values()) == 3000
    assert t.check_description(json.loads(json.dumps(desc, allow_nan=False)), None) is None


def test_a_folder_is_its_files_in_order(files: dict[str, Path]) -> None:
    t = task()
    a, b = (t.describe(t.load_site([p], 0.0, 0)[0]) for p in (files["folder"], files["s1"]))
    assert a["rows"] == b["rows"] and a["columns"][0] == b["columns"][0] and a["columns"][2] == b["columns"][2]
    assert a["columns"][1]["sum"] == pytest.approx(b["columns"][1]["sum"])


def test_reading_in_many_small_chunks_gives_the_same_description(files: dict[str, Path]) -> None:
    for name in ("s1", "s2"):  # CSV and Parquet
        small, whole = task(chunk_rows=37), task()
        data = small.load_site([files[name]], 0.0, 0)[0]
        chunks = sum(1 for _ in read_chunks(data, {"age": NUMBER}, 37))
        assert chunks >= 40
        a, b = small.describe(data), whole.describe(whole.load_site([files[name]], 0.0, 0)[0])
        for x, y in zip(a["columns"], b["columns"], strict=True):
            assert x.keys() == y.keys()
            for key in x:
                assert x[key] == (pytest.approx(y[key], rel=1e-12) if isinstance(y[key], float) else y[key])


def test_the_validation_split_is_disjoint_stable_and_independent_of_chunks(files: dict[str, Path]) -> None:
    t = task()
    ids: dict[tuple[str, int], list[float]] = {}
    for chunk_rows in (13, 100_000):
        train, val = t.load_site([files["folder"]], 0.2, 7)
        assert val is not None
        for part in (train, val):
            got = [i for _, tab in read_chunks(part, {"id": NUMBER}, chunk_rows) for i in tab.column("id").to_pylist()]
            ids[(part.part, chunk_rows)] = got
            assert len(got) == len(part)
    assert ids[("train", 13)] == ids[("train", 100_000)] and ids[("val", 13)] == ids[("val", 100_000)]
    train_ids, val_ids = set(ids[("train", 13)]), set(ids[("val", 13)])
    assert not train_ids & val_ids and len(train_ids | val_ids) == 3000
    assert 0.17 < len(val_ids) / 3000 < 0.23
    other = {i for _, tab in read_chunks(t.load_site([files["folder"]], 0.2, 8)[1], {"id": NUMBER}, 1000)  # type: ignore[arg-type]
             for i in tab.column("id").to_pylist()}
    assert other != val_ids  # another seed, other rows


def test_check_description_names_the_columns_that_differ(tmp_path: Path, files: dict[str, Path]) -> None:
    t = TabularTask(label="y")
    reference = t.describe(t.load_site([files["s1"]], 0.0, 0)[0])
    rows = classification_rows(200, 5).drop_columns(["age"])
    rows = rows.append_column("zip", pa.array(["z"] * 200))
    rows = rows.set_column(rows.schema.get_field_index("income"), "income", pa.array(["unknown"] * 200))
    other = t.describe(t.load_site([write(rows, tmp_path / "other.csv")], 0.0, 0)[0])
    assert t.check_description(other, reference) == (
        "columns differ from the run's: missing 'age'; extra 'zip'; 'income' is string here, number in the run")
    assert t.check_description(reference, reference) is None


def test_a_label_is_a_class_label_or_a_number_as_its_values_say(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    few = write(pa.table({"x": x, "y": (x > 0).astype(np.int64) + 3}), tmp_path / "few.csv")
    many = write(pa.table({"x": x, "y": np.arange(300)}), tmp_path / "many.csv")
    real = write(pa.table({"x": x, "y": x * 2.5}), tmp_path / "real.parquet")
    t = TabularTask(label="y")
    assert plan_of(t, few)["classes"] == ["3", "4"]
    assert plan_of(t, many)["problem"] == "regression"
    plan = plan_of(t, real)
    assert plan["problem"] == "regression" and plan["target"]["scale"] > 0 and plan["classes"] is None
    assert plan_of(TabularTask(label="y", problem="regression"), few)["problem"] == "regression"
    assert plan_of(TabularTask(label="y", problem="classification"), many)["classes"][:3] == ["0", "1", "2"]


# --- errors -----------------------------------------------------------------------------------------

def _table_file(tmp_path: Path, name: str, table: pa.Table) -> Path:
    return write(table, tmp_path / name)


ERRORS: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    ("missing-label", lambda d: _table_file(d, "nolabel.csv", pa.table({"a": [1.0, 2.0], "b": ["x", "y"]})),
     ["nolabel.csv", "no label column 'y'"]),
    ("empty-file", lambda d: (d / "empty.csv", (d / "empty.csv").write_bytes(b""))[0], ["empty.csv", "empty file"]),
    ("header-only", lambda d: (d / "header.csv", (d / "header.csv").write_text("a,y\n"))[0],
     ["header.csv", "no rows"]),
    ("empty-parquet", lambda d: _table_file(d, "empty.parquet", pa.table({"a": pa.array([], pa.float64()),
                                                                           "y": pa.array([], pa.string())})),
     ["empty.parquet", "no rows"]),
    ("all-missing", lambda d: _table_file(d, "gaps.csv", pa.table({"a": [1.0, 2.0], "b": pa.array([None, None],
                                                                                                  pa.float64()),
                                                                    "y": ["p", "q"]})),
     ["gaps.csv", "column 'b' has no values", "expected numbers"]),
    ("not-tabular", lambda d: (d / "notes.txt", (d / "notes.txt").write_text("a,y\n1,2\n"))[0],
     ["notes.txt", "not a CSV (.csv) or Parquet (.parquet) file"]),
    ("bad-parquet", lambda d: (d / "fake.parquet", (d / "fake.parquet").write_text("a,y\n1,2\n"))[0],
     ["fake.parquet", "not a Parquet file"]),
    ("missing-path", lambda d: d / "nowhere.csv", ["nowhere.csv", "no such file or folder"]),
    ("too-many-categories", lambda d: _table_file(d, "ids.csv", pa.table({"a": [f"v{i}" for i in range(10_001)],
                                                                          "y": ["p", "q"] * 5000 + ["p"]})),
     ["ids.csv", "column 'a' has more than 10000 distinct values", "ignore=a"]),
    ("long-category", lambda d: _table_file(d, "long.csv", pa.table({"a": ["x" * 300, "y"], "y": ["p", "q"]})),
     ["long.csv", "column 'a' has a value of 300 characters", "ignore=a"]),
    ("huge-number", lambda d: _table_file(d, "huge.csv", pa.table({"a": [1.0, 1e300], "y": ["p", "q"]})),
     ["huge.csv", "column 'a' holds 1e+300"]),
    ("unreadable-type", lambda d: _table_file(d, "dates.parquet", pa.table({
        "a": pa.array([1, 2], pa.timestamp("s")), "y": ["p", "q"]})), ["dates.parquet", "column 'a' is timestamp",
                                                                       "ignore=a"]),
]


@pytest.mark.parametrize(("make", "expected"), [pytest.param(m, e, id=i) for i, m, e in ERRORS])
def test_each_bad_file_is_one_line_naming_the_file_and_column(tmp_path: Path, make: Callable[[Path], Path],
                                                              expected: list[str]) -> None:
    t = TabularTask(label="y")
    with pytest.raises(TaskError) as exc:
        t.describe(t.load_site([make(tmp_path)], 0.0, 0)[0])
    message = one_line(exc)
    for part in expected:
        assert part in message, message


def test_a_label_with_one_class_over_all_sites_is_refused(tmp_path: Path) -> None:
    t = TabularTask(label="y")
    one = [t.describe(t.load_site([write(pa.table({"a": [1.0, 2.0, 3.0], "y": ["yes"] * 3}), tmp_path / n)], 0, 0)[0])
           for n in ("a.csv", "b.csv")]
    with pytest.raises(TaskError) as exc:
        t.make_plan(one)
    assert one_line(exc) == ("label 'y' has one class ('yes') over all sites: a classifier needs two or more "
                             "(is label= the column to predict?)")


def test_a_column_of_text_in_a_number_column_of_the_plan_is_named(tmp_path: Path, files: dict[str, Path]) -> None:
    planned = task().with_plan(plan_of(task(), files["s1"]))
    rows = classification_rows(50, 9).set_column(1, "age", pa.array(["old"] * 50))
    with pytest.raises(TaskError) as exc:
        planned.load_site([write(rows, tmp_path / "text.csv")], 0.0, 0)
    assert one_line(exc).endswith("text.csv: column 'age' holds text: the run reads it as numbers")


def test_the_task_needs_a_label_its_own_files_and_a_plan(files: dict[str, Path]) -> None:
    t = TabularTask()
    with pytest.raises(TaskError, match="label=COLUMN"):
        t.load_site([files["s1"]], 0.0, 0)
    with pytest.raises(TaskError, match=r"^the tabular task trains on each site's own files: start workers with "
                                        r"--data FILE$"):
        t.load_partition(PartitionSpec("iid"), 0, 2, 0)
    with pytest.raises(TaskError, match="no --test-data"):
        t.load_test()
    with pytest.raises(TaskError, match="with_plan"):
        task().init_weights(0)
    with pytest.raises(ConfigError, match=r"^The 'hidden' task option must be a comma-separated list of up to 8 "
                                          r"layer sizes, each an int in \[1, 4096\]. Got '64,x' instead.$"):
        load_task("tabular", {"label": "y", "hidden": "64,x"})
    with pytest.raises(ConfigError, match="'features' task option names the label column 'y'"):
        TabularTask(label="y", features="a,y")
    loaded = load_task("tabular", {"label": "y", "min_count": "3"})
    assert isinstance(loaded, TabularTask) and loaded.settings.min_count == 3
    assert has_plan(loaded) and loads_sites(loaded) and loaded.data_at_sites


BAD_DESCRIPTIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("negative-count", lambda d: d["columns"][1].update(count=-5), "column 'age', count: Input should be greater"),
    ("nan-sum", lambda d: d["columns"][1].update(sum=math.nan), "column 'age', sum: Input should be a finite number"),
    ("inf-sumsq", lambda d: d["columns"][1].update(sumsq=math.inf), "column 'age', sumsq: Input should be a finite"),
    ("negative-variance", lambda d: d["columns"][1].update(sumsq=1.0), "column 'age': sumsq"),
    ("sum-beyond-max", lambda d: d["columns"][1].update(sum=1e12), "column 'age': sum 1e+12 is outside"),
    ("20k-values", lambda d: d["columns"][2].update(values={f"v{i}": 1 for i in range(20_000)}),
     "column 'colour', values: Dictionary should have at most 10000 items"),
    ("huge-name", lambda d: d["columns"][2].update(name="c" * 100_000),
     "columns[2], name: String should have at most 200 characters"),
    ("huge-value", lambda d: d["columns"][2]["values"].update({"v" * 1000: 1}), "String should have at most 200"),
    ("counts-do-not-add-up", lambda d: d["columns"][2]["values"].update(blue=1),
     "the values' counts add up to"),
    ("count-not-rows", lambda d: d["columns"][3].update(missing=0), "count + missing is"),
    ("bool-count", lambda d: d.update(rows=True), "rows: Input should be a valid integer"),
    ("string-sum", lambda d: d["columns"][1].update(sum="12"), "sum: Input should be a valid number"),
    ("extra-key", lambda d: d.update(rows_seen=3), "rows_seen: Extra inputs are not permitted"),
    ("huge-count", lambda d: d.update(rows=10**13), "rows: Input should be less than or equal to 1000000000000"),
    ("too-many-columns", lambda d: d["columns"].extend(copy.deepcopy(d["columns"][1]) | {"name": f"c{i}"}
                                                       for i in range(1001)), "columns: List should have at most"),
    ("not-a-dict", lambda d: d.update(columns="age"), "columns: Input should be a valid list"),
]


@pytest.mark.parametrize(("spoil", "expected"), [pytest.param(s, e, id=i) for i, s, e in BAD_DESCRIPTIONS])
def test_check_description_refuses_a_bad_description_with_a_message(
        files: dict[str, Path], spoil: Callable[[dict[str, Any]], None], expected: str) -> None:
    t = task()
    good = t.describe(t.load_site([files["s1"]], 0.0, 0)[0])
    bad = copy.deepcopy(good)
    spoil(bad)
    message = t.check_description(bad, good)
    assert message is not None and expected in message and "\n" not in message, message
    assert len(message) < 400


def test_check_description_refuses_one_that_the_runs_options_do_not_read(files: dict[str, Path]) -> None:
    t = task()
    desc = t.describe(t.load_site([files["s1"]], 0.0, 0)[0])
    assert TabularTask(label="z").check_description(desc, None) == "the description's label is 'y'; the run's is 'z'"
    assert task(categorical="age,colour").check_description(desc, None) == (
        "column 'age' is described as a number; the run's options make it a category")
    assert task(features="age,colour").check_description(desc, None) == (
        "columns differ from the run's features=: extra 'income'")


# --- training -----------------------------------------------------------------------------------------

def fedavg(planned: TabularTask, sites: list[Any], rounds: int, lr: float, seed: int = 0) -> Weights:
    """``rounds`` of FedAvg: one local epoch at each site, the results averaged weighted by examples."""
    weights = planned.init_weights(seed)
    for r in range(rounds):
        results = [planned.fit(weights, data, TrainParams(1, 32, lr, seed=100 * r + i)) for i, data in enumerate(sites)]
        total = sum(res.num_examples for res in results)
        weights = {k: sum(res.weights[k] * (res.num_examples / total) for res in results).astype(np.float32)
                   for k in weights}
    return weights


def test_federated_training_reaches_the_accuracy_of_central_training(files: dict[str, Path]) -> None:
    t = task()
    sites = [t.load_site([files[n]], 0.1, 0) for n in ("s1", "s2")]
    planned = t.with_plan(t.make_plan([t.describe(train) for train, _ in sites]))
    weights = fedavg(planned, [train for train, _ in sites], rounds=8, lr=0.1)
    test = planned.load_site([files["test"]], 0.0, 0)[0]
    federated = planned.evaluate(weights, test)
    central_task, central_weights = t.fit_central([files["union"]], epochs=8, lr=0.1, batch_size=32)
    central = central_task.evaluate(central_weights, central_task.load_site([files["test"]], 0.0, 0)[0])
    assert federated["accuracy"] > 0.7
    assert abs(federated["accuracy"] - central["accuracy"]) <= 0.01, (federated, central)
    assert set(federated) == {"loss", "accuracy", "recall_0", "recall_1", "recall_2"}
    val = planned.evaluate(weights, sites[0][1])  # the site's own held-out rows
    assert abs(val["accuracy"] - federated["accuracy"]) < 0.06


def test_federated_regression_reaches_the_r2_of_central_training(files: dict[str, Path]) -> None:
    t = TabularTask(label="price")
    sites = [t.load_site([files[n]], 0.0, 0)[0] for n in ("r1", "r2")]
    planned = t.with_plan(t.make_plan([t.describe(s) for s in sites]))
    assert planned.score_name == "r2" and planned.classes == ()
    weights = fedavg(planned, sites, rounds=5, lr=0.02)
    test = planned.load_site([files["rtest"]], 0.0, 0)[0]
    federated = planned.evaluate(weights, test)
    central_task, central_weights = t.fit_central([files["runion"]], epochs=5, lr=0.02, batch_size=32)
    central = central_task.evaluate(central_weights, central_task.load_site([files["rtest"]], 0.0, 0)[0])
    assert set(federated) == {"loss", "accuracy", "r2", "rmse"}
    assert federated["accuracy"] == federated["r2"] > 0.85
    assert abs(federated["r2"] - central["r2"]) < 0.01, (federated, central)
    assert 120 < federated["rmse"] < 220  # the noise is 150 in the label's units
    predicted = planned.predict_rows(weights, [{"x1": 5.0, "x2": 0.0, "kind": "a"}])
    assert predicted.shape == (1,) and abs(predicted[0] - 2900) < 150


def test_fedprox_keeps_the_local_model_nearer_the_global_one(files: dict[str, Path]) -> None:
    t = task()
    data = t.load_site([files["s1"]], 0.0, 0)[0]
    planned = t.with_plan(plan_of(t, files["s1"]))
    start = planned.init_weights(0)
    drift = [np.linalg.norm(planned.fit(start, data, TrainParams(1, 32, 0.1, 0, prox_mu=mu)).weights["linear.weight"]
                            - start["linear.weight"]) for mu in (0.0, 5.0)]
    assert drift[1] < 0.8 * drift[0]


def test_weights_are_reproducible_and_named_as_the_model(files: dict[str, Path]) -> None:
    planned = task().with_plan(plan_of(task(), files["s1"]))
    a, b = planned.init_weights(3), planned.init_weights(3)
    assert list(a) == ["linear.weight", "linear.bias"]
    assert a["linear.weight"].shape == (1 + 2 + 5, 3)  # age; income and its missing flag; 4 colours and other
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    assert not np.array_equal(a["linear.weight"], planned.init_weights(4)["linear.weight"])
    with pytest.raises(TaskError, match="weights do not match the model"):
        planned.evaluate({"w": np.zeros(3, np.float32)}, planned.load_site([files["s1"]], 0.0, 0)[0])


def test_the_planned_task_predicts_rows_of_a_form(files: dict[str, Path]) -> None:
    t = task()
    planned = t.with_plan(plan_of(t, files["s1"], files["s2"]))
    assert planned.classes == tuple(CLASSES)
    schema = planned.feature_schema()
    assert [(f["name"], f["kind"]) for f in schema] == [("age", "number"), ("colour", "category"),
                                                        ("income", "number")]
    assert schema[0]["min"] < schema[0]["mean"] < schema[0]["max"] and "teal" in schema[1]["values"]
    assert schema[0]["integer"] is False and planned.target_name == "y"
    with pytest.raises(TaskError, match="with_plan"):
        t.feature_schema()
    weights = fedavg(planned, [t.load_site([files["s1"]], 0.0, 0)[0]], rounds=2, lr=0.1)
    p = planned.predict_rows(weights, [{"age": 70, "colour": "red", "income": 60000},
                                       {"age": "15", "colour": "never-seen", "income": ""}, {}])
    assert p.shape == (3, 3) and np.allclose(p.sum(axis=1), 1.0)
    assert p[0].argmax() == CLASSES.index("high") and p[1].argmax() == CLASSES.index("low")
    with pytest.raises(TaskError, match=r"^row 0: feature 'age' takes a number, not 'old'$"):
        planned.predict_rows(weights, [{"age": "old"}])
    with pytest.raises(TaskError, match=r"^row 1: 'agee' is not a feature"):
        planned.predict_rows(weights, [{}, {"agee": 3}])


def test_the_mlp_trains(files: dict[str, Path]) -> None:
    pytest.importorskip("torch", reason="model=mlp needs PyTorch (pip install 'fedfleet[torch]')")
    t = task(model="mlp", hidden="16,8")
    sites = [t.load_site([files[n]], 0.0, 0)[0] for n in ("s1", "s2")]
    planned = t.with_plan(t.make_plan([t.describe(s) for s in sites]))
    first = planned.init_weights(0)
    assert list(first) == ["hidden1.weight", "hidden1.bias", "hidden2.weight", "hidden2.bias", "out.weight",
                           "out.bias"]
    assert all(np.array_equal(first[k], planned.init_weights(0)[k]) for k in first)
    test = planned.load_site([files["test"]], 0.0, 0)[0]
    before = planned.evaluate(first, test)
    weights = fedavg(planned, sites, rounds=4, lr=0.1)
    after = planned.evaluate(weights, test)
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.7, (before, after)
    assert all(v.dtype == np.float32 for v in weights.values())
    regression = TabularTask(label="price", model="mlp", hidden="8")
    r = regression.load_site([files["r1"]], 0.0, 0)[0]
    planned_r = regression.with_plan(regression.make_plan([regression.describe(r)]))
    assert planned_r.evaluate(fedavg(planned_r, [r], rounds=3, lr=0.01), r)["r2"] > 0.8


# --- split_file ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "spec", "group"), [
    ("union", PartitionSpec("iid"), None),
    ("union", PartitionSpec("dirichlet", alpha=0.5), None),
    ("s2", PartitionSpec("natural", column="colour"), "colour"),
])
def test_split_file_writes_each_row_to_one_site_file(tmp_path: Path, files: dict[str, Path], source: str,
                                                     spec: PartitionSpec, group: str | None) -> None:
    path = files[source]
    out = task().split_data(path, tmp_path / "sites", 3, spec, seed=0)
    assert [p.name for p in out] == [f"site-00{i}{path.suffix}" for i in range(3)]
    read = pa_csv.read_csv if path.suffix == ".csv" else pq.read_table
    original, parts = read(path), [read(p) for p in out]
    assert all(p.num_rows for p in parts) and sum(p.num_rows for p in parts) == original.num_rows
    assert sorted(i for p in parts for i in p.column("id").to_pylist()) == sorted(original.column("id").to_pylist())
    assert all(p.schema == original.schema for p in parts) or path.suffix == ".csv"
    if group:  # natural: each colour (red, green, blue, teal, plum) whole at one site
        assert sum(len(set(p.column(group).to_pylist())) for p in parts) == 5
    t = task()
    assert t.load_site(out[:1], 0.0, 0)[0].files[0].types == t.load_site([path], 0.0, 0)[0].files[0].types


def test_natural_cuts_groups_only_when_there_are_fewer_than_sites(tmp_path: Path) -> None:
    rows = pa.table({"g": ["a"] * 50 + ["b"] * 30 + ["c"] * 20, "y": ["p", "q"] * 50})
    path = write(rows, tmp_path / "groups.csv")
    spec = PartitionSpec("natural", column="g")
    two = [set(pa_csv.read_csv(p).column("g").to_pylist()) for p in split_file(path, tmp_path / "two", 2, spec, "y",
                                                                                seed=0, group_column="g")]
    assert two == [{"a"}, {"b", "c"}]  # a (50) to one site, then b and c to the lighter one
    four = split_file(path, tmp_path / "four", 4, spec, "y", seed=0, group_column="g")
    assert sum(pa_csv.read_csv(p).num_rows for p in four) == 100


def test_split_file_refuses_what_it_cannot_split(tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(TaskError, match="label 'price' has 4000 distinct values, and dirichlet splits by class"):
        split_file(files["runion"], tmp_path, 2, PartitionSpec("dirichlet", alpha=1.0), "price", seed=0)
    with pytest.raises(TaskError, match=r"natural:COLUMN"):
        split_file(files["s1"], tmp_path, 2, PartitionSpec("natural"), "y", seed=0)
    with pytest.raises(TaskError, match="no column 'nope'"):
        split_file(files["s1"], tmp_path, 2, PartitionSpec("iid"), "nope", seed=0)


def test_a_file_sorted_by_label_trains_as_well_as_a_shuffled_one(tmp_path: Path) -> None:
    # Site exports are often sorted (by label, by date). Read in chunks of 100 rows, each chunk of a sorted file
    # holds one label: shuffling within a chunk only, SGD would see one class at a time and forget the others.
    table = classification_rows(3000, seed=11)
    test = write(classification_rows(1500, seed=12), tmp_path / "test.csv")
    shuffled = write(table, tmp_path / "shuffled.csv")
    ordered = write(table.sort_by("y"), tmp_path / "sorted.csv")
    t = task(label="y", ignore="id", chunk_rows=100)
    scores = {}
    for path in (shuffled, ordered):
        planned, weights = t.fit_central([path], epochs=3, lr=0.1, batch_size=32)
        scores[path.stem] = planned.evaluate(weights, planned.load_site([test], 0.0, 0)[0])["accuracy"]
    assert scores["shuffled"] > 0.7
    assert abs(scores["sorted"] - scores["shuffled"]) < 0.02, scores
