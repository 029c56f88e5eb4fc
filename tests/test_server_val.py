"""--server-val N: examples of the training pool kept on the coordinator, out of every worker's partition, and
scored each round beside the test set (issue 18: choices made on validation data, never on the test set)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import MNIST_ENV, image_data_dir, run_fedfleet
from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import check_data_source, load_server_val
from fedfleet.errors import ConfigError
from fedfleet.partition import holdout_indices, parse_partition, split
from fedfleet.protocol import codec
from fedfleet.tasks import load_task
from fedfleet.tasks.songs import training_rows
from test_run_lifecycle import STOP_WITHIN, runs, start_run, wait_rounds  # noqa: F401  (runs: a fixture)

SONGS = ("--task", "songs", "--workers", "3", "--round-timeout", "10")


def records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_server_val_scores_every_round_on_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_fedfleet("run", *SONGS, "--rounds", "3", "--server-val", "2000", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = records(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert isinstance(r["val_accuracy"], float) and 0 < r["val_accuracy"] < 1, r
        assert isinstance(r["val_loss"], float) and r["val_loss"] > 0, r
        assert r["val_accuracy"] != r["accuracy"]  # a set of its own, not the test set's score copied
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_accuracy"] == rows[-1]["val_accuracy"]
    assert summary["config"]["server_val"] == 2000
    # The record's score is the final model's on the examples derived from the run's config (seed and count).
    config = RunConfig.from_mapping({"task": "songs", "workers": 3, "server_val": 2000})
    task = load_task("songs", {})
    model, _ = codec.decode((out / "model.safetensors").read_bytes())
    assert task.evaluate(model, load_server_val(config, task))["accuracy"] == pytest.approx(rows[-1]["val_accuracy"])


def test_a_run_without_it_records_none(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_fedfleet("run", *SONGS, "--rounds", "1", "--quiet", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert records(out)[0]["val_accuracy"] is None and records(out)[0]["val_loss"] is None
    assert json.loads((out / "summary.json").read_text())["final_val_accuracy"] is None


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "natural"])
def test_the_val_set_is_in_no_partition_and_with_them_makes_the_pool(scheme: str) -> None:
    _, y, decade = training_rows()
    spec = parse_partition(f"{scheme}+val:2000")
    val = holdout_indices(y, 2000, seed=7)
    parts = split(y, decade, spec, 8, seed=7)
    everything = np.concatenate([val, *parts])
    assert len(val) == 2000
    assert len(everything) == len(y) and np.array_equal(np.sort(everything), np.arange(len(y)))  # disjoint, all
    # The task's own partitions are the same split (what every worker loads).
    task = load_task("songs", {})
    for index in (0, 7):
        assert len(task.load_partition(spec, index, 8, 7)) == len(parts[index])
    # Stratified: each class's share of the val set is its share of the pool, to rounding.
    assert np.abs(np.bincount(y[val]) - np.bincount(y) * 2000 / len(y)).max() < 1
    # Without --server-val the split is the old one, so earlier runs' partitions do not move.
    old = split(y, decade, parse_partition(scheme), 8, seed=7)
    assert sum(len(p) for p in old) == len(y)


def test_mnist_label_shards_leave_the_val_set_out() -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    task = load_task("mnist", {"data_dir": str(data), "examples": "3000"})
    spec = parse_partition("natural+val:500")
    val = task.load_server_val(spec, 3)
    parts = [task.load_partition(spec, i, 10, 3) for i in range(10)]
    assert len(val) == 500 and sum(len(p) for p in parts) == 2500
    assert val.x.shape[1:] == parts[0].x.shape[1:] == task.load_test().x.shape[1:]  # scored like the test set
    # No image of the val set is in a partition (images compared by their bytes).
    held = {row.tobytes() for row in val.x}
    assert not any(row.tobytes() in held for p in parts for row in p.x if np.any(row))


def test_another_seed_keeps_other_examples() -> None:
    _, y, _ = training_rows()
    assert not np.array_equal(holdout_indices(y, 500, seed=1), holdout_indices(y, 500, seed=2))
    assert np.array_equal(holdout_indices(y, 500, seed=1), holdout_indices(y, 500, seed=1))


def test_more_than_the_pool_is_refused_naming_the_option(tmp_path: Path) -> None:
    done = run_fedfleet("run", *SONGS, "--rounds", "1", "--server-val", "99999", "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "server_val" in done.stderr and "99999" in done.stderr, done.stderr


def test_a_pool_left_too_small_for_the_workers_is_refused(tmp_path: Path) -> None:
    pool = len(training_rows()[1])
    done = run_fedfleet("run", *SONGS, "--rounds", "1", "--server-val", str(pool - 2), "--out", str(tmp_path / "run"))
    assert done.returncode != 0
    assert "server_val" in done.stderr and "3" in done.stderr, done.stderr


def test_a_sites_run_is_refused_naming_the_option(tmp_path: Path) -> None:
    done = run_fedfleet("run", "--task", "songs", "--data-source", "sites", "--server-val", "10",
                        "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "'server_val'" in done.stderr and "site" in done.stderr, done.stderr
    # A task whose data is at the sites by nature (tabular) is refused where the coordinator starts.
    config = RunConfig.from_mapping({"task": "tabular", "server_val": 10, "task_options": {"label": "y"}})
    with pytest.raises(ConfigError, match=r"server_val.*site") as caught:
        check_data_source(config, load_task("tabular", {"label": "y"}))
    assert caught.value.option == "server_val"


def test_the_partition_option_takes_no_val_count() -> None:
    with pytest.raises(ConfigError, match="--server-val"):
        RunConfig.from_mapping({"partition": "iid+val:10"})


def test_resume_keeps_the_same_val_set(tmp_path: Path, runs: list[subprocess.Popen[str]]) -> None:  # noqa: F811
    out = tmp_path / "run"
    proc = start_run(out, *SONGS, "--rounds", "60", "--server-val", "1500")
    runs.append(proc)
    wait_rounds(proc, out, 2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=STOP_WITHIN)
    stopped = len(records(out))
    again = run_fedfleet("run", "--out", str(out), "--resume", "--quiet", timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    rows = records(out)
    assert len(rows) == 60 > stopped and all(r["val_accuracy"] is not None for r in rows)
    config = RunConfig.from_mapping({"task": "songs", "workers": 3, "server_val": 1500})
    task = load_task("songs", {})
    model, _ = codec.decode((out / "model.safetensors").read_bytes())
    assert task.evaluate(model, load_server_val(config, task))["accuracy"] == pytest.approx(rows[-1]["val_accuracy"])
