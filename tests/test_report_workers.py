"""`fedfleet report`'s charts of who took part and of each worker's own learning, and the confusion matrix, on real
runs: a long one (160 rounds, 6 workers, half sampled) and a skewed one (dirichlet:0.3). The numbers drawn are
checked against the state database and metrics.jsonl, read here on their own."""

from __future__ import annotations

import math
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage, imread

from conftest import run_fedfleet as fedfleet
from fedfleet.report import (
    MAX_BARS,
    figure_accuracy_loss,
    figure_confusion,
    figure_participation,
    figure_round_time,
    figure_worker_data,
    figure_worker_heatmap,
    figure_worker_loss,
    last_confusion,
    load_run,
    write_report,
)
from fedfleet.storage.records import RoundTimings
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import Store, UpdateRow
from test_report import RunData, check_png, record, table

WORKERS = 6


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 rounds of the null task, 6 workers, 3 sampled a round: what drew stripes before."""
    path = tmp_path_factory.mktemp("long") / "long"
    r = fedfleet("run", "--task", "null", "--workers", str(WORKERS), "--rounds", "160", "--fraction", "0.5",
                 "--out", str(path), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return path


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The song task with label skew, 4 workers, 2 sampled a round, 6 rounds: uneven workers to show."""
    path = tmp_path_factory.mktemp("skewed") / "skewed"
    r = fedfleet("run", "--workers", "4", "--rounds", "6", "--fraction", "0.5", "--partition", "dirichlet:0.3",
                 "--out", str(path), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    return path


def updates(run: Path) -> tuple[list[str], list[UpdateRow]]:
    """The workers in partition order and the updates that went into a round, straight from the database."""
    with closing(Store.read_only(run / "state.sqlite")) as store:
        return [w.worker_id for w in store.workers()], store.updates()


def by_worker(run: Path, metric: str) -> list[list[float]]:
    """Each worker's ``metric`` by round, NaN where it sent none."""
    ids, rows = updates(run)
    rounds = [r.round for r in RunDir(run).read_rounds()]
    grid = [[math.nan] * len(rounds) for _ in ids]
    for row in rows:
        if metric in row.metrics:
            grid[ids.index(row.worker_id)][rounds.index(row.round)] = row.metrics[metric]
    return grid


def image_of(fig: Figure) -> AxesImage:
    (image,) = [im for ax in fig.axes for im in ax.images]
    return image


def drawn(fig: Figure, path: Path) -> None:
    """Saved as the report saves it, and a readable chart."""
    fig.savefig(path, format="png")
    check_png(path)


# --- participation and time per round of a long run ---------------------------------------------------------
def test_participation_of_160_rounds_is_a_worker_by_round_image(long_run: Path, tmp_path: Path) -> None:
    run = load_run(long_run)
    fig = figure_participation(run)
    drawn(fig, tmp_path / "participation.png")
    ids, rows = updates(long_run)
    served = np.zeros((WORKERS, 160))
    for row in rows:
        served[ids.index(row.worker_id), row.round - 1] = 1
    image = image_of(fig)
    assert np.array_equal(np.asarray(image.get_array()), served)
    bars, _image_ax, counts = fig.axes
    # Rounds served per worker: one bar each, as many as the image's rows hold.
    assert [p.get_height() for p in bars.patches] == list(served.sum(axis=1))
    # Workers per round as lines, not 160 bars; the axis ends at the 6 workers, not above.
    assert not counts.patches and not _image_ax.patches
    low, high = counts.get_ylim()
    assert low == 0 and WORKERS <= high < WORKERS + 0.5
    ticks = [t for t in counts.get_yticks() if low <= t <= high]
    assert max(ticks) == WORKERS
    (sampled,) = counts.lines
    assert list(sampled.get_ydata()) == [r.sampled for r in run.rounds]


def test_round_time_of_160_rounds_draws_a_bar_per_block(long_run: Path, tmp_path: Path) -> None:
    run = load_run(long_run)
    fig = figure_round_time(run)
    drawn(fig, tmp_path / "round_time.png")
    ax = fig.axes[0]
    phases = ax.containers
    assert all(len(c) == 80 <= MAX_BARS for c in phases)
    # Each bar is the mean of its 2 rounds: the bars' heights times 2 add up to the rounds' seconds.
    total = sum(bar.get_height() for c in phases for bar in c) * 2
    assert total == pytest.approx(sum(r.seconds for r in run.rounds), rel=1e-6)
    assert "mean of 2 rounds" in ax.get_xlabel()


def test_round_time_labels_of_cut_bars_stay_clear_of_the_title(tmp_path: Path) -> None:
    # Rounds 1 and 7 are 50x the others: the axis is cut and their totals are written on them.
    rounds = [record(i, seconds=5.0 if i in (1, 7) else 0.1,
                     timings=RoundTimings(wait_workers=4.9 if i in (1, 7) else 0.0, open=0.07, aggregate=0.01,
                                          evaluate=0.01, checkpoint=0.01)) for i in range(1, 9)]
    fig = figure_round_time(RunData(path=tmp_path, name="slow-start", rounds=rounds, summary=None, partition="iid",
                                    workers=3, participation=None))
    drawn(fig, tmp_path / "round_time.png")
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text().endswith(" s")]
    assert [t.get_text() for t in labels] == ["5.00 s", "5.00 s"]
    title = fig.get_suptitle()
    assert title.startswith("slow-start")
    title_box = next(t for t in fig.texts if t.get_text() == title).get_window_extent(renderer)
    for label in labels:
        box = label.get_bbox_patch().get_window_extent(renderer)  # type: ignore[union-attr]
        assert not box.overlaps(title_box)
        assert box.y1 <= ax.bbox.y1 + 1  # inside the axes, at the cut


