"""benchmarks/mnist_convergence.py chooses its learning rate on validation accuracy (the coordinator's
--server-val examples), never on the test accuracy it reports; it repeats each cell over seeds, aggregates them
(mean ± std, median [min-max]), resumes a study cell by cell and runs any strategy of fedfleet run (issue 18)."""

from __future__ import annotations

import doctest
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import BENCHMARKS, MNIST_ENV, image_data_dir, load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("mnist_convergence")


def test_the_examples_in_its_docstrings_hold(bench: ModuleType) -> None:
    result = doctest.testmod(bench)
    assert result.attempted >= 10 and result.failed == 0


def test_the_learning_rate_is_chosen_by_validation_accuracy_not_test(bench: ModuleType) -> None:
    tried = [{"lr": 0.02, "val_accuracy": 0.91, "test_accuracy": 0.99},  # best on test: must not be chosen
             {"lr": 0.05, "val_accuracy": 0.95, "test_accuracy": 0.90},
             {"lr": 0.1, "val_accuracy": 0.93, "test_accuracy": 0.95}]
    assert bench.select(tried)["lr"] == 0.05
    with pytest.raises(ValueError, match="validation"):
        bench.select([{"lr": 0.1, "val_accuracy": None, "test_accuracy": 0.9}])


def test_select_last_chooses_on_the_mean_of_the_last_rounds_not_one_lucky_round(bench: ModuleType) -> None:
    # lr 0.2 ends on a spike; lr 0.1 is higher over the last three rounds, as non-IID rounds swing.
    tried = [{"lr": 0.1, "val_accuracy": 0.80, "test_accuracy": 0.5, "val_by_round": [0.5, 0.82, 0.81, 0.80]},
             {"lr": 0.2, "val_accuracy": 0.84, "test_accuracy": 0.9, "val_by_round": [0.6, 0.70, 0.65, 0.84]}]
    assert bench.select(tried)["lr"] == 0.2
    assert bench.select(tried, last=3)["lr"] == 0.1
    with pytest.raises(ValueError, match="validation"):  # a sweep from before the per-round record
        bench.select([{"lr": 0.1, "val_accuracy": 0.8, "test_accuracy": 0.8}], last=2)


def test_rounds_to_target_counts_from_one_and_skips_rounds_without_a_score(bench: ModuleType) -> None:
    assert bench.first_reaching([0.5, None, 0.97, 0.99], 0.97) == 3
    assert bench.first_reaching([0.5, 0.6], 0.97) is None


def test_accuracies_over_seeds_are_mean_and_sample_std(bench: ModuleType) -> None:
    accs = [0.9903, 0.9911, 0.9892]
    assert statistics.stdev(accs) == pytest.approx(0.000954, abs=1e-6)  # n-1: the population std is 0.000779
    assert bench.mean_std(accs) == "0.9902 ± 0.0010"
    assert bench.mean_std([0.8798]) == "0.8798"  # one seed: the value, no spread to claim


def test_rounds_to_target_over_seeds_count_the_seeds_that_missed(bench: ModuleType) -> None:
    # Seeds 0 and 2 reached the target at rounds 18 and 20 (their runs stopped there); seed 1 ran all 30 without.
    assert bench.rounds_summary([18, None, 20], [18, 30, 20]) == "20 [18-20], 1 of 3 not in 30"
    assert bench.rounds_summary([18, 16, 20], [18, 16, 20]) == "18 [16-20]"
    assert bench.rounds_summary([None, None, 150], [150, 150, 150]) == ">150 [150], 2 of 3 not in 150"
    assert bench.rounds_summary([None, None, None], [150, 150, 150]) == "3 of 3 not in 150"
    assert bench.rounds_summary([None], [150]) == "not in 150"


