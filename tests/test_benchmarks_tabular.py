"""benchmarks/tabular_sites.py: its quick mode on a tiny config runs end to end and writes the JSON its
results file is made from; its central reference is ``TabularTask.fit_central`` step for step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conftest import load_benchmark
from fedfleet.tasks.tabular import TabularTask

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "tabular_sites.py"


def test_quick_mode_writes_a_result_of_every_part(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "3", "--partition", "iid",
                        "--house-rows", "2000", "--memory-mb", "1", "--results", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "tabular_sites.json").read_text())
    assert set(result) >= {"meta", "songs", "regression", "memory", "lr"}
    assert [(c["model"], c["partition"]) for c in result["songs"]] == [("logreg", "iid")]
    assert [c["partition"] for c in result["regression"]] == ["iid", "natural:region"]
    for cell in result["songs"] + result["regression"]:
        (run,) = cell["runs"]
        assert run["plan_matches_central"] is True
        for side in ("federated", "central"):
            assert len(run[side]["test_curve"]) == len(run[side]["val_curve"]) == 3
            assert 1 <= run[side]["best_round"] <= 3
        assert run["federated"]["rounds"] == 3 and run["federated"]["bytes_in"] > 0
        assert run["central"]["train_rows"] == sum(run["federated"]["site_train_rows"])
    song = result["songs"][0]["runs"][0]
    assert 0.5 < song["federated"]["final"] <= 1 and 0.5 < song["central"]["final"] <= 1  # 3 eras: 0.40 by guessing
    (memory,) = result["memory"]
    assert memory["peak_rss_mb"] > 10 and memory["rows"] > 0
    text = (out / "tabular_sites.md").read_text()
    assert "python benchmarks/tabular_sites.py --quick" in text and "| logreg | iid |" in text


def test_the_central_reference_is_fit_central_step_for_step(tmp_path: Path) -> None:
    bench = load_benchmark("tabular_sites")
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    bench.write_houses(train, seed=1, rows=600)
    bench.write_houses(val, seed=2, rows=200)
    options: dict[str, Any] = {"label": "price", "model": "logreg"}
    curve = bench.central_curve(options, train, val, val, epochs=3, lr=0.05, seed=4)
    planned, weights = TabularTask(**options).fit_central([train], epochs=3, lr=0.05, batch_size=bench.BATCH, seed=4)
    assert curve.plan == planned.plan
    assert curve.weights.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(curve.weights[name], value)