# --- each worker's own learning --------------------------------------------------------------------------
def test_heat_map_is_each_workers_own_validation_accuracy(skewed: Path, tmp_path: Path) -> None:
    fig = figure_worker_heatmap(load_run(skewed))
    assert fig is not None
    drawn(fig, tmp_path / "heat.png")
    expected = np.array(by_worker(skewed, "val_accuracy"))
    got = np.ma.filled(np.ma.asarray(image_of(fig).get_array()).astype(float), np.nan)
    assert np.array_equal(np.isnan(got), np.isnan(expected))  # grey where the worker took no part
    assert np.allclose(got[~np.isnan(got)], expected[~np.isnan(expected)])
    # Two of four sampled: every round has workers that took no part, and every worker shows somewhere.
    assert np.isnan(expected).any() and (~np.isnan(expected)).any(axis=1).all()
    assert "validation accuracy" in fig.get_suptitle()


def test_accuracy_chart_has_the_workers_spread_band(skewed: Path, tmp_path: Path) -> None:
    fig = figure_accuracy_loss(load_run(skewed))
    drawn(fig, tmp_path / "accuracy.png")
    (band,) = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    points = {(round(x, 6), round(y, 6)) for x, y in band.get_paths()[0].vertices}
    for r in RunDir(skewed).read_rounds():
        assert r.fed_accuracy_min is not None and r.fed_accuracy_max is not None
        assert (r.round, round(r.fed_accuracy_min, 6)) in points and (r.round, round(r.fed_accuracy_max, 6)) in points
    assert "workers' own validation accuracy, lowest to highest" in [t.get_text() for t in fig.legends[0].texts]


def test_training_loss_is_a_line_per_worker(skewed: Path, tmp_path: Path) -> None:
    fig = figure_worker_loss(load_run(skewed))
    assert fig is not None
    drawn(fig, tmp_path / "loss.png")
    lines = fig.axes[0].lines
    for line, row in zip(lines, by_worker(skewed, "train_loss"), strict=False):
        assert list(line.get_ydata()) == pytest.approx([v for v in row if not math.isnan(v)])
    assert len(lines) == 4 + 1  # four workers and the run's mean