def _cell(seed: int, reached: int | None, final: float, best: float, *, cap: int = 30) -> dict[str, Any]:
    rounds = reached or cap
    return {"data": "IID", "algorithm": "FedAvg", "seed": seed, "lr": 0.1, "rounds_run": rounds,
            "rounds_to_target": reached, "val_rounds_to_target": reached and reached - 1, "final_accuracy": final,
            "final_val_accuracy": final, "best_accuracy": best, "seconds_per_round": 2.0 + seed,
            "accuracy_by_round": [final] * rounds, "val_accuracy_by_round": [final] * rounds}


def test_the_table_has_one_row_per_cell_aggregated_over_its_seeds(bench: ModuleType) -> None:
    args = bench.recorded_args(bench.parser().parse_args(["--seeds", "0,1,2", "--algorithm", "FedAvg",
                                                          "--partition", "iid", "--target", "0.97"]))
    result = {"date": "2026-12-03", "machine": "x86_64", "command": "python benchmarks/mnist_convergence.py",
              "args": args, "selection": "on validation", "sweep_seed": 0, "sweeps": {},
              "cells": [_cell(2, 20, 0.9712, 0.9712), _cell(0, 18, 0.9705, 0.9705), _cell(1, None, 0.9650, 0.9690)]}
    (row,) = [line for line in bench.markdown(result).splitlines() if line.startswith("| IID |")]
    assert row == ("| IID | FedAvg | 0.1 | 20 [18-20], 1 of 3 not in 30 | 19 [17-19], 1 of 3 not in 30 | "
                   "0.9689 ± 0.0034 | 0.9702 ± 0.0011 | 3.00 | 3 |")
    assert "seeds 0, 1, 2" in bench.markdown(result)


def test_the_table_still_renders_files_from_before_seeds(bench: ModuleType) -> None:
    # The shape the committed results had before --seeds, --server-val and --strategy (issue 18).
    old = {"date": "2026-11-23", "machine": "x86_64", "command": "python benchmarks/mnist_convergence.py",
           "args": {"task": "mnist", "model": "mlp", "target": 0.97, "max_rounds": 100, "sgd_max_rounds": 300,
                    "lrs": "0.02,0.05,0.1", "sgd_lrs": "0.1,0.3,1.0", "sweep_rounds": 5, "workers": 100,
                    "fraction": 0.1, "processes": 2, "seed": 0, "algorithm": None},
           "sweeps": {"FedAvg": [{"lr": 0.1, "accuracy": 0.939}]},
           "cells": [{"data": "IID", "algorithm": "FedAvg", "lr": 0.1, "rounds_run": 19, "rounds_to_target": 19,
                      "final_accuracy": 0.9702, "best_accuracy": 0.9702, "seconds": 40.0, "seconds_per_round": 2.1,
                      "accuracy_by_round": [0.9702] * 19}]}
    table = bench.markdown(old)
    assert "| IID | FedAvg | 0.1 | 19 | — | 0.9702 | 0.9702 | 2.10 | 1 |" in table
    assert "lr 0.1 → test 0.9390" in table and "chosen on them" in table
    for path in sorted((BENCHMARKS / "results").glob("convergence-*.json")):  # whatever is committed now
        assert "| data | algorithm |" in bench.markdown(json.loads(path.read_text())), path.name


