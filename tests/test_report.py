"""`fedfleet report`: plots and report.md of real runs, the numbers behind them, and clear errors."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import itertools
import json
import re
import shutil
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import run_fedfleet as fedfleet
from fedfleet.cli import main
from fedfleet.errors import StorageError
from fedfleet.report import (
    RunData,
    WorkerParticipation,
    compare_labels,
    load_run,
    plot_compare_privacy,
    plot_participation,
    plot_privacy,
    plot_round_time,
    privacy_lines,
    read_participation,
    round_phases,
)
from fedfleet.storage.records import PrivacySummary, RoundRecord, RoundTimings, RunSummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import Store
from fedfleet.strategies.privacy import epsilon

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SINGLE = ("accuracy_loss.png", "round_time.png", "participation.png")
# A songs run also has the workers' own numbers and, being a classification task, a confusion matrix.
SONGS = (*SINGLE, "worker_heatmap.png", "worker_loss.png", "worker_data.png", "confusion.png")



@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real runs of 3 workers and 3 rounds: one IID, one with each worker holding a few decades."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for partition in ("iid", "natural"):
        path = base / f"songs-{partition}"
        r = fedfleet("run", "--workers", "3", "--rounds", "3", "--partition", partition, "--out", str(path),
                     "--quiet")
        assert r.returncode == 0, r.stdout + r.stderr
        out[partition] = path
    return out


def summary(run: Path) -> RunSummary:
    value = RunDir(run).read_summary()
    assert value is not None, run
    return value


def metrics(run: Path) -> list[RoundRecord]:
    return RunDir(run).read_rounds()


def record(rnd: int, **changes: Any) -> RoundRecord:
    """A valid round record; ``changes`` replace its fields."""
    timings = RoundTimings(wait_workers=0.0, open=0.07, aggregate=0.01, evaluate=0.01, checkpoint=0.01)
    fields: dict[str, Any] = {
        "round": rnd, "accuracy": 0.5, "loss": 1.0, "participants": 3, "sampled": 3, "attempts": 1, "seconds": 0.1,
        "bytes_in": 0, "bytes_out": 0, "model_version": rnd + 1, "timings": timings, **changes}
    return RoundRecord(**fields)


def check_png(path: Path) -> None:
    """A real PNG that matplotlib reads back, of a readable size, with something drawn on it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = imread(path)
    height, width, channels = pixels.shape
    assert 400 <= height <= 2000 and 800 <= width <= 2000 and channels in (3, 4), (path, pixels.shape)
    # A blank canvas has one colour; a chart has lines, bars and text in several.
    assert len(np.unique(pixels.reshape(-1, channels), axis=0)) > 20, path


def table_rows(report_md: str) -> dict[str, dict[str, str]]:
    """report.md's first table, the runs', as {run: {column: cell}}."""
    return table(report_md, "run")


def table(report_md: str, key: str) -> dict[str, dict[str, str]]:
    """The first table of report.md whose first column is ``key``, as {first cell: {column: cell}}."""
    text = report_md.split(f"| {key} |", 1)[1]
    lines = [f"| {key} |" + text.splitlines()[0]]
    lines += [line for line in itertools.takewhile(lambda x: x.startswith("|"), text.splitlines()[1:])]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {row[key]: row for row in rows}


def images(report_md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md)


