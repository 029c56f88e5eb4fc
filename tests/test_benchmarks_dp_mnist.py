"""benchmarks/dp_mnist.py: its smallest configuration runs end to end and writes the JSON, the table and
the plot; the grid is judged on federated validation accuracy, never on the test accuracy. And
benchmarks/dp_songs.py --plot-only redraws its plot from a results JSON without running anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import BENCHMARKS, MNIST_ENV, image_data_dir, load_benchmark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_smallest_study_writes_json_table_and_plot(tmp_path: Path) -> None:
    data = image_data_dir(MNIST_ENV)
    bench = load_benchmark("dp_mnist")
    out = tmp_path / "results"
    argv = ["--data-dir", str(data), "--models", "mlp", "--workers", "4", "--fraction", "1", "--processes", "1",
            "--examples", "2000", "--mlp-rounds", "2", "--mlp-epsilons", "8", "--mlp-clips", "1", "--mlp-lrs", "0.1",
            "--results", str(out)]
    assert bench.main(argv) == 0
    result = json.loads((out / "dp_mnist.json").read_text())
    meta = result["meta"]
    assert meta["command"] == "python benchmarks/dp_mnist.py " + " ".join(argv)
    assert (meta["workers"], meta["fraction"], meta["examples"], meta["delta"]) == (4, 1.0, 2000, 1e-5)
    assert meta["seconds"] > 0 and "CPUs" in meta["machine"] and meta["finished"] is True
    (m,) = result["models"]
    assert (m["model"], m["rounds"], m["grid"]) == ("mlp", 2, [])
    assert (m["chosen"]["clip"], m["chosen"]["lr"]) == (1.0, 0.1) and "nothing to choose" in m["chosen"]["how"]
    assert [c["label"] for c in m["cells"]] == ["no DP", "epsilon 8"]
    nodp, dp = m["cells"]
    assert nodp["epsilon"] is None and nodp["noise_multiplier"] is None and nodp["clipped_share"] is None
    assert 7.9 < dp["epsilon"] <= 8 + 1e-6 and dp["target_epsilon"] == 8 and dp["noise_multiplier"] > 0
    assert (dp["clip"], dp["dp_seed"], dp["mean_sampled"]) == (1.0, 0, 4.0) and 0 <= dp["clipped_share"] <= 1
    for cell in m["cells"]:
        assert cell["rounds"] == 2 and len(cell["accuracy_by_round"]) == len(cell["fed_accuracy_by_round"]) == 2
        assert 0 <= cell["accuracy"] <= 1 and 0 <= cell["fed_accuracy_selection"] <= 1
        assert cell["accuracy"] == cell["accuracy_by_round"][-1]
    assert nodp["accuracy"] > 0.5  # 2 rounds on 1800 images: well above chance without noise
    text = (out / "dp_mnist.md").read_text()
    assert meta["command"] in text and "Chosen on validation" in text and "| epsilon 8 | " in text
    png = (out / "dp_mnist.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    (out / "dp_mnist.png").unlink()
    assert bench.main(["--plot-only", "--results", str(out)]) == 0  # redraws from the JSON, runs nothing
    assert (out / "dp_mnist.md").read_text() == text and (out / "dp_mnist.png").read_bytes().startswith(PNG_MAGIC)


def test_the_grid_is_judged_on_validation_not_on_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fake `run`: the larger clip scores better on validation and worse on test; the choice follows
    validation, grid runs have their own noise seeds, and --reuse-grid reports the winning grid run."""
    bench = load_benchmark("dp_mnist")
    calls: list[list[str]] = []

    def fake_run(args: Any, model: str, rounds: int, lr: float, dp: list[str], out: Path) -> dict[str, Any]:
        calls.append(dp)
        clip = float(dp[dp.index("--dp-clip") + 1]) if dp else None
        eps = float(dp[dp.index("--dp-target-epsilon") + 1]) if dp else None
        return {"model": model, "lr": lr, "clip": clip, "epsilon": eps, "target_epsilon": eps,
                "noise_multiplier": 1.0 if dp else None, "dp_seed": int(dp[dp.index("--dp-seed") + 1]) if dp else None,
                "rounds": rounds, "accuracy": 0.9 - (clip or 0) / 10, "fed_accuracy_selection": 0.5 + (clip or 0) / 10,
                "clipped_share": 0.5 if dp else None, "seconds": 1.0}

    monkeypatch.setattr(bench, "run", fake_run)
    args = bench.parse_args(["--models", "mlp", "--mlp-clips", "0.5,2", "--mlp-lrs", "0.1", "--mlp-epsilons", "4,1",
                             "--mlp-grid-epsilon", "4", "--mlp-rounds", "3"])
    m = bench.study_model(args, "mlp", tmp_path)
    assert (m["chosen"]["clip"], m["chosen"]["lr"]) == (2.0, 0.1) and "validation" in m["chosen"]["how"]
    assert [g["dp_seed"] for g in m["grid"]] == [bench.GRID_DP_SEED, bench.GRID_DP_SEED + 1]
    assert [(c["label"], c["clip"], c["dp_seed"]) for c in m["cells"]] == [
        ("no DP", None, None), ("epsilon 4", 2.0, 0), ("epsilon 1", 2.0, 0)]
    assert len(calls) == 5  # 2 grid runs, no DP, a fresh run at epsilon 4, epsilon 1

    calls.clear()
    args = bench.parse_args(["--models", "mlp", "--mlp-clips", "0.5,2", "--mlp-epsilons", "4", "--mlp-grid-epsilon",
                             "4", "--reuse-grid", "mlp"])
    m = bench.study_model(args, "mlp", tmp_path)
    (_, at4) = m["cells"]
    assert at4["reused_grid_run"] and at4["dp_seed"] == bench.GRID_DP_SEED + 1 and len(calls) == 3
    assert "the grid run" in bench.table({"fraction": 0.2, "workers": 100}, {**m, "name": "2NN"})


def test_dp_songs_plot_only_draws_the_png_from_a_json(tmp_path: Path) -> None:
    cell = {"accuracy_min": 0.3, "accuracy_max": 0.5, "noise_multiplier": 2.0, "flags": [], "runs": []}
    cells = {"FedAvg, no DP": {**cell, "accuracy_mean": 0.65, "epsilon": None, "noise_multiplier": None},
             "DP, noise ~0 (sigma 0.001)": {**cell, "accuracy_mean": 0.62, "epsilon": 1.6e7},
             "DP, epsilon = 8": {**cell, "accuracy_mean": 0.45, "epsilon": 8.0},
             "DP, epsilon = 1": {**cell, "accuracy_mean": 0.35, "epsilon": 1.0}}
    result = {"meta": {"rounds": 30, "clip": 0.5, "delta": 1e-5, "sample_rate": 1.0}, "cells": {"8": cells}}
    source, png = tmp_path / "small.json", tmp_path / "out" / "small.png"
    source.write_text(json.dumps(result))
    r = subprocess.run([sys.executable, str(BENCHMARKS / "dp_songs.py"), "--plot-only", "--json", str(source),
                        "--png", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["small.json", "small.png"]