def test_resume_refuses_a_study_made_with_other_options(bench: ModuleType, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    saved = {"args": bench.recorded_args(bench.parser().parse_args(["--max-rounds", "2", "--seeds", "0,1"])),
             "sweeps": {}, "cells": []}
    path = tmp_path / "convergence-mnist-mlp.json"
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--max-rounds", "3", "--seeds", "0,1,2", "--resume", "--results", str(tmp_path)])
    assert exit_info.value.code == 2
    (message,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    # Only --max-rounds: the seeds are what a resumed study may change.
    assert "--resume: convergence-mnist-mlp.json was made with other values of --max-rounds;" in message
    assert json.loads(path.read_text()) == saved  # refused before anything was run or written


def test_a_strategy_option_the_strategy_does_not_take_is_refused_at_start(bench: ModuleType,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--strategy", "fedavgm", "--strategy-option", "prox_mu=0.1"])
    assert exit_info.value.code == 2
    assert "momentum" in capsys.readouterr().err  # the message names the options fedavgm does take


def _count_runs(bench: ModuleType, monkeypatch: pytest.MonkeyPatch,
                options: list[dict[str, str] | None] | None = None) -> list[tuple[str, int, int]]:
    """The (partition, rounds, seed) of every real fedfleet run the study makes from now on, in order (and the
    strategy options a sweep gave each, into ``options``)."""
    runs: list[tuple[str, int, int]] = []
    real_run = bench.run

    def counted(args: Any, partition: str, epochs: int, batch: int | None, lr: float, rounds: int,
                target: float | None, seed: int, out: Path, swept: dict[str, str] | None = None) -> dict[str, Any]:
        runs.append((partition, rounds, seed))
        if options is not None:
            options.append(swept)
        return real_run(args, partition, epochs, batch, lr, rounds, target, seed, out, swept)

    monkeypatch.setattr(bench, "run", counted)
    return runs


def test_smallest_configuration_over_seeds_resumes_cell_by_cell(bench: ModuleType, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    runs = _count_runs(bench, monkeypatch)
    # 100 workers, 2 a round, one FedAvg IID cell with server momentum: a 2-rate 1-round sweep on seed 0, then
    # a run of at most 2 rounds for each seed.
    argv = ["--data-dir", str(data), "--model", "mlp", "--workers", "100", "--fraction", "0.02", "--processes", "1",
            "--algorithm", "FedAvg", "--partition", "iid", "--lrs", "0.02,0.1", "--sweep-rounds", "1",
            "--max-rounds", "2", "--target", "0.5", "--val", "2000", "--local-epochs", "1", "--strategy", "fedavgm",
            "--strategy-option", "momentum=0.5", "--results", str(tmp_path)]
    assert bench.main([*argv, "--seeds", "0,1"]) == 0
    assert runs == [("iid", 1, 0), ("iid", 1, 0), ("iid", 2, 0), ("iid", 2, 1)]
    first = json.loads((tmp_path / "convergence-mnist-mlp.json").read_text())
    tried = first["sweeps"]["FedAvg"]
    assert [t["lr"] for t in tried] == [0.02, 0.1] and first["sweep_seed"] == 0
    assert all(0 < t["val_accuracy"] < 1 and 0 < t["test_accuracy"] < 1 for t in tried)
    chosen = max(tried, key=lambda t: t["val_accuracy"])["lr"]
    assert [(c["seed"], c["lr"]) for c in first["cells"]] == [(0, chosen), (1, chosen)]
    for cell in first["cells"]:
        assert len(cell["val_accuracy_by_round"]) == len(cell["accuracy_by_round"]) == cell["rounds_run"]
        assert cell["final_val_accuracy"] == cell["val_accuracy_by_round"][-1]
    assert first["args"]["strategy"] == "fedavgm" and first["args"]["strategy_option"] == {"momentum": "0.5"}
    assert first["args"]["local_epochs"] == 1 and first["args"]["seeds"] == [0, 1]
    assert "validation accuracy" in first["selection"] and "2000 examples" in first["selection"]
    assert "for the record" in first["selection"]

    runs.clear()
    assert bench.main([*argv, "--seeds", "0,1,2", "--resume"]) == 0
    assert runs == [("iid", 2, 2)]  # no sweep, no seed run twice: only the missing cell
    resumed = json.loads((tmp_path / "convergence-mnist-mlp.json").read_text())
    assert len(resumed["cells"]) == 3 and resumed["cells"][:2] == first["cells"]
    assert resumed["cells"][2]["seed"] == 2 and resumed["cells"][2]["lr"] == chosen
    assert resumed["sweeps"] == first["sweeps"] and resumed["args"]["seeds"] == [0, 1, 2]
    assert [s["cells_run"] for s in resumed["sittings"]] == [2, 1]
    table = (tmp_path / "convergence-mnist-mlp.md").read_text()
    assert "strategy fedavgm (momentum=0.5)" in table and "FedAvg E=1 B=10" in table
    assert "Chosen on what:" in table and "rounds to target (validation)" in table
    (row,) = [line for line in table.splitlines() if line.startswith("| IID |")]
    assert row.startswith(f"| IID | FedAvg, fedavgm (momentum=0.5) | {chosen:g} |") and row.endswith("| 3 |")


def test_a_study_of_dirichlet_label_skew_can_tune_on_the_non_iid_data_itself_with_a_decaying_rate(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    runs = _count_runs(bench, monkeypatch)
    argv = ["--data-dir", str(data), "--model", "mlp", "--workers", "100", "--fraction", "0.02", "--processes", "1",
            "--algorithm", "FedAvg", "--partition", "dirichlet:0.5", "--sweep-partition", "natural",
            "--lrs", "0.02,0.1", "--sweep-rounds", "1", "--max-rounds", "2", "--target", "0.99", "--val", "2000",
            "--local-epochs", "1", "--lr-decay", "0.5", "--results", str(tmp_path), "--name", "dir"]
    assert bench.main(argv) == 0
    # The sweep ran on the 2-shard partition it was told to tune on, the cell on Dirichlet(0.5): no IID run.
    assert runs == [("natural", 1, 0), ("natural", 1, 0), ("dirichlet:0.5", 2, 0)]
    result = json.loads((tmp_path / "convergence-mnist-mlp-dir.json").read_text())
    assert [c["data"] for c in result["cells"]] == ["Dirichlet(0.5)"]
    assert "1 non-IID (2 shards) rounds of seed 0" in result["selection"]
    table = (tmp_path / "convergence-mnist-mlp-dir.md").read_text()
    assert "1-round non-IID (2 shards) sweep" in table and "| Dirichlet(0.5) | FedAvg |" in table
    assert "lr × 0.5^(round − 1)" in table and result["args"]["lr_decay"] == 0.5


def test_a_server_option_is_swept_with_the_learning_rate_and_chosen_on_the_last_rounds(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    options: list[dict[str, str] | None] = []
    runs = _count_runs(bench, monkeypatch, options)
    argv = ["--data-dir", str(data), "--model", "mlp", "--workers", "100", "--fraction", "0.02", "--processes", "1",
            "--algorithm", "FedAvg", "--partition", "iid", "--lrs", "0.1", "--sweep-rounds", "2", "--select-last",
            "2", "--max-rounds", "1", "--target", "0.99", "--val", "2000", "--local-epochs", "1",
            "--strategy", "fedadam", "--strategy-option", "tau=0.01", "--sweep-option", "server_lr=0.003,0.1",
            "--results", str(tmp_path), "--name", "adam"]
    assert bench.main(argv) == 0
    assert runs == [("iid", 2, 0), ("iid", 2, 0), ("iid", 1, 0)]
    result = json.loads((tmp_path / "convergence-mnist-mlp-adam.json").read_text())
    tried = result["sweeps"]["FedAvg"]
    assert [t["options"] for t in tried] == [{"server_lr": "0.003"}, {"server_lr": "0.1"}]
    # The option reached the coordinator: the two sweep runs learnt differently.
    assert tried[0]["val_by_round"] != tried[1]["val_by_round"]
    best = max(tried, key=lambda t: statistics.fmean(t["val_by_round"][-2:]))
    (cell,) = result["cells"]
    assert options == [{"server_lr": "0.003"}, {"server_lr": "0.1"}, best["options"]]
    assert cell["options"] == best["options"] and cell["lr"] == 0.1
    assert result["args"]["sweep_option"] == {"server_lr": ["0.003", "0.1"]} and result["args"]["select_last"] == 2
    assert "learning rate and server_lr" in result["selection"] and "over rounds 1-2 (mean)" in result["selection"]
    table = (tmp_path / "convergence-mnist-mlp-adam.md").read_text()
    assert f"| 0.1, server_lr={best['options']['server_lr']} |" in table
    assert "learning rates and server_lr from a 2-round IID sweep" in table
    assert "lr 0.1, server_lr=0.003 → validation" in table


@pytest.mark.parametrize(("extra", "says"), [
    (["--sweep-option", "server_lr=0.01", "--lr", "0.1"], "--lr skips the sweep"),
    (["--sweep-option", "server_lr=0.01", "--strategy-option", "server_lr=0.1"], "server_lr: given both"),
    (["--sweep-option", "server_lr"], "KEY=VALUE,VALUE"),
    (["--sweep-option", "momentum=0.9"], "momentum"),
    (["--select-last", "6"], "--select-last must be between 1 and --sweep-rounds (5)"),
])
def test_a_sweep_that_cannot_run_is_refused_at_start(bench: ModuleType, capsys: pytest.CaptureFixture[str],
                                                    extra: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--strategy", "fedadam", *extra])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_a_study_from_before_sweep_partition_resumes_under_the_default(bench: ModuleType) -> None:
    old = bench.recorded_args(bench.parser().parse_args(["--seeds", "0"]))
    for later in ("sweep_partition", "sweep_option", "select_last"):
        del old[later]  # the shape of files written before the options: IID sweeps of the lr alone, last round
    given = bench.recorded_args(bench.parser().parse_args(["--seeds", "0,1"]))
    assert bench.differing(old, given) == []
    natural = bench.recorded_args(bench.parser().parse_args(["--sweep-partition", "natural"]))
    assert bench.differing(old, natural) == ["--sweep-partition"]
    assert "IID sweep" in bench.markdown({"date": "d", "machine": "m", "command": "c", "args": old,
                                          "sweeps": {}, "cells": []})


def test_a_run_cut_off_mid_cell_is_carried_on_by_resume_not_started_again(
        bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    data = image_data_dir(MNIST_ENV)
    argv = ["--data-dir", str(data), "--model", "mlp", "--workers", "100", "--fraction", "0.02", "--processes", "1",
            "--algorithm", "FedAvg", "--partition", "iid", "--lr", "0.05", "--max-rounds", "6", "--target", "0.999",
            "--val", "2000", "--local-epochs", "1", "--results", str(tmp_path), "--name", "cut"]
    # The cell's run as the study would start it, stopped (SIGTERM, as when a sitting ends) after its first round.
    out = tmp_path / ".runs" / "convergence-mnist-mlp-cut" / "FedAvg-iid-0-lr0.05"
    # Started with another spelling of the same data folder than the resume's: the folder, not the text, counts.
    args = bench.parser().parse_args([*argv, "--data-dir", os.path.relpath(data)])
    cmd = bench.command(args, "iid", 1, 10, 0.05, 6, 0.999, 0, out)
    proc = subprocess.Popen([*cmd, "--overwrite"], start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before round 1"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    cut_at = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= cut_at < 6 and bench._left_over(out) == "unfinished"

    calls: list[list[str]] = []
    real = bench.subprocess.run

    def recorded(cmd: list[str], **kwargs: Any) -> Any:
        calls.append(cmd)
        return real(cmd, **kwargs)

    monkeypatch.setattr(bench.subprocess, "run", recorded)
    assert bench.main([*argv, "--resume"]) == 0
    runs = [cmd for cmd in calls if "fedfleet" in cmd]  # (git, for the commit, runs too)
    assert len(runs) == 1 and runs[0][-1] == "--resume"  # carried on, not started again
    (cell,) = json.loads((tmp_path / "convergence-mnist-mlp-cut.json").read_text())["cells"]
    assert cell["resumed"] is True and cell["rounds_run"] == 6
    assert len(cell["accuracy_by_round"]) == len(cell["val_accuracy_by_round"]) == 6  # every round once
    assert cell["seconds_per_round"] > 0
    assert not (tmp_path / ".runs" / "convergence-mnist-mlp-cut").exists()  # deleted once the file holds it


def test_nothing_or_a_failed_run_is_not_left_over_to_resume(bench: ModuleType, tmp_path: Path) -> None:
    assert bench._left_over(tmp_path / "none") is None
    assert bench._left_over(tmp_path) is None  # a folder with no run in it
