"""benchmarks/songs_models.py: the song-era models' figures over seeds, every choice made on validation songs
(issue 18): the choice reads validation accuracy only, and the quick mode runs every part end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import load_benchmark


def test_the_choice_is_made_on_validation_even_when_the_test_set_disagrees() -> None:
    bench = load_benchmark("songs_models")
    # (validation, test) per epoch: lr 0.3's epoch 1 is best on test, lr 0.1's epoch 2 on validation.
    runs = {0.1: [(0.60, 0.61), (0.66, 0.64), (0.65, 0.65)], 0.3: [(0.64, 0.70), (0.62, 0.69)]}
    pick = bench.chosen(runs, "lr")
    assert (pick["lr"], pick["epochs"], pick["val_accuracy"], pick["test_accuracy"]) == (0.1, 2, 0.66, 0.64)
    assert pick["val_by_setting"] == {"0.1": 0.66, "0.3": 0.64}


def test_mean_and_sample_std_over_seeds() -> None:
    bench = load_benchmark("songs_models")
    assert bench.mean_std([0.6, 0.7]) == "0.6500 ± 0.0707"  # sample std: sqrt(0.005)
    assert bench.mean_std([0.6812]) == "0.6812"


def test_quick_mode_runs_central_and_federated_and_says_what_was_chosen_on_what(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    bench = load_benchmark("songs_models")
    assert bench.main(["--quick", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "songs_models.json").read_text())
    names = set(result["central"])
    assert {"logistic regression", "MLP 64 x 2 (songs-mlp)", "MLP 256 x 2", "MLP 128 x 3"} <= names
    # scikit-learn is the bench extra: its row is there exactly when it can be imported
    has_sklearn = importlib.util.find_spec("sklearn") is not None
    assert ("HistGradientBoosting (scikit-learn)" in names) == has_sklearn
    for name, cells in result["central"].items():
        (cell,) = cells  # --quick: one seed
        assert cell["seed"] == 0 and 0.4 < cell["test_accuracy"] < 1, (name, cell)
        assert cell["val_accuracy"] == max(cell["val_by_setting"].values()), (name, cell)
    for task in ("songs", "songs-mlp"):
        fed = result["federated"][task]
        assert fed["lr"] == max(fed["sweep"], key=lambda s: s["val_accuracy"])["lr"]
        (cell,) = fed["cells"]
        assert 0.4 < cell["test_accuracy"] < 1 and 0.4 < cell["val_accuracy"] < 1
        assert "--server-val" in cell["command"] and "--val-fraction 0" in cell["command"]
    assert result["meta"]["val_songs"] > 6000  # 20% of the ~32k training songs
    text = (tmp_path / "songs_models.md").read_text()
    assert "Chosen on what:" in text and "## Central" in text and "## Federated" in text
