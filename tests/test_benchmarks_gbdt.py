"""benchmarks/gbdt.py: its quick mode runs end to end (options chosen on validation songs, a real federated song
run, the generated regression on sites' files) and writes the JSON and markdown its results file is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gbdt.py"


def test_quick_mode_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "gbdt.json").read_text())
    choice = result["choice"]
    assert {s["max_depth"] for s in choice["scores"]} == set(choice["grid"]["max_depth"])
    best = max(s["val_accuracy"] for s in choice["scores"])
    assert choice["val_accuracy"] == best  # chosen by validation accuracy, the only score it holds
    assert set(choice["scores"][0]) == {"max_depth", "learning_rate", "n_trees", "val_accuracy"}
    (song,) = result["songs"]
    assert song["partition"] == "iid" and song["trees_equal_central"] is True
    assert song["test_accuracy"] == pytest.approx(result["central"]["booster"]["test_accuracy"], abs=1e-9)
    assert song["rounds"] == choice["chosen"]["n_trees"] * choice["chosen"]["max_depth"]
    assert song["bytes_in"] > 0 and song["bytes_out"] > 0
    reg = result["regression"]
    assert reg["federated_r2"] == pytest.approx(reg["central_trees_r2"], abs=1e-6)
    assert reg["federated_r2"] > reg["central_linear_r2"]
    text = (out / "gbdt.md").read_text()
    assert "What was chosen on what" in text and "| iid |" in text