def test_report_of_one_run(runs: dict[str, Path]) -> None:
    run = runs["iid"]
    r = fedfleet("report", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    out = run / "report"
    assert "report.md" in r.stdout and str(out) in r.stdout
    for name in SONGS:
        check_png(out / name)
    text = (out / "report.md").read_text()
    row = table_rows(text)["songs-iid"]
    s = summary(run)
    assert s.final_accuracy is not None and s.final_loss is not None
    assert row["final accuracy"] == f"{s.final_accuracy:.4f}"
    assert row["final loss"] == f"{s.final_loss:.4f}"
    assert row["rounds"] == "3" and row["partition"] == "iid" and row["workers"] == "3"
    assert row["state"] == "finished" and row["seconds"] == f"{s.seconds:.1f}"
    assert sorted(images(text)) == sorted(SONGS)
    # No differential privacy, nothing about it: no column, no section, no plot.
    assert "ε" not in text and "privacy" not in text.lower() and not (out / "privacy.png").exists()


def test_report_of_two_runs_side_by_side_defaults_to_report_in_cwd(runs: dict[str, Path], tmp_path: Path) -> None:
    r = fedfleet("report", str(runs["iid"]), str(runs["natural"]), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "report"
    check_png(out / "compare.png")
    for name in ("songs-iid", "songs-natural"):
        for plot in SONGS:
            check_png(out / name / plot)
    text = (out / "report.md").read_text()
    rows = table_rows(text)
    assert set(rows) == {"songs-iid", "songs-natural"}
    for partition, run in runs.items():
        assert rows[run.name]["final accuracy"] == f"{summary(run).final_accuracy:.4f}"
        assert rows[run.name]["partition"] == partition
    # Every image report.md shows is there, relative to report.md.
    linked = images(text)
    assert "compare.png" in linked and len(linked) == 1 + 2 * len(SONGS)
    assert all((out / link).is_file() for link in linked)
    # A run's own charts are titled by its partition and workers; the comparison's legend by what differs.
    assert load_run(runs["iid"]).label == "songs-iid (iid, 3 workers)"
    assert load_run(runs["natural"]).label == "songs-natural (natural, 3 workers)"
    assert compare_labels([load_run(runs["iid"]), load_run(runs["natural"])]) == [
        "songs-iid (partition=iid)", "songs-natural (partition=natural)"]


def test_report_out_option_and_state_db_left_untouched(runs: dict[str, Path], tmp_path: Path) -> None:
    run = runs["natural"]
    before = hashlib.sha256((run / "state.sqlite").read_bytes()).hexdigest()
    assert main(["report", str(run), "--out", str(tmp_path / "mine")]) == 0
    assert {p.name for p in (tmp_path / "mine").iterdir()} == {*SONGS, "report.md"}
    assert hashlib.sha256((run / "state.sqlite").read_bytes()).hexdigest() == before


def test_participation_matches_state_db_and_metrics(runs: dict[str, Path]) -> None:
    for run in runs.values():
        data = load_run(run)
        assert data.participation is not None
        # Read-only, as the report reads it: a writable last connection would fold the WAL into the file.
        with closing(Store.read_only(run / "state.sqlite")) as store:
            rows = [(w.worker_id, w.partition, w.rounds_served) for w in store.workers()]
        assert [(p.worker_id, p.partition, p.rounds_served) for p in data.participation] == rows
        assert [p.label for p in data.participation] == ["part-000-of-003", "part-001-of-003", "part-002-of-003"]
        assert sum(p.rounds_served for p in data.participation) == sum(m.participants for m in metrics(run))


def test_round_phases_split_the_open_time_and_add_up_to_the_round(runs: dict[str, Path]) -> None:
    data = load_run(runs["iid"])
    phases = round_phases(data)
    assert list(phases) == ["waiting for workers", "model download (workers' mean)",
                            "local training (workers' mean)", "upload + slowest worker", "aggregation",
                            "evaluation", "checkpoint"]
    for i, r in enumerate(metrics(runs["iid"])):
        assert all(values[i] >= 0 for values in phases.values())
        assert sum(values[i] for values in phases.values()) == pytest.approx(r.seconds, rel=1e-9)
        # The workers' times come from what they reported, kept apart from the coordinator's fields.
        assert phases["local training (workers' mean)"][i] == pytest.approx(r.worker_metrics["train_s"])
        assert phases["aggregation"][i] == r.timings.aggregate


def test_round_phases_keep_open_whole_without_worker_times(runs: dict[str, Path], tmp_path: Path) -> None:
    run = shutil.copytree(runs["iid"], tmp_path / "old")
    records = [r.model_copy(update={"worker_metrics": {"train_loss": 1.0}}) for r in metrics(run)]
    RunDir(run).write_rounds(records)
    phases = round_phases(load_run(run))
    assert phases["open (transfer + training)"] == [r.timings.open for r in records]
    assert "local training (workers' mean)" not in phases


def test_participation_counts_only_the_attempt_that_was_aggregated(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    for wid, partition in (("a", 0), ("b", 1), ("c", 2)):
        store.put_worker(wid, partition, f"host-{wid}")
    for wid in "abc":
        store.record_update(0, 0, wid, 10, {})  # the statistics round: not a training round served
    store.record_update(1, 0, "a", 10, {})  # attempt 0 of round 1 missed its quorum...
    store.record_update(1, 1, "a", 10, {})
    store.record_update(1, 1, "b", 20, {})  # ...attempt 1 went into the aggregate
    store.record_round(record(1, attempts=2, participants=2), ["a", "b"])
    store.record_update(2, 0, "c", 30, {})
    store.record_round(record(2, attempts=1, participants=1), ["c"])
    store.put_worker("d", 2, "host-d", evict="c")  # c died; d took over its partition
    store.record_update(3, 0, "d", 30, {})
    store.record_round(record(3, attempts=1, participants=1), ["d"])
    store.record_update(4, 0, "a", 10, {})  # round 4 is still open
    store.close()

    got = {p.label: (p.rounds_served, p.examples) for p in read_participation(tmp_path / "state.sqlite", 3)}
    assert got == {"part-000-of-003": (1, 10), "part-001-of-003": (1, 20), "part-002-of-003": (1, 30),
                   "worker c (replaced)": (1, 30)}
    # Without the number of workers (no summary or config), names come from the partitions seen.
    labels = [p.label for p in read_participation(tmp_path / "state.sqlite", None)]
    assert labels[:3] == ["part-000-of-003", "part-001-of-003", "part-002-of-003"]


def test_report_of_a_run_in_progress_and_of_one_without_state_db(runs: dict[str, Path], tmp_path: Path) -> None:
    # A run still going has no summary.json yet: labels come from config.toml, finals from the last round.
    going = shutil.copytree(runs["natural"], tmp_path / "a" / "songs")
    (going / "summary.json").unlink()
    # Two runs whose dirs share a name get a folder each.
    bare = shutil.copytree(runs["iid"], tmp_path / "b" / "songs")
    for name in ("state.sqlite", "state.sqlite-wal", "state.sqlite-shm"):
        (bare / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    assert main(["report", str(going), str(bare), "--out", str(out)]) == 0
    for folder in ("songs", "songs-2"):
        for plot in SINGLE:
            check_png(out / folder / plot)
    text = (out / "report.md").read_text()
    data = load_run(going)
    assert data.state == "in progress" and data.label == "songs (natural, 3 workers)"
    assert data.final_accuracy == metrics(going)[-1].accuracy
    assert f"| songs | natural | in progress | 3 | {data.final_accuracy:.4f} |" in text
    assert load_run(bare).participation is None
    assert f"{bare} has no state.sqlite" in text


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: None, "does not exist"),
    (lambda d: d.write_text("x"), "is not a directory"),
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: _metrics(d, ""), "holds no rounds yet"),
    (lambda d: _metrics(d, '{"round": 1, "accuracy": 0.5, "lo'), "line 1 is not a round record: not valid JSON"),
    (lambda d: _metrics(d, '[1, 2]\n'), "line 1 is not a round record: Input should be an object"),
    (lambda d: _metrics(d, _without("accuracy")), "line 1 is not a round record: 'accuracy' field required"),
    (lambda d: _metrics(d, _without("timings")), "line 1 is not a round record: 'timings' field required"),
    (lambda d: _metrics(d, _line(record(1), "timings", {"open": 1.0})), "'timings.wait_workers' field required"),
    (lambda d: _metrics(d, _line(record(1), "seconds", "Infinity")), "'seconds' input should be a finite number"),
    (lambda d: _metrics(d, record(1).model_dump_json() + "\n" + _without("loss")), "line 2 is not a round record"),
])
def test_bad_run_dir_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any,
                                       message: str) -> None:
    run = tmp_path / "run"
    setup(run)
    with pytest.raises(SystemExit) as exc:
        main(["report", str(run)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("fedfleet: error: ") and err.count("\n") == 1 and message in err, err
    assert str(run) in err
    assert not (run / "report").exists()


def _metrics(run: Path, text: str) -> None:
    run.mkdir()
    (run / "metrics.jsonl").write_text(text)


def _line(valid: RoundRecord, key: str, value: Any) -> str:
    """A metrics.jsonl line of ``valid`` with ``key`` set to ``value`` (``...``: left out)."""
    fields = valid.model_dump()
    if value is ...:
        del fields[key]
    else:
        fields[key] = value
    return json.dumps(fields).replace('"Infinity"', "Infinity") + "\n"


def _without(key: str) -> str:
    return _line(record(1), key, ...)


def test_garbled_summary_and_one_bad_run_among_several(runs: dict[str, Path], tmp_path: Path) -> None:
    run = shutil.copytree(runs["iid"], tmp_path / "run")
    (run / "summary.json").write_text('{"state": "fini')
    r = fedfleet("report", str(runs["natural"]), str(run), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("fedfleet: error: ") and "summary.json is not a run summary: not valid JSON" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    # Every run is read before anything is drawn: a bad one leaves no half-written report behind.
    assert not (tmp_path / "report").exists()


def test_plots_of_many_workers_and_one_long_round(tmp_path: Path) -> None:
    # 50 workers (numbers instead of names under the bars, every other one) and a first round 50×
    # longer than the rest (the time axis is cut): the charts still come out whole.
    rounds = [record(i, participants=9, sampled=10, seconds=5.0 if i == 1 else 0.1,
                     worker_metrics={"download_s": 0.01, "train_s": 0.05},
                     timings=RoundTimings(wait_workers=4.9 if i == 1 else 0.0, open=0.07, aggregate=0.01,
                                          evaluate=0.01, checkpoint=0.01)) for i in range(1, 11)]
    people = [WorkerParticipation(f"w{i}", f"part-{i:03d}-of-050", i, "", i % 4, 100) for i in range(50)]
    run = RunData(path=tmp_path, name="many", rounds=rounds, summary=None, partition="iid", workers=50,
                  participation=[*people, WorkerParticipation("gone", "worker gone (replaced)", None, "", 1, 10)])
    check_png(plot_participation(run, tmp_path / "participation.png"))
    check_png(plot_round_time(run, tmp_path / "round_time.png"))
    assert round_phases(run)["waiting for workers"][0] == 4.9


def test_report_of_a_run_whose_model_diverged(tmp_path: Path) -> None:
    # A diverged loss is recorded as unknown (None): the report draws a gap there and writes "-".
    run = tmp_path / "diverged"
    run.mkdir()
    RunDir(run).write_rounds([record(1), record(2, loss=None, worker_metrics={"train_loss": 3.5}),
                              record(3, accuracy=None, loss=None)])
    data = load_run(run)
    assert data.final_accuracy is None and data.final_loss is None and data.state == "in progress"
    assert main(["report", str(run)]) == 0
    check_png(run / "report" / "accuracy_loss.png")
    # Best and mean over the rounds whose score is known, saying how many of the last rounds those were.
    assert "| diverged | - | - | in progress | 3 | - | 0.5000 (round 1) | 0.5000 (2 known of last 3) | - | 0.3 |" \
        in (run / "report" / "report.md").read_text()


# --- differential privacy -----------------------------------------------------------------------------------
DP_SIGMA, DP_CLIP, DP_MAX, DP_DELTA = 1.0, 0.5, 50.0, 1e-5


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run of 3 workers and 3 rounds with --dp central (every worker sampled, σ 1, clip 0.5)."""
    pytest.importorskip("dp_accounting")
    path = tmp_path_factory.mktemp("dp") / "songs-dp"
    r = fedfleet("run", "--workers", "3", "--rounds", "3", "--dp", "central", "--dp-clip", str(DP_CLIP),
                 "--dp-noise-multiplier", str(DP_SIGMA), "--dp-max-epsilon", str(DP_MAX), "--out", str(path),
                 "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return path


def test_report_of_a_dp_run_states_the_mechanism_and_the_epsilon_spent(dp_run: Path) -> None:
    assert main(["report", str(dp_run)]) == 0
    out = dp_run / "report"
    assert {p.name for p in out.iterdir()} == {*SONGS, "privacy.png", "report.md"}
    check_png(out / "privacy.png")
    text = (out / "report.md").read_text()
    assert "privacy.png" in images(text)
    dp = summary(dp_run).dp
    assert dp is not None
    # The accountant's own figure for 3 rounds, as summary.json and the last round recorded it.
    spent = epsilon(1.0, DP_SIGMA, 3, DP_DELTA)
    assert dp.epsilon == pytest.approx(spent) and metrics(dp_run)[-1].dp_epsilon == pytest.approx(spent)
    assert table_rows(text)["songs-dp"]["ε spent (δ)"] == f"{dp.epsilon:.3g} (1e-05)"
    section = text.split("## Differential privacy", 1)[1]
    for line in ("- Mechanism: central differential privacy (DP-FedAvg with a trusted coordinator)",
                 "- Clip norm C: 0.5\n", "- Noise multiplier σ: 1\n", "- δ: 1e-05\n", "- Sampling rate q: 1 (Poisson",
                 f"- ε spent: **{dp.epsilon:.3g}** of --dp-max-epsilon 50 at δ 1e-05, by 3 noised rounds",
                 "- Accountant: rdp: dp-accounting's RdpAccountant"):
        assert line in section, (line, section)
    assert "--dp-seed" not in section  # the noise was not seeded: nothing to warn about


def test_comparison_labels_runs_by_their_epsilon(dp_run: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    plain = runs["iid"]
    assert main(["report", str(dp_run), str(plain), "--out", str(tmp_path)]) == 0
    dp = summary(dp_run).dp
    assert dp is not None
    eps = dp.epsilon
    labels = compare_labels([load_run(dp_run), load_run(plain)])
    # Labelled by every option that differs (the DP ones: what the plain run leaves unset reads "-"), and by ε.
    differing = [k for k, v in summary(dp_run).config.items() if summary(plain).config.get(k) != v]
    assert {"dp", "dp_clip", "dp_noise_multiplier", "dp_max_epsilon"} <= set(differing)
    assert labels[0].startswith("songs-dp (dp=central, dp_clip=0.5, ") and labels[0].endswith(f", ε {eps:.3g})")
    assert labels[1].startswith("songs-iid (dp=none, dp_clip=-, ") and labels[1].endswith(", no DP)")
    assert all(label.count("=") == len(differing) for label in labels)
    text = (tmp_path / "report.md").read_text()
    for label in labels:
        assert f"\n## {label}\n" in text
    rows = table_rows(text)
    assert rows["songs-iid"]["ε spent (δ)"] == "no DP" and rows["songs-dp"]["ε spent (δ)"].startswith(f"{eps:.3g} ")
    check_png(tmp_path / "songs-dp" / "privacy.png")
    assert not (tmp_path / "songs-iid" / "privacy.png").exists()
    # One run with DP: nothing to set its accuracy against ε beside.
    assert not (tmp_path / "compare_privacy.png").exists() and "compare_privacy.png" not in text
    # Runs whose ε does not differ are told apart by their options alone.
    assert compare_labels([load_run(plain), load_run(runs["natural"])]) == ["songs-iid (partition=iid)",
                                                                            "songs-natural (partition=natural)"]


def test_report_of_a_dp_run_in_progress_says_the_epsilon_so_far(dp_run: Path, tmp_path: Path) -> None:
    going = shutil.copytree(dp_run, tmp_path / "going")
    (going / "summary.json").unlink()
    assert main(["report", str(going)]) == 0
    text = (going / "report" / "report.md").read_text()
    so_far = metrics(going)[-1].dp_epsilon
    assert so_far is not None
    assert f"- ε spent so far: **{so_far:.3g}** after round 3 (metrics.jsonl)" in text
    assert table_rows(text)["going"]["ε spent (δ)"] == f"{so_far:.3g}"
    check_png(going / "report" / "privacy.png")


def _private(name: str, sigma: float, target: float | None = None) -> RunData:
    """A finished 4-round run with DP whose epsilon grows by ``1/sigma`` a round (numbers made up)."""
    rounds = [record(i, accuracy=0.4 + 0.02 * i, dp_epsilon=i / sigma) for i in range(1, 5)]
    dp = PrivacySummary(mechanism="central", clip=1.0, noise_multiplier=sigma, target_epsilon=target, delta=1e-6,
                        epsilon=4 / sigma, max_epsilon=None, sample_rate=0.5, denominator=4.0, rounds=4,
                        accountant="rdp", seeded=True)
    s = RunSummary(run_id=name, state="finished", message="", task="songs", partition="iid", workers=8, rounds=4,
                   rounds_planned=4, final_accuracy=0.48, final_loss=1.0, seconds=1.0, parameters=10,
                   model_version=5, config={}, round_timings=[], dp=dp)
    return RunData(path=Path(name), name=name, rounds=rounds, summary=s, partition="iid", workers=8,
                   participation=None, config={"dp": "central", "dp_noise_multiplier": sigma})


def test_plots_and_labels_of_several_dp_runs(tmp_path: Path) -> None:
    a, b = _private("a", 1.0), _private("b", 0.5, target=8.0)
    assert compare_labels([a, b]) == ["a (dp_noise_multiplier=1.0, ε 4)", "b (dp_noise_multiplier=0.5, ε 8)"]
    check_png(plot_compare_privacy([a, b], compare_labels([a, b]), tmp_path / "compare_privacy.png"))
    check_png(plot_privacy(b, tmp_path / "privacy.png"))
    with pytest.raises(StorageError, match="no round records an epsilon spent"):
        plot_privacy(RunData(path=tmp_path, name="plain", rounds=[record(1)], summary=None, partition=None,
                             workers=None, participation=None), tmp_path / "nope.png")
    lines = "\n".join(privacy_lines(b))
    assert "- Noise multiplier σ: 0.5, solved for --dp-target-epsilon 8" in lines
    assert "- ε spent: **8** at δ 1e-06, by 4 noised rounds" in lines
    assert "--dp-seed was set" in lines  # a seeded run's noise is known to whoever knows the seed: said so


@pytest.mark.parametrize("name", ["data", "compare", "plots", "markdown"])
def test_docstring_examples_of_the_report_modules(name: str) -> None:
    # tests/test_doctests.py runs the package's own; its modules' examples run here.
    result = doctest.testmod(importlib.import_module(f"fedfleet.report.{name}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
