"""`fedfleet report` of several runs: each labelled by every option that differs between them, the others said
once as common, and a table of final, best (with its round) and mean of the last rounds, on real runs."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_fedfleet as fedfleet
from fedfleet.report import LAST_N, compare_labels, figure_compare, load_run, write_report
from fedfleet.storage.records import RoundRecord, RunSummary
from fedfleet.storage.run_dir import RunDir
from test_report import check_png, table_rows

LONG = "long (rounds=12, fraction=1.0, local_epochs=1)"
SHORT = "short (rounds=4, fraction=0.67, local_epochs=2)"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two real runs of 3 workers that differ in rounds (12 against 4), fraction and local epochs."""
    base = tmp_path_factory.mktemp("compare")
    long, short = base / "long", base / "short"
    for path, args in ((long, ("--rounds", "12")),
                       (short, ("--rounds", "4", "--fraction", "0.67", "--local-epochs", "2"))):
        r = fedfleet("run", "--workers", "3", *args, "--out", str(path), "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
    return long, short


def summary(run: Path) -> RunSummary:
    value = RunDir(run).read_summary()
    assert value is not None
    return value


def expected_scores(records: list[RoundRecord], scores: list[float | None]) -> tuple[str, str]:
    """The table's best and mean-of-last cells, worked out here from the records."""
    known = [(s, r.round) for s, r in zip(scores, records, strict=True) if s is not None]
    best, best_round = max(known, key=lambda sr: (sr[0], -sr[1]))
    window = [s for s in scores[-LAST_N:] if s is not None]
    mean = f"{math.fsum(window) / len(window):.4f}"
    if len(scores) < LAST_N:
        mean += f" (last {len(scores)})"
    return f"{best:.4f} (round {best_round})", mean


def test_labels_name_every_option_that_differs(pair: tuple[Path, Path]) -> None:
    long, short = pair
    a, b = summary(long).config, summary(short).config
    # What the two command lines set differently, and nothing else (the seed, lr, partition... agree).
    assert [k for k in a if a[k] != b[k]] == ["rounds", "fraction", "local_epochs"]
    labels = compare_labels([load_run(long), load_run(short)])
    assert labels == [LONG, SHORT]
    fig = figure_compare([load_run(long), load_run(short)])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels


def test_comparison_table_gives_final_best_and_mean_of_the_last_rounds(pair: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    long, short = pair
    write_report([long, short], tmp_path)
    text = (tmp_path / "report.md").read_text()
    rows = table_rows(text)
    header = text.splitlines()[2]
    # The options that differ are columns; the partition and worker count, equal in both, are not.
    assert "| fraction | local_epochs |" in header and "| workers |" not in header and "| partition |" not in header
    for run in (long, short):
        records = RunDir(run).read_rounds()
        row = rows[run.name]
        assert row["final accuracy"] == f"{summary(run).final_accuracy:.4f}"
        best, mean = expected_scores(records, [r.accuracy for r in records])
        assert row["best accuracy (round)"] == best
        assert row[f"mean of last {LAST_N}"] == mean
        assert row["rounds"] == str(len(records)) == row["rounds"]
    assert rows["long"]["fraction"] == "1.0" and rows["short"]["fraction"] == "0.67"
    assert rows["long"]["local_epochs"] == "1" and rows["short"]["local_epochs"] == "2"
    # 12 rounds: the mean is over the last 10 and says nothing more; 4 rounds: it says it is over 4.
    assert "(" not in rows["long"][f"mean of last {LAST_N}"] and rows["short"][f"mean of last {LAST_N}"].endswith(
        "(last 4)")
    # What the runs share is said once, above the charts.
    common = next(line for line in text.splitlines() if line.startswith("Options common to every run: "))
    assert "`task=songs`" in common and "`workers=3`" in common and "`partition=iid`" in common
    assert "`fraction=" not in common and "`local_epochs=" not in common and "`rounds=" not in common
    for label in compare_labels([load_run(long), load_run(short)]):
        assert f"\n## {label}\n" in text
    check_png(tmp_path / "compare.png")


def test_runs_scored_by_federated_evaluation_keep_that_score(pair: tuple[Path, Path], tmp_path: Path) -> None:
    # A run without a held-out set is scored on the workers' validation splits: so are its best and mean.
    run = shutil.copytree(pair[1], tmp_path / "fed")
    records = [r.model_copy(update={"accuracy": None, "loss": None, "confusion": None})
               for r in RunDir(run).read_rounds()]
    RunDir(run).write_rounds(records)
    s = summary(run)
    RunDir(run).write_summary(s.model_copy(update={"evaluation": "federated", "final_accuracy": None,
                                                   "final_loss": None,
                                                   "final_fed_accuracy": records[-1].fed_accuracy}))
    write_report([pair[0], run], tmp_path / "out")
    row = table_rows((tmp_path / "out" / "report.md").read_text())["fed"]
    assert row["final accuracy"] == f"{records[-1].fed_accuracy:.4f} (federated)"
    best, mean = expected_scores(records, [r.fed_accuracy for r in records])
    assert row["best accuracy (round)"] == best and row[f"mean of last {LAST_N}"] == mean


def test_a_run_whose_options_are_unknown_is_said_so(pair: tuple[Path, Path], tmp_path: Path) -> None:
    # Only metrics.jsonl: its options cannot be compared, and do not make every other option look different.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pair[1] / "metrics.jsonl", bare / "metrics.jsonl")
    labels = compare_labels([load_run(pair[0]), load_run(pair[1]), load_run(bare)])
    assert labels == [LONG, SHORT, "bare (options unknown)"]
    write_report([pair[0], pair[1], bare], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Options unknown (no config.toml or summary.json): bare." in text
    assert table_rows(text)["bare"]["fraction"] == "?"


def test_strategy_and_task_options_label_runs_too(pair: tuple[Path, Path]) -> None:
    # The strategy's and the task's own options are options: one run's prox_mu against another's unset one.
    base = load_run(pair[0])
    assert base.config is not None
    prox = replace(base, name="prox", config={**base.config, "strategy": "fedprox",
                                              "strategy_options": {"prox_mu": "0.01"},
                                              "task_options": {"data_dir": "songs"}})
    assert compare_labels([base, prox]) == ["long (strategy=fedavg, task.data_dir=-, strategy.prox_mu=-)",
                                            "prox (strategy=fedprox, task.data_dir=songs, strategy.prox_mu=0.01)"]