def test_label_mix_and_examples_per_worker(skewed: Path, tmp_path: Path) -> None:
    run = load_run(skewed)
    fig = figure_worker_data(run)
    assert fig is not None
    drawn(fig, tmp_path / "data.png")
    ids, rows = updates(skewed)
    latest = {row.worker_id: row for row in rows}  # by round: the last is the latest
    counts = [[int(latest[w].metrics[f"label_count_{k}"]) for k in range(3)] for w in ids]
    assert all(sum(c) > 0 for c in counts)
    # Left: stacked bars, a segment per class, each as long as the worker's count of that class.
    left = fig.axes[0]
    widths = [p.get_width() for p in left.patches]
    assert widths == [counts[w][k] for k in range(3) for w in range(4)]
    classes = ["1960s-70s", "1980s-90s", "2000s-10s"]  # the songs task's eras, from the confusion record
    assert [t.get_text() for t in fig.legends[0].texts] == classes
    # report.md: each worker's examples and label mix (largest share first), worked out here.
    write_report([skewed], tmp_path / "out")
    rows_md = table((tmp_path / "out" / "report.md").read_text(), "worker")
    for p, wid, c in zip(run.participation or [], ids, counts, strict=True):
        cell = rows_md[p.label]
        assert cell["examples"] == f"{latest[wid].num_examples:,}"
        assert cell["rounds served"] == str(sum(row.worker_id == wid for row in rows))
        order = sorted(range(3), key=lambda k: (-c[k], k))
        assert cell["label mix"] == ", ".join(f"{classes[k]} {c[k] / sum(c):.0%}" for k in order)
        own = [v for v in by_worker(skewed, "val_accuracy")[ids.index(wid)] if not math.isnan(v)]
        assert cell["val accuracy (last)"] == f"{own[-1]:.4f}"


def test_many_workers_get_numbers_and_a_spread(tmp_path: Path) -> None:
    # 40 workers: partition numbers instead of names, the loss as a spread instead of 40 lines, no table.
    run = tmp_path / "many"
    run.mkdir()
    N = 40
    store = Store(run / "state.sqlite")
    for w in range(N):
        store.put_worker(f"w{w:02d}", w, f"host-{w}")
    records = []
    for rnd in range(1, 6):
        for w in range(N):
            store.record_update(rnd, 0, f"w{w:02d}", 100 + w, {"val_accuracy": 0.5 + w / 100, "train_loss": 1 - w / 40,
                                                               "label_count_0": 90, "label_count_1": 10 + w})
        records.append(record(rnd, participants=N, sampled=N))
        store.record_round(records[-1], [f"w{w:02d}" for w in range(N)])
    store.close()
    RunDir(run).write_rounds(records)
    data = load_run(run)
    loss = figure_worker_loss(data)
    assert loss is not None
    drawn(loss, tmp_path / "loss.png")
    assert len([c for c in loss.axes[0].collections if isinstance(c, PolyCollection)]) == 2
    heat = figure_worker_heatmap(data)
    assert heat is not None
    drawn(heat, tmp_path / "heat.png")
    assert [t.get_text() for t in heat.axes[0].get_yticklabels()][:3] == ["000", "001", "002"]
    mix = figure_worker_data(data)
    assert mix is not None
    drawn(mix, tmp_path / "mix.png")
    assert [t.get_text() for t in mix.legends[0].texts] == ["class 0", "class 1"]  # no confusion record: no names
    write_report([run])
    assert f"{N} workers: too many for a table, see the charts." in (run / "report" / "report.md").read_text()


# --- the confusion matrix ----------------------------------------------------------------------------------
def test_confusion_matrix_and_per_class_recall(skewed: Path, tmp_path: Path) -> None:
    last = RunDir(skewed).read_rounds()[-1]
    assert last.confusion is not None
    counts = np.array(last.confusion.counts, dtype=float)
    confusion = last_confusion(load_run(skewed))
    assert confusion is not None and confusion.round == last.round
    fig = figure_confusion(load_run(skewed), confusion)
    # Colour: each count's share of its true class; text: the counts.
    assert np.allclose(np.asarray(image_of(fig).get_array()), counts / counts.sum(axis=1, keepdims=True))
    assert [t.get_text() for t in fig.axes[0].texts] == [f"{int(n):,}" for n in counts.flatten()]
    write_report([skewed], tmp_path)
    check_png(tmp_path / "confusion.png")
    pixels = imread(tmp_path / "confusion.png")
    assert pixels.shape[0] < pixels.shape[1]  # a compact square matrix with its colour bar beside it
    recall = table((tmp_path / "report.md").read_text(), "class")
    assert list(recall) == last.confusion.classes
    for i, name in enumerate(last.confusion.classes):
        row = last.confusion.counts[i]
        assert recall[name]["test examples"] == f"{sum(row):,}"
        assert recall[name]["predicted right"] == f"{row[i]:,}"
        assert recall[name]["recall"] == f"{row[i] / sum(row):.4f}"


