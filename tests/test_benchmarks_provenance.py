"""Every benchmark's results file says how it was produced (the house rule behind every figure in the README
and docs): songs_strategies.py and overhead.py, which once wrote bare tables, now record the command, the
commit, the machine and the versions, run end to end on their smallest cases."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import load_benchmark


def _provenance(meta: dict[str, object], command: str) -> None:
    assert meta["command"] == command
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(meta["date"]))
    assert "cores" in str(meta["machine"]) and "python " in str(meta["versions"])
    commit = meta["commit"]
    assert commit is None or re.match(r"[0-9a-f]{7,}", str(commit))  # None only outside a git checkout


def test_songs_strategies_records_its_command_and_fixed_settings(tmp_path: Path) -> None:
    bench = load_benchmark("songs_strategies")
    argv = ["--rounds", "2", "--strategy", "fedavg", "--strategy", "median", "--partition", "natural",
            "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "songs_strategies.json").read_text())
    _provenance(result["meta"], "python benchmarks/songs_strategies.py " + " ".join(argv))
    assert set(result["cells"]) == {"fedavg", "median"}
    for strategy, by_partition in result["cells"].items():
        assert 0.3 < by_partition["natural"]["accuracy"] < 1, strategy
    table = (tmp_path / "songs_strategies.md").read_text()
    assert "| strategy | natural |" in table and "| median |" in table
    assert "--lr 0.05 --batch-size 32" in table and "Nothing was tuned" in table


def test_overhead_records_its_command_next_to_its_rows(tmp_path: Path) -> None:
    bench = load_benchmark("overhead")
    argv = ["--case", "10000x2", "--rounds", "2", "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "overhead.json").read_text())
    _provenance(result["meta"], "python benchmarks/overhead.py " + " ".join(argv))
    (row,) = result["rows"]
    assert (row["params"], row["workers"]) == (10_000, 2)
    # two workers move the 40 KB model down and back up: at least 4 x 40 KB a round
    assert row["bytes_per_round"] >= 4 * 10_000 * 4 and row["round_s"] > 0 and row["floor_s"] > 0
    table = (tmp_path / "overhead.md").read_text()
    assert "| 10,000 | 2 |" in table and "`python benchmarks/overhead.py --case 10000x2" in table
