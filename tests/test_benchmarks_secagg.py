"""benchmarks/secagg.py: its smallest case (20K parameters, 5 workers, 3 rounds, no Flower) runs end to end
through real plaintext and secure runs and writes a JSON with every field its table is made of; and it
configures Flower's SecAgg+ with the neighbourhood fedfleet masked with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "secagg.py"


def test_smallest_case_writes_sane_results(tmp_path: Path) -> None:
    bench = load_benchmark("secagg")
    assert bench.main(["--case", "20000x5", "--rounds", "3", "--no-flower", "--processes", "2",
                       "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "secagg.json").read_text())
    assert set(result) >= {"meta", "goal", "rows", "fedfleet", "flower", "issue_flower_reference"}
    assert result["flower"]["skipped"] == "--no-flower" and result["flower"]["runs"] == []
    assert result["meta"]["command"].startswith("python benchmarks/secagg.py --case 20000x5")
    assert result["meta"]["cpus"] >= 1 and len(result["meta"]["load_start"]) == 3
    plain, secure = result["fedfleet"]
    assert (plain["secure"], secure["secure"]) == (False, True)
    assert "--secure-aggregation" in secure["command"] and "--secure-aggregation" not in plain["command"]
    for run in (plain, secure):
        assert "error" not in run
        assert len(run["rounds_s"]) == 3 and run["round_s"] > 0
        assert run["final_mean_error"] < 1e-6  # the null task's model mean is R after R rounds of +1
    (row,) = result["rows"]
    assert (row["params"], row["workers"], row["neighbours"]) == (20_000, 5, 4)  # every other worker at N <= 20
    assert row["secure_s"] > 0 and row["plain_s"] > 0
    assert math.isfinite(row["ratio"]) and row["ratio"] > 0
    assert 0 < row["error_bound"] < 1e-9
    for phase in ("setup_s", "unmask_s", "worker_mask_s", "mask_floor_s"):
        assert row[phase] > 0, phase
    assert row["masked_s"] >= 0
    # a masked update travels as 8 bytes a parameter, the plaintext one as 4
    assert 8 * 20_000 <= row["up_bytes_per_worker"] < 8 * 20_000 + 4096
    assert 4 * 20_000 <= row["plain_up_bytes_per_worker"] < 4 * 20_000 + 4096
    assert row["down_bytes_per_worker"] > 0
    assert row["tensor_bytes_per_worker"] == pytest.approx(row["up_bytes_per_worker"] + row["down_bytes_per_worker"])
    assert row["control_bytes_per_worker"] > 0
    assert result["goal"]["met"] is None  # no N = 50 case ran
    text = (tmp_path / "secagg.md").read_text()
    assert "| 20,000 | 5 | 4 |" in text and "Flower: not run (--no-flower)" in text


def test_flower_neighbourhood_matches_fedfleets() -> None:
    bench = load_benchmark("secagg")
    assert [c.k for c in (bench.Case(1, 10), bench.Case(1, 50), bench.Case(1, 100), bench.Case(1, 50, 49))] == [
        9, 18, 20, 49]
    # Flower's num_shares counts the client itself; every pair is num_shares = N
    assert bench.flower_shares(bench.Case(1, 50), True) == 19
    assert bench.flower_shares(bench.Case(1, 50, 49), True) == 50
    assert bench.flower_shares(bench.Case(1, 10), True) == 10
    assert bench.flower_shares(bench.Case(1, 10), False) is None
    assert bench.parse_case("100000x50:49") == bench.Case(100_000, 50, 49)
    assert {(c.params, c.workers) for c in bench.QUICK} == {(100_000, 10), (100_000, 50)}
