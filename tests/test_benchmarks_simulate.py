"""benchmarks/simulate.py: its null workload, made small (200 clients, 5 a round, 3 rounds, no Flower), runs a
real ``fedfleet simulate`` and writes a JSON and table with every field they are made of; and its sums
(steady seconds a round, the comparison with Flower) are right on known inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "simulate.py"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures memory from /proc")
def test_the_null_workload_made_small_writes_sane_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_benchmark("simulate")
    monkeypatch.setattr(bench, "NULL", bench.Workload("null", 200, 5, 3, params=1000))
    assert bench.main(["--only", "null", "--no-flower", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "simulate.json").read_text())
    assert result["command"] == f"python benchmarks/simulate.py --only null --no-flower --results {tmp_path}"
    (row,) = result["rows"]
    assert "error" not in row, row
    assert (row["system"], row["clients"], row["sampled"], row["rounds"]) == ("fedfleet", 200, 5, 3)
    assert "--workers 200 --fraction 0.025 --rounds 3" in row["command"]
    assert 0 < row["round_s"] < row["wall_s"] and 0 < row["first_round_s"] < row["wall_s"]
    assert row["peak_rss_mb"] > 10  # a Python process with numpy, at least
    assert result["comparison"] == [] and result["flower_venv"] is None
    table = (tmp_path / "simulate.md").read_text()
    assert "| fedfleet | null | 200 | 5 | 3 |" in table


def test_steady_seconds_and_the_comparison() -> None:
    bench = load_benchmark("simulate")
    assert bench.steady([10.0, 10.5, 11.5, 12.0]) == 0.5  # gaps 0.5, 1.0, 0.5
    assert bench.steady([3.0]) is None
    rows = [{"system": "fedfleet", "workload": "null", "clients": bench.NULL.clients, "round_s": 0.02,
             "first_round_s": 2.0, "peak_rss_mb": 100.0},
            {"system": "flower", "workload": "null", "clients": bench.NULL.clients, "round_s": 0.3,
             "first_round_s": 8.0, "peak_rss_mb": 400.0},
            {"system": "flower", "workload": "mnist", "clients": 1000, "error": "no torch"}]
    (c,) = bench.compare(rows)
    assert c["workload"] == "null"
    assert (round(c["speedup_per_round"], 6), c["first_round_ratio"], c["memory_ratio"]) == (15.0, 4.0, 4.0)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_memory_of_a_process_tree_counts_its_children() -> None:
    bench = load_benchmark("simulate")
    alone = bench.tree_rss(os.getpid())
    code = "import sys, time; b = bytearray(200 * 2**20); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert bench.tree_rss(os.getpid()) - alone > 150 * 2**20
    finally:
        child.kill()
        child.wait(timeout=10)
