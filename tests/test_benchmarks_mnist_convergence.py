"""benchmarks/mnist_convergence.py chooses its learning rate on validation accuracy (the coordinator's
--server-val examples), never on the test accuracy it reports (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import MNIST_ENV, image_data_dir, load_benchmark


def test_the_learning_rate_is_chosen_by_validation_accuracy_not_test() -> None:
    bench = load_benchmark("mnist_convergence")
    tried = [{"lr": 0.02, "val_accuracy": 0.91, "test_accuracy": 0.99},  # best on test: must not be chosen
             {"lr": 0.05, "val_accuracy": 0.95, "test_accuracy": 0.90},
             {"lr": 0.1, "val_accuracy": 0.93, "test_accuracy": 0.95}]
    assert bench.select_lr(tried) == 0.05
    with pytest.raises(ValueError, match="validation"):
        bench.select_lr([{"lr": 0.1, "val_accuracy": None, "test_accuracy": 0.9}])


def test_rounds_to_target_counts_from_one_and_skips_rounds_without_a_score() -> None:
    bench = load_benchmark("mnist_convergence")
    assert bench.first_reaching([0.5, None, 0.97, 0.99], 0.97) == 3
    assert bench.first_reaching([0.5, 0.6], 0.97) is None


def test_smallest_configuration_sweeps_on_validation_and_reports_both(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    bench = load_benchmark("mnist_convergence")
    # 100 workers, 2 a round, one FedAvg IID cell: two 1-round sweep runs and a reported run of at most 2 rounds.
    argv = ["--data-dir", str(data), "--model", "mlp", "--workers", "100", "--fraction", "0.02", "--processes", "1",
            "--algorithm", "FedAvg", "--partition", "iid", "--lrs", "0.02,0.1", "--sweep-rounds", "1",
            "--max-rounds", "2", "--target", "0.5", "--val", "2000", "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "convergence-mnist-mlp.json").read_text())
    tried = result["sweeps"]["FedAvg"]
    assert [t["lr"] for t in tried] == [0.02, 0.1]
    assert all(0 < t["val_accuracy"] < 1 and 0 < t["test_accuracy"] < 1 for t in tried)
    (cell,) = result["cells"]
    assert cell["lr"] == max(tried, key=lambda t: t["val_accuracy"])["lr"]
    assert len(cell["val_accuracy_by_round"]) == len(cell["accuracy_by_round"]) == cell["rounds_run"]
    assert cell["final_val_accuracy"] == cell["val_accuracy_by_round"][-1]
    assert "validation accuracy" in result["selection"] and "2000 examples" in result["selection"]
    table = (tmp_path / "convergence-mnist-mlp.md").read_text()
    assert "Chosen on what:" in table and "rounds to target (validation)" in table