def test_a_task_without_classes_has_no_confusion_matrix(long_run: Path, tmp_path: Path) -> None:
    assert last_confusion(load_run(long_run)) is None
    write_report([long_run], tmp_path)
    assert not (tmp_path / "confusion.png").exists()
    assert "Confusion" not in (tmp_path / "report.md").read_text()


def test_a_large_fleet_sampling_a_few(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 workers, 10 a round for 4 rounds: a histogram of rounds served instead of 300 hairline bars, the image
    # rows of the workers that took part, and the workers axis up to the most sampled, saying of how many.
    run = tmp_path / "fleet"
    run.mkdir()
    store = Store(run / "state.sqlite")
    for w in range(300):
        store.put_worker(f"w{w:03d}", w, f"host-{w}")
    records = []
    for rnd in range(1, 5):
        chosen = [f"w{(rnd * 37 + 13 * i) % 300:03d}" for i in range(10)]
        for wid in chosen:
            store.record_update(rnd, 0, wid, 10, {"val_accuracy": 0.5})
        records.append(record(rnd, participants=10, sampled=10))
        store.record_round(records[-1], chosen)
    store.close()
    RunDir(run).write_rounds(records)
    # Past MAX_HISTORY workers only those that served get a history (a million would not fit): lowered here.
    monkeypatch.setattr("fedfleet.report.data.MAX_HISTORY", 100)
    data = load_run(run)
    assert data.history is not None
    took_part = {row.worker_id for row in updates(run)[1]}
    assert {h.worker_id for h in data.history.workers} == took_part and len(took_part) == 40
    fig = figure_participation(data)
    drawn(fig, tmp_path / "participation.png")
    bars, _image_ax, counts = fig.axes
    assert bars.get_title(loc="left") == "Workers by rounds served"
    assert [p.get_height() for p in bars.patches] == [260, 40]  # 260 served no round, 40 served one
    assert np.asarray(image_of(fig).get_array()).shape == (40, 4)
    assert counts.get_ylabel() == "workers (of 300)" and counts.get_yticks()[-1] == 10
    heat = figure_worker_heatmap(data)
    assert heat is not None
    assert np.asarray(image_of(heat).get_array()).shape == (40, 4)
    # With every worker's history, 300 bars of examples and label mix would be hairs: not drawn, and said so.
    monkeypatch.undo()
    assert figure_worker_data(load_run(run)) is None
    write_report([run])
    assert "Each worker's data (examples, label mix) is drawn for up to 200 workers." in \
        (run / "report" / "report.md").read_text()


def test_accuracy_chart_draws_the_coordinators_validation_scores_with_server_val(skewed: Path,
                                                                                  tmp_path: Path) -> None:
    label = "global model, the coordinator's validation examples (--server-val)"
    assert label not in [t.get_text() for t in figure_accuracy_loss(load_run(skewed)).legends[0].texts]
    path = tmp_path / "val"
    r = fedfleet("run", "--workers", "2", "--rounds", "3", "--server-val", "2000", "--out", str(path), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    fig = figure_accuracy_loss(load_run(path))
    drawn(fig, tmp_path / "val.png")
    assert label in [t.get_text() for t in fig.legends[0].texts]
    records = RunDir(path).read_rounds()
    for ax, key in zip(fig.axes, ("val_accuracy", "val_loss"), strict=True):
        (line,) = [ln for ln in ax.lines if ln.get_label() == label]
        assert list(line.get_ydata()) == pytest.approx([getattr(rec, key) for rec in records])
