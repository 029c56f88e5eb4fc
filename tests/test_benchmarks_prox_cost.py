"""benchmarks/prox_cost.py times FedProx's term as the task adds it against the same term through autograd: the
two must give the same fit, or the timing compares different work; its results file says how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark


def test_the_two_ways_of_adding_the_term_give_the_same_fit(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    bench = load_benchmark("prox_cost")
    argv = ["--repeats", "1", "--mu", "0.1", "--results", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "prox_cost.json").read_text())
    assert result["command"] == "python benchmarks/prox_cost.py " + " ".join(argv)
    assert list(result["cases"]) == ["no proximal term (FedAvg)", "μ 0.1, gradient added (the task)",
                                     "μ 0.1, term in the loss (autograd)"]
    assert result["cases"]["no proximal term (FedAvg)"]["ratio"] == 1
    # the term moves the weights; the two ways of adding it agree to float rounding, far below that
    assert result["max_term_effect"] > 1e-4 and result["max_weight_difference"] < result["max_term_effect"] / 100
    table = (tmp_path / "prox_cost.md").read_text()
    assert "| μ 0.1, gradient added (the task) |" in table and "`python benchmarks/prox_cost.py --repeats 1" in table
