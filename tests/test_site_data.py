"""Each site trains on its own files (``fedfleet worker --data``): real coordinator and worker processes.

The tabular task agrees its plan (label classes, vocabularies, scalers) from the sites' descriptions;
these tests check what a user of a real deployment relies on: the federated model learns what the
same model trained centrally on the union learns, a site whose data does not fit is refused with a
message naming the columns (and the run goes on), mixed runs are refused, and a run without a test
set says it was scored by federated evaluation only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Fleet, run_fedfleet
from fedfleet.protocol.codec import decode
from fedfleet.tasks.tabular import TabularTask

ROUNDS = 12
LR = "0.1"
TIMEOUT = 150


def write_sites(folder: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Two sites' CSVs and a test CSV of one classification problem. Site A has missing ages; site B
    holds a category ("d") site A never saw, and is shifted in age: not IID, as real sites are not."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def make(path: Path, n: int, age_shift: float, cities: list[str], missing: float) -> Path:
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["age", "income", "city", "churned"])
            for _ in range(n):
                age, income = rng.normal(40 + age_shift, 10), rng.normal(50, 15)
                city = str(rng.choice(cities))
                z = 0.09 * (age - 42) + 0.06 * (income - 50) + {"a": 1.0, "b": -0.5}.get(city, 0.0)
                label = "yes" if z + rng.logistic(0, 0.6) > 0 else "no"
                w.writerow(["" if rng.random() < missing else f"{age:.1f}", f"{income:.2f}", city, label])
        return path

    a = make(folder / "site-a.csv", 900, 0.0, ["a", "b", "c"], 0.08)
    b = make(folder / "site-b.csv", 700, 6.0, ["a", "b", "c", "d"], 0.0)
    test = make(folder / "test.csv", 800, 3.0, ["a", "b", "c", "d"], 0.04)
    return a, b, test


def summary(data_dir: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((data_dir / "summary.json").read_text())
    return result


def test_two_sites_train_to_what_the_same_model_learns_centrally_on_their_union(fleet: Fleet, tmp_path: Path) -> None:
    a, b, test = write_sites(tmp_path / "data")
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "2",
                          "--rounds", str(ROUNDS), "--lr", LR, "--test-data", str(test), "--linger", "1")
    workers = [fleet.worker(c.url, "--data", str(path)) for path in (a, b)]
    for w in workers:
        assert w.proc.wait(timeout=TIMEOUT) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()
    s = summary(c.data_dir)
    assert s["state"] == "finished" and s["data_source"] == "sites" and s["evaluation"] == "test"

    # The plan is the union's: both sites' categories, the classes in a stable order.
    plan = json.loads((c.data_dir / "plan.json").read_text())
    assert plan["classes"] == ["no", "yes"]
    city = next(f for f in plan["features"] if f["name"] == "city")
    assert set(city["values"]) >= {"a", "b", "c", "d"}

    # The same model, trained in one place on the union of the two files (one epoch per round).
    task = TabularTask(label="churned")
    planned, weights = task.fit_central([a, b], epochs=ROUNDS, lr=float(LR), batch_size=32)
    central = planned.evaluate(weights, planned.load_site([test], 0.0, 0)[0])["accuracy"]
    federated = s["final_accuracy"]
    assert isinstance(federated, float)
    assert abs(federated - central) <= 0.01, (federated, central)
    assert federated > 0.7  # and both learned something: a constant guess scores about 0.5

    # The final model is scored again from its file, as a user would: the same accuracy.
    model, _ = decode((c.data_dir / "model.safetensors").read_bytes())
    fed_task = task.with_plan(plan)
    assert fed_task.evaluate(model, fed_task.load_site([test], 0.0, 0)[0])["accuracy"] == pytest.approx(federated)
    records = [json.loads(line) for line in (c.data_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(records[-1]["test_metrics"]) == {"recall_0", "recall_1"}


def test_a_regression_label_is_scored_by_r2_and_rmse(fleet: Fleet, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = []
    for name, n in (("a", 600), ("b", 500), ("test", 400)):
        path = tmp_path / f"{name}.csv"
        x1, x2 = rng.normal(0, 1, n), rng.normal(5, 2, n)
        kind = rng.choice(["p", "q"], n)
        y = 3.0 * x1 - 1.5 * x2 + np.where(kind == "p", 2.0, 0.0) + rng.normal(0, 0.5, n) + 100
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["x1", "x2", "kind", "price"])
            w.writerows(zip(x1.round(3), x2.round(3), kind, y.round(3), strict=True))
        paths.append(path)
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=price", "--workers", "2", "--rounds", "10",
                          "--lr", "0.05", "--test-data", str(paths[2]), "--linger", "1")
    workers = [fleet.worker(c.url, "--data", str(p)) for p in paths[:2]]
    for w in workers:
        assert w.proc.wait(timeout=TIMEOUT) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()
    plan = json.loads((c.data_dir / "plan.json").read_text())
    assert plan["problem"] == "regression"
    last = json.loads((c.data_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["test_metrics"]["r2"] == pytest.approx(last["accuracy"])
    assert last["accuracy"] > 0.9  # the noise is 0.5 against a spread of ~4.4: R² of about 0.99 is reachable
    assert 0 < last["test_metrics"]["rmse"] < 1.0


def test_a_site_whose_columns_differ_is_refused_naming_them_and_the_run_goes_on(fleet: Fleet,
                                                                                 tmp_path: Path) -> None:
    a, b, test = write_sites(tmp_path / "data")
    odd = tmp_path / "data" / "odd.csv"
    with a.open() as src, odd.open("w", newline="") as dst:
        rows = list(csv.reader(src))
        w = csv.writer(dst)
        # No "income" column; "city" spelt as a number; an extra "zip" column.
        w.writerow(["age", "city", "zip", "churned"])
        w.writerows([r[0], str(i % 3), "12345", r[3]] for i, r in enumerate(rows[1:]))
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "2", "--rounds", "2",
                          "--test-data", str(test), "--linger", "1", "--wait-timeout", "120")
    good = fleet.worker(c.url, "--data", str(a))
    bad = fleet.worker(c.url, "--data", str(odd))
    assert bad.proc.wait(timeout=60) == 1, fleet.logs()
    text = bad.log_text()
    assert "refused" in text and "'income'" in text and "'zip'" in text and "'city'" in text, text
    # The refused site is not part of the run: it waits for a second site whose data fits, then finishes.
    with httpx.Client(base_url=c.url) as client:
        assert client.get("/v1/plan").json()["plan"] is None
        assert client.get("/v1/status").json()["round"] == 0
    fits = fleet.worker(c.url, "--data", str(b))
    for w in (good, fits):
        assert w.proc.wait(timeout=TIMEOUT) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()
    assert summary(c.data_dir)["state"] == "finished"


def test_mixed_runs_are_refused_either_way(fleet: Fleet, tmp_path: Path) -> None:
    a, _, _ = write_sites(tmp_path / "data")
    songs = fleet.coordinator("--task", "songs", "--workers", "1", "--rounds", "1", "--linger", "1")
    brings_data = fleet.worker(songs.url, "--data", str(a), "--give-up", "5")
    assert brings_data.proc.wait(timeout=60) == 1
    assert "trains on partitions" in brings_data.log_text() and "--data-source sites" in brings_data.log_text()

    tabular = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "1",
                                "--rounds", "1", "--linger", "1", data_dir=tmp_path / "tab")
    brings_none = fleet.worker(tabular.url, "--give-up", "5")
    assert brings_none.proc.wait(timeout=60) == 1
    assert "start it with --data PATH" in brings_none.log_text()
    with httpx.Client(base_url=tabular.url) as client:
        assert client.get("/v1/workers").json() == []  # nothing was recorded of either


def test_without_a_test_set_the_run_is_scored_by_federated_evaluation(fleet: Fleet, tmp_path: Path) -> None:
    a, b, _ = write_sites(tmp_path / "data")
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "2", "--rounds", "3",
                          "--lr", LR, "--linger", "3")
    workers = [fleet.worker(c.url, "--data", str(p)) for p in (a, b)]
    with httpx.Client(base_url=c.url) as client:
        r = client.post("/v1/evaluate")
        assert r.status_code == 409 and "federated evaluation" in r.json()["detail"]
    for w in workers:
        assert w.proc.wait(timeout=TIMEOUT) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()
    s = summary(c.data_dir)
    assert s["evaluation"] == "federated" and s["final_accuracy"] is None
    assert isinstance(s["final_fed_accuracy"], float) and s["final_fed_accuracy"] > 0.6
    # The report scores the run by what it has, and says so.
    r = run_fedfleet("report", str(c.data_dir), "--out", str(tmp_path / "report"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{s['final_fed_accuracy']:.4f} (federated)" in (tmp_path / "report" / "report.md").read_text()


def test_fedfleet_run_splits_one_file_into_sites_and_resumes_on_them(tmp_path: Path) -> None:
    a, _, test = write_sites(tmp_path / "data")
    out = tmp_path / "run"
    r = run_fedfleet("run", "--task", "tabular", "--task-option", "label=churned", "--workers", "3", "--rounds", "2",
                     "--data-split", str(a), "--partition", "natural:city", "--test-data", str(test), "--out", str(out),
                     "--quiet", timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    sites = sorted((out / "sites").iterdir())
    assert len(sites) == 3
    # natural:city: each site holds one city's rows (three cities, three sites).
    cities = [{row["city"] for row in csv.DictReader(p.open())} for p in sites]
    assert all(len(c) == 1 for c in cities) and set.union(*cities) == {"a", "b", "c"}
    rows = sum(1 for p in sites for _ in csv.DictReader(p.open()))
    assert rows == sum(1 for _ in csv.DictReader(a.open()))
    s = summary(out)
    assert s["state"] == "finished" and s["data_source"] == "sites"
    worker_logs = "".join(p.read_text() for p in (out / "logs").glob("worker-*.log"))
    assert worker_logs.count("worker.described") == 3


def test_a_tabular_coordinator_without_a_label_refuses_to_start_and_writes_nothing(tmp_path: Path) -> None:
    r = run_fedfleet("coordinator", "--task", "tabular", "--data-dir", str(tmp_path / "c"), "--port", "0", timeout=60)
    assert r.returncode == 1
    assert "needs to know the column to predict: --task-option label=COLUMN" in r.stderr
    assert not (tmp_path / "c").exists()


def test_a_data_source_the_task_cannot_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    a, _, test = write_sites(tmp_path / "data")
    cases = [
        (["run", "--task", "tabular", "--task-option", "label=churned"], "give fedfleet run --data-split FILE"),
        (["run", "--task", "songs", "--data-source", "sites"], "'songs' cannot read a site's own files"),
        (["coordinator", "--task", "songs", "--data-source", "sites", "--port", "0"],
         "'songs' cannot read a site's own files"),
        (["coordinator", "--task", "songs", "--test-data", str(test), "--port", "0"], "--test-data cannot be used"),
        (["run", "--task", "songs", "--data-split", str(a)], "--data-split is for tasks such as tabular"),
    ]
    for i, (args, message) in enumerate(cases):
        where = ["--out" if args[0] == "run" else "--data-dir", str(tmp_path / f"out-{i}")]
        r = run_fedfleet(*args, *where, "--workers", "2", "--rounds", "1", timeout=60)
        assert r.returncode in (1, 2) and message in r.stderr, (args, r.stderr)
        assert not (tmp_path / f"out-{i}" / "state.sqlite").exists()


def test_fedfleet_run_says_why_when_every_worker_failed_instead_of_waiting(tmp_path: Path) -> None:
    a, _, _ = write_sites(tmp_path / "data")
    # The split needs only the label; each worker then finds its file lacks the feature it was told to use.
    r = run_fedfleet("run", "--task", "tabular", "--task-option", "label=churned", "--task-option", "features=height",
                     "--workers", "2", "--rounds", "1", "--data-split", str(a), "--out", str(tmp_path / "run"),
                     "--quiet", "--wait-timeout", "120", timeout=90)
    assert r.returncode == 1
    # Whichever the runner sees first, both workers ended or one failed while the first round needs all: both
    # say so at once (not after --wait-timeout: the 90 s bound) and carry the worker's own reason.
    said = ("every worker process ended before the run did", "a worker process failed before the first round")
    assert any(s in r.stderr for s in said) and "no column 'height'" in r.stderr, r.stderr


def test_fedfleet_run_stops_at_once_when_a_worker_fails_before_the_first_round(tmp_path: Path) -> None:
    a, _, _ = write_sites(tmp_path / "data")
    lonely = tmp_path / "data" / "lonely.csv"
    with a.open() as src, lonely.open("w", newline="") as dst:
        rows = list(csv.reader(src))
        w = csv.writer(dst)
        w.writerows(rows[:200])
        w.writerow([rows[1][0], rows[1][1], "z", rows[1][3]])  # one row of city "z": a site of one row
    # natural:city gives city z's site one row, which its validation split takes: that worker cannot train.
    r = run_fedfleet("run", "--task", "tabular", "--task-option", "label=churned", "--workers", "4", "--rounds", "1",
                     "--data-split", str(lonely), "--partition", "natural:city", "--val-fraction", "0.5",
                     "--out", str(tmp_path / "run"), "--quiet", timeout=90)
    assert r.returncode == 1
    assert "a worker process failed before the first round, which needs all 4" in r.stderr, r.stderr


def test_a_worker_whose_data_cannot_be_read_leaves_and_its_slot_is_free_at_once(fleet: Fleet, tmp_path: Path) -> None:
    a, _, _ = write_sites(tmp_path / "data")
    unlabelled = tmp_path / "data" / "unlabelled.csv"
    unlabelled.write_text("age,income,city\n40,50,a\n41,52,b\n")
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "1", "--rounds", "1",
                          "--worker-timeout", "600", "--linger", "1")
    bad = fleet.worker(c.url, "--data", str(unlabelled))
    assert bad.proc.wait(timeout=60) == 1
    assert "unlabelled.csv: no label column 'churned'" in bad.log_text(), bad.log_text()
    with httpx.Client(base_url=c.url) as client:
        assert client.get("/v1/workers").json() == []  # not held until --worker-timeout (600 s here)
        # Only the worker itself may say it leaves, and only before it took part.
        assert client.delete("/v1/workers/nobody").status_code == 404
    good = fleet.worker(c.url, "--data", str(a))
    assert good.proc.wait(timeout=TIMEOUT) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()


def test_a_description_json_cannot_store_or_the_checker_chokes_on_is_a_422_not_a_500(fleet: Fleet,
                                                                                      tmp_path: Path) -> None:
    c = fleet.coordinator("--task", "tabular", "--task-option", "label=churned", "--workers", "1", "--rounds", "1",
                          "--linger", "1")
    with httpx.Client(base_url=c.url) as client:
        wid = client.post("/v1/workers", json={"name": "liar", "data_source": "sites"}).json()["worker_id"]
        for body in ('{"description": {"format": 1, "rows": NaN}}',
                     '{"description": {"columns": [[[[[[]]]]]], "label": {"x": Infinity}}}'):
            r = client.post(f"/v1/workers/{wid}/description", content=body,
                            headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and "refused" in r.json()["detail"], (r.status_code, r.text)
            # A refused worker's slot is freed (it is forgotten): join again for the next case.
            wid = client.post("/v1/workers", json={"name": "liar", "data_source": "sites"}).json()["worker_id"]
        assert client.get("/v1/plan").json()["plan"] is None
        assert client.get("/v1/health").json()["ok"] is True
