"""A user's own task, loaded by module path in the coordinator and in every worker process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from conftest import Fleet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_run_with_a_task_from_the_users_module(tmp_path: Path) -> None:
    out = tmp_path / "mean"
    r = subprocess.run([sys.executable, "-m", "fedfleet", "run", "--task", "mean_task:MeanTask", "--workers", "4",
                        "--rounds", "2", "--seed", "7", "--task-option", "examples=500",
                        "--val-fraction", "0", "--out", str(out),
                        "--quiet"], cwd=EXAMPLES, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((out / "summary.json").read_text())["task"] == "mean_task:MeanTask"

    sys.path.insert(0, str(EXAMPLES))
    try:
        from mean_task import MeanTask
    finally:
        sys.path.remove(str(EXAMPLES))
    task = MeanTask(examples="500")
    everything = np.concatenate([task._numbers(i, 4, 7) for i in range(4)])
    mu = safetensors.numpy.load_file(out / "model.safetensors")["mu"][0]
    assert mu == pytest.approx(everything.mean(), rel=1e-12)


def test_unknown_task_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "fedfleet", "coordinator", "--task", "no_such_module:Task",
                        "--data-dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "cannot import task module 'no_such_module'" in r.stderr


def test_a_worker_runs_only_the_tasks_its_operator_allowed(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loading a task imports a module and calls it: were workers to load whatever the coordinator names,
    # a hostile coordinator could run code on them (e.g. task "subprocess:run").
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    c = fleet.coordinator("--task", "mean_task:MeanTask", "--workers", "1", "--rounds", "1", "--val-fraction", "0",
                          "--linger", "1")
    refused = fleet.worker(c.url, "--give-up", "5")
    assert refused.proc.wait(timeout=60) == 1
    assert "asks for task 'mean_task:MeanTask', which this worker does not run" in refused.log_text()
    assert "--allow-task mean_task:MeanTask" in refused.log_text()
    allowed = fleet.worker(c.url, "--allow-task", "mean_task:MeanTask", "--state-dir", str(refused.state_dir))
    assert allowed.proc.wait(timeout=60) == 0, allowed.log_text()
    assert c.proc.wait(timeout=60) == 0
