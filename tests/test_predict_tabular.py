"""Prediction for the tabular task: ``/v1/predict`` of a real run of two sites on their own CSV files.

The web layer knows the task only through ``fedfleet.tasks.predict``: the form's schema is the plan's
(federated ranges, means, vocabularies) and every answer is the planned task's ``predict_rows`` on the
model, both live at the coordinator and from the run's files (``fedfleet serve``). The browser fills the
generated form in test_web_browser.py.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Coordinator, Fleet, run_fedfleet, stop_process
from fedfleet.protocol.codec import decode
from fedfleet.tasks import load_task, with_plan
from fedfleet.tasks.predict import Predictor, predictor
from fedfleet.types import Weights
from test_web import start_serve

TIMEOUT = 120.0
CITIES = ["Lyon", "Oslo", "Porto"]


def write_sites(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Two sites' CSVs and a test CSV: who churns, from age, income, city and plan. Site A misses some
    ages; site B alone has customers in "Riga", and three in "Kyiv" (under min_count: not in the plan)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def make(path: Path, n: int, cities: list[str], missing: float, rare: int = 0) -> Path:
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["age", "income", "city", "plan", "churned"])
            for i in range(n):
                age, income = rng.normal(40, 10), rng.normal(50, 15)
                city = "Kyiv" if i < rare else str(rng.choice(cities))
                plan = str(rng.choice(["basic", "pro"]))
                z = 0.09 * (age - 40) - 0.06 * (income - 50) + (0.8 if plan == "basic" else -0.8)
                label = "yes" if z + rng.logistic(0, 0.5) > 0 else "no"
                w.writerow(["" if rng.random() < missing else f"{age:.1f}", f"{income:.2f}", city, plan, label])
        return path

    return (make(folder / "site-a.csv", 400, CITIES, 0.05),
            make(folder / "site-b.csv", 300, [*CITIES, "Riga"], 0.0, rare=3),
            make(folder / "test.csv", 200, [*CITIES, "Riga"], 0.0))


def write_prices(path: Path, n: int = 600, seed: int = 1) -> Path:
    """One file of a regression label (price) from two numbers and a category."""
    rng = np.random.default_rng(seed)
    x1, x2, kind = rng.normal(0, 1, n), rng.normal(5, 2, n), rng.choice(["p", "q"], n)
    price = 3.0 * x1 - 1.5 * x2 + np.where(kind == "p", 2.0, 0.0) + rng.normal(0, 0.3, n) + 100
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x1", "x2", "kind", "price"])
        w.writerows(zip(x1.round(3), x2.round(3), kind, price.round(3), strict=True))
    return path


def rows_of(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of a CSV of write_sites as a client sends them: numbers as numbers, no label."""
    with path.open() as fh:
        return [{"age": float(r["age"]), "income": float(r["income"]), "city": r["city"], "plan": r["plan"]}
                for r, _ in zip(csv.DictReader(fh), range(n), strict=False)]


def labels_of(path: Path, n: int) -> list[str]:
    with path.open() as fh:
        return [r["churned"] for r, _ in zip(csv.DictReader(fh), range(n), strict=False)]


@dataclass
class Live:
    coordinator: Coordinator
    test: Path
    before_plan: httpx.Response  # /v1/predict while the sites had not described their data yet

    @property
    def data_dir(self) -> Path:
        return self.coordinator.data_dir


def wait_until(done: Callable[[], bool], fleet: Fleet) -> None:
    end = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < end, fleet.logs()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def run(module_fleet: Fleet) -> Live:
    """A coordinator whose two sites trained a few rounds and were then killed: it keeps serving a model that
    no longer changes (the next round waits for answers that never come, and with quorum 1 none closes
    without them), so that its answers can be compared with the model's own."""
    a, b, test = write_sites(module_fleet.directory / "data")
    c = module_fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "2",
                                 "--rounds", "1000", "--lr", "0.1", "--test-data", str(test), "--quorum", "1",
                                 "--round-timeout", "600", "--worker-timeout", "600")
    before = httpx.get(f"{c.url}/v1/predict", timeout=TIMEOUT)
    workers = [module_fleet.worker(c.url, "--data", str(p)) for p in (a, b)]
    with httpx.Client(base_url=c.url, timeout=TIMEOUT) as http:
        wait_until(lambda: http.get("/v1/status").json()["round"] >= 2, module_fleet)
        for w in workers:
            w.kill()
            w.proc.wait(timeout=TIMEOUT)
        # Both answers of the round in progress may have come just before the kill: it closes, then none does.
        versions = [http.get("/v1/status").json()["model_version"]]
        while len(versions) < 3 or len(set(versions[-3:])) > 1:
            time.sleep(0.2)
            versions.append(http.get("/v1/status").json()["model_version"])
    return Live(c, test, before)


@pytest.fixture(scope="module")
def live(run: Live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=run.coordinator.url, timeout=TIMEOUT) as http:
        yield http


def planned_task(data_dir: Path) -> Predictor:
    """The run's task set up with its plan.json, as a user would from the run's files."""
    assert 'task = "tabular"' in (data_dir / "config.toml").read_text()
    plan = json.loads((data_dir / "plan.json").read_text())
    offered = predictor(with_plan(load_task("tabular", {"label": plan["label"]}), plan))
    assert offered is not None
    return offered


def live_model(http: httpx.Client) -> Weights:
    r = http.get("/v1/model")
    assert r.status_code == 200
    weights, _ = decode(r.content)
    return weights


def predict(http: httpx.Client, rows: list[dict[str, Any]]) -> dict[str, Any]:
    r = http.post("/v1/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def probabilities(body: dict[str, Any]) -> np.ndarray:
    return np.array([[p["probabilities"][c] for c in body["classes"]] for p in body["predictions"]])


def test_prediction_waits_for_the_plan(run: Live) -> None:
    r = run.before_plan
    assert r.status_code == 409
    assert r.json()["detail"] == (
        "this run's task 'tabular' predicts with the plan the run agrees from the sites' descriptions of their "
        "data, and the run has no plan yet: it is agreed once enough sites have described theirs")


def test_the_form_s_schema_is_the_plan_s(live: httpx.Client, run: Live) -> None:
    info = live.get("/v1/predict").json()
    plan = json.loads((run.data_dir / "plan.json").read_text())
    status = live.get("/v1/status").json()
    assert (info["task"], info["problem"], info["target"]) == ("tabular", "classification", "churned")
    assert info["classes"] == plan["classes"] == ["no", "yes"]
    assert (info["round"], info["model_version"]) == (status["round"], status["model_version"])
    assert info["song_search"] is False and info["max_rows"] == 1000
    assert [f["name"] for f in info["features"]] == [f["name"] for f in plan["features"]]
    for shown, planned in zip(info["features"], plan["features"], strict=True):
        assert shown["kind"] == planned["kind"]
        if planned["kind"] == "number":
            assert (shown["min"], shown["max"], shown["mean"]) == (planned["min"], planned["max"], planned["mean"])
            assert shown["limits"] is None and shown["required"] is False
        else:
            assert shown["values"] == planned["values"]
    city = next(f for f in info["features"] if f["name"] == "city")
    assert city["values"] == [*CITIES, "Riga"]  # both sites' cities, sorted; Kyiv is too rare to be one


def test_probabilities_are_the_planned_task_s_on_the_model(live: httpx.Client, run: Live) -> None:
    rows = rows_of(run.test, 50)
    body = predict(live, rows)
    got = probabilities(body)
    np.testing.assert_allclose(got, planned_task(run.data_dir).predict_rows(live_model(live), rows),
                               rtol=1e-9, atol=1e-12)
    for p, row in zip(body["predictions"], got, strict=True):
        assert math.isclose(sum(p["probabilities"].values()), 1.0, abs_tol=1e-12)
        assert p["class"] == body["classes"][int(row.argmax())] and p["value"] is None
        assert p["missing"] == [] and p["other"] == {}
    # Trained: the answers differ between rows, and mostly agree with the test file's labels.
    assert len({round(float(p), 6) for p in got[:, 0]}) > 10
    assert sum(p["class"] == t for p, t in zip(body["predictions"], labels_of(run.test, 50), strict=True)) > 30


def test_missing_features_are_imputed_and_reported(live: httpx.Client, run: Live) -> None:
    rows: list[dict[str, Any]] = [{"income": 80.0}, {"age": None, "income": 20.0, "city": "", "plan": "pro"}]
    body = predict(live, rows)
    assert [p["missing"] for p in body["predictions"]] == [["age", "city", "plan"], ["age", "city"]]
    np.testing.assert_allclose(probabilities(body), planned_task(run.data_dir).predict_rows(live_model(live), rows),
                               rtol=1e-9, atol=1e-12)
    # A number no site misses has no missing-indicator input: left out, it is exactly its mean.
    plan = json.loads((run.data_dir / "plan.json").read_text())
    income = next(f for f in plan["features"] if f["name"] == "income")
    assert income["missing"] is False
    row = {"age": 30.0, "city": "Lyon", "plan": "pro"}
    left_out, at_mean = probabilities(predict(live, [row, {**row, "income": income["mean"]}]))
    np.testing.assert_allclose(left_out, at_mean, rtol=1e-6)


def test_a_category_value_the_model_does_not_know_is_other(live: httpx.Client, run: Live) -> None:
    rows = [{"age": 30.0, "income": 40.0, "city": "Kyiv", "plan": "basic"},
            {"age": 30.0, "income": 40.0, "city": "Atlantis", "plan": "basic"}]
    body = predict(live, rows)
    assert [p["other"] for p in body["predictions"]] == [{"city": "Kyiv"}, {"city": "Atlantis"}]
    got = probabilities(body)
    np.testing.assert_allclose(got, planned_task(run.data_dir).predict_rows(live_model(live), rows),
                               rtol=1e-9, atol=1e-12)
    assert np.allclose(got[0], got[1])  # both are "other"


BAD_ROWS = [
    pytest.param([{"agee": 30}], ["row 0: 'agee' is not a feature; the features are age, city, income, plan"],
                 id="misspelt"),
    pytest.param([{"age": 30}, {"churned": "yes", "zip": 1}], ["row 1: 'churned', 'zip' are not features"],
                 id="the-label"),
    pytest.param([{"age": "old"}], ["row 0: 'age' must be a number, got 'old'"], id="text-for-a-number"),
    pytest.param([{}, {}, {"income": [1]}], ["row 2: 'income' must be a number, got a list"], id="a-list"),
    pytest.param([{"age": False}], ["row 0: 'age' must be a number, got false"], id="a-boolean"),
    pytest.param([{"city": 3}], ["row 0: 'city' takes a value as text (e.g. \"Lyon\"), got 3"],
                 id="a-number-for-a-category"),
    pytest.param([{"age": 30}, {"age": 1e300}], ["row 1: the model's answer for this row is not finite"],
                 id="far-out"),
    pytest.param([{"age": 30}] * 1001, ["rows: List should have at most 1000 items"], id="too-many"),
    pytest.param([], ["rows: List should have at least 1 item"], id="none"),
]


@pytest.mark.parametrize(("rows", "words"), BAD_ROWS)
def test_bad_rows_are_refused_naming_the_row_and_feature(live: httpx.Client, rows: list[Any],
                                                         words: list[str]) -> None:
    r = live.post("/v1/predict", json={"rows": rows})
    assert r.status_code == 422, r.text
    for word in words:
        assert word in r.json()["detail"], r.json()["detail"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_refused(live: httpx.Client, literal: str) -> None:
    r = live.post("/v1/predict", content=f'{{"rows": [{{"age": 30}}, {{"income": {literal}}}]}}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"].startswith("invalid request: row 1: 'income' must be a finite number")
    assert body["problems"] == [{"row": 1, "features": ["income"], "message": body["detail"].split(": ", 2)[2]}]


def test_the_run_served_from_its_files_answers_the_same(live: httpx.Client, run: Live, tmp_path: Path) -> None:
    """Last of the live tests: it stops the coordinator, which writes the run's files."""
    rows: list[dict[str, Any]] = [*rows_of(run.test, 20), {"income": 70.0, "city": "Atlantis"}]
    bad = {"rows": [{"age": "old"}]}
    info, answer, refusal = live.get("/v1/predict").json(), predict(live, rows), live.post("/v1/predict", json=bad)
    stop_process(run.coordinator.proc)
    assert json.loads((run.data_dir / "summary.json").read_text())["state"] == "stopped"
    proc, url = start_serve(run.data_dir)
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as served:
            assert served.get("/v1/predict").json() == info
            assert predict(served, rows) == answer
            assert served.post("/v1/predict", json=bad).json() == refusal.json()
            assert served.get("/v1/songs", params={"q": "yesterday"}).json()["detail"] == (
                "this run's task 'tabular' offers no song search (the songs task does)")
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    weights, _ = decode((run.data_dir / "model.safetensors").read_bytes())
    np.testing.assert_allclose(probabilities(answer), planned_task(run.data_dir).predict_rows(weights, rows),
                               rtol=1e-9, atol=1e-12)

    # The run as if it had ended before its sites agreed a plan: no plan.json, and no model yet.
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.toml", "summary.json", "metrics.jsonl"):
        (folder / name).write_bytes((run.data_dir / name).read_bytes())
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    for plan, refusal_words in ((None, "the run has no plan yet"), ('{"format": 1}', "the run's plan is malformed")):
        if plan is not None:
            (folder / "plan.json").write_text(plan)
        proc, url = start_serve(folder)
        try:
            r = httpx.get(f"{url}/v1/predict", timeout=TIMEOUT)
            assert r.status_code == 409 and refusal_words in r.json()["detail"], r.text
            assert httpx.get(f"{url}/v1/dashboard", timeout=TIMEOUT).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT)


def test_a_regression_run_answers_values(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run_fedfleet("run", "--task", "tabular", "--task-option", "label=price", "--workers", "2", "--rounds", "2",
                     "--lr", "0.05", "--data-split", str(write_prices(tmp_path / "prices.csv")), "--out", str(out),
                     "--quiet", timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    rows: list[dict[str, Any]] = [{"x1": 1.0, "x2": 5.0, "kind": "p"}, {"x1": -1.0, "x2": 5.0, "kind": "q"},
                                  {"x2": 3.0}]
    proc, url = start_serve(out)
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            info = http.get("/v1/predict").json()
            assert (info["problem"], info["classes"], info["target"]) == ("regression", [], "price")
            body = predict(http, rows)
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert body["problem"] == "regression" and body["classes"] == []
    values = [p["value"] for p in body["predictions"]]
    weights, _ = decode((out / "model.safetensors").read_bytes())
    np.testing.assert_allclose(values, planned_task(out).predict_rows(weights, rows), rtol=1e-9)
    assert all(p["class"] is None and p["probabilities"] is None for p in body["predictions"])
    assert body["predictions"][2]["missing"] == ["kind", "x1"]  # in the plan's order
    assert values[0] > values[1]  # price rises with x1 and kind p: two rounds learn that much
