"""Per-worker charts (each worker's own validation score and training loss by round, its label mix and
example count) and the confusion matrix of the last scored model.

The per-worker numbers are what the workers reported with their updates (``storage.history``): shown as
the workers', never as the coordinator's measurements. A ``figure_*`` function returns None when the run
has nothing for its chart (no state database, a task without classes), and the report then says so
instead of drawing an empty frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedfleet.report.data import Confusion, RunData, class_names
from fedfleet.report.plots import FULL_NAMES, figure, style, worker_ticks

MAX_MIX_WORKERS = 200  # workers up to which their label mix is drawn, a bar each; beyond, the bars would be hairs
LINES_UP_TO = 12  # workers whose training loss is drawn as a line each; more are drawn as an image
MISSING = "#e8e8e8"  # a round the worker took no part in (or reported nothing for)
NOTES = {  # what the heat map's numbers are: the workers', measured on their own data
    "val_accuracy": "the global model each worker was sent, scored on its own validation split before it trained; "
                    "grey: it took no part that round",
    "train_loss": "the worker's mean loss over its local training that round; grey: it took no part that round",
}


@dataclass(frozen=True)
class WorkerSeries:
    """One series of every worker, as the heat map and the loss chart draw it."""

    metric: str  # "val_accuracy" or "train_loss"
    title: str
    labels: list[str]
    partitions: list[int | None]
    rows: list[list[float | None]]


def worker_series(run: RunData, metric: str) -> WorkerSeries | None:
    """Every worker's ``metric`` by round; None when no worker reported it."""
    pairs = run.worker_rows()
    rows = [h.series.get(metric, []) for _, h in pairs]
    if not any(v is not None for row in rows for v in row):
        return None
    titles = {"val_accuracy": "validation accuracy", "train_loss": "local training loss"}
    return WorkerSeries(metric, titles.get(metric, metric), [p.label for p, _ in pairs],
                        [p.partition for p, _ in pairs], rows)


def heat_series(run: RunData) -> WorkerSeries | None:
    """What the heat map shows: each worker's own validation accuracy, else (a task whose workers do not
    evaluate) its local training loss."""
    return worker_series(run, "val_accuracy") or worker_series(run, "train_loss")


def figure_worker_heatmap(run: RunData) -> Figure | None:
    """Worker × round image of each worker's own score: a skewed partition shows as rows that stay pale."""
    data = heat_series(run)
    if data is None:
        return None
    rounds = run.history.rounds if run.history is not None else []
    grid = np.ma.masked_invalid(np.array([[math.nan if v is None else v for v in row] for row in data.rows],
                                         dtype=float))
    higher_better = data.metric == "val_accuracy"
    cmap = colormaps["viridis" if higher_better else "viridis_r"].with_extremes(bad=MISSING)
    fig = figure(11, min(max(3.8, 2.6 + 0.22 * len(data.rows)), 14))
    fig.suptitle(f"{run.label}: each worker's own {data.title} by round", fontsize=13)
    ax = fig.subplots()
    ax.set_title(NOTES[data.metric], fontsize=9, loc="left")
    image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest" if len(rounds) <= 300 else "antialiased",
                      extent=(min(rounds) - 0.5, max(rounds) + 0.5, len(data.rows) - 0.5, -0.5))
    ax.set_xlabel("round")
    ax.set_ylabel("worker (partition)")
    ax.grid(False)
    worker_ticks(ax, data.labels, data.partitions)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.04)
    bar.set_label(data.metric.replace("_", " ") + (" (higher is better)" if higher_better else " (lower is better)"))
    return fig


def figure_worker_loss(run: RunData) -> Figure | None:
    """Each worker's local training loss by round: a line per worker for a few, their spread for many."""
    data = worker_series(run, "train_loss")
    if data is None:
        return None
    rounds = run.history.rounds if run.history is not None else []
    fig = figure(11, 5.0)
    fig.suptitle(f"{run.label}: local training loss per worker", fontsize=13)
    ax = fig.subplots()
    if len(data.rows) <= LINES_UP_TO:
        for label, row in zip(data.labels, data.rows, strict=True):
            # A worker sampled in some rounds only: join the rounds it trained in, a point at each.
            points = [(r, v) for r, v in zip(rounds, row, strict=True) if v is not None]
            ax.plot([r for r, _ in points], [v for _, v in points], marker="o", markersize=3, linewidth=1.2,
                    label=label)
    else:
        _loss_spread(ax, rounds, data.rows)
    mean = [r.worker_metrics.get("train_loss") for r in run.rounds]
    if any(v is not None for v in mean):
        ax.plot([r.round for r in run.rounds], [math.nan if v is None else v for v in mean], color="black",
                linestyle="--", linewidth=1.5, label="run's mean (weighted by examples)")
    style(ax, "", "round", "training loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Below the chart, not beside it: beside, the legend's top row ran into a long title.
    fig.legend(loc="outside lower center", ncols=min(len(data.rows) + 1, 5), fontsize=8, frameon=False)
    return fig


def _loss_spread(ax: Axes, rounds: Sequence[int], rows: Sequence[Sequence[float | None]]) -> None:
    """Many workers: the lowest to highest loss and the middle half of them, round by round."""
    columns: list[list[float]] = [[v for row in rows if (v := row[i]) is not None] for i in range(len(rounds))]
    kept = [(r, np.percentile(np.array(c), [0, 25, 50, 75, 100])) for r, c in zip(rounds, columns, strict=True) if c]
    xs = [r for r, _ in kept]
    q = np.array([p for _, p in kept])
    ax.fill_between(xs, q[:, 0], q[:, 4], color="#4c78a8", alpha=0.15, linewidth=0,
                    label="workers: lowest to highest")
    ax.fill_between(xs, q[:, 1], q[:, 3], color="#4c78a8", alpha=0.35, linewidth=0,
                    label="workers: middle half")
    ax.plot(xs, q[:, 2], color="#2b4a6f", linewidth=1.2, label="workers: median")


@dataclass(frozen=True)
class LabelMix:
    labels: list[str]
    examples: list[int | None]  # examples each worker's latest update trained on
    counts: list[list[int]] | None  # per worker, examples per class (0 where it sent none); None if nobody sent any
    classes: list[str]


def label_mix(run: RunData) -> LabelMix | None:
    """Each worker's examples and label counts, as its latest update reported them; None without workers."""
    pairs = run.worker_rows()
    if not pairs:
        return None
    sent = [h.label_counts for _, h in pairs]
    width = max((len(c) for c in sent if c), default=0)
    counts = [list(c or []) + [0] * (width - len(c or [])) for c in sent] if width else None
    return LabelMix([p.label for p, _ in pairs], [h.examples for _, h in pairs], counts, class_names(run, width))


def figure_worker_data(run: RunData) -> Figure | None:
    """Each worker's label mix as stacked bars of its examples per class (left: counts, so a bar's length
    is its example count; right: shares, so that a small worker's skew shows too)."""
    mix = label_mix(run)
    if mix is None or len(mix.labels) > MAX_MIX_WORKERS:
        return None
    n = len(mix.labels)
    fig = figure(11, min(max(3.8, 2.4 + 0.3 * n), 16))
    fig.suptitle(f"{run.label}: each worker's data (as its latest update reported)", fontsize=13)
    positions = np.arange(n)
    names = [_short(label, n) for label in mix.labels]
    if mix.counts is None:
        ax = fig.subplots()
        bars = ax.barh(positions, [e or 0 for e in mix.examples], color="#4c78a8")
        ax.bar_label(bars, [f"{e:,}" if e is not None else "-" for e in mix.examples], fontsize=8, padding=2)
        style(ax, "Examples per worker (no label counts reported)", "examples", "worker")
        _rows(ax, positions, names)
        return fig
    counts_ax, share_ax = fig.subplots(1, 2, sharey=True)
    colours = _class_colours(len(mix.classes))
    left = np.zeros(n)
    share_left = np.zeros(n)
    totals = np.array([sum(c) for c in mix.counts], dtype=float)
    for k, name in enumerate(mix.classes):
        column = np.array([c[k] for c in mix.counts], dtype=float)
        counts_ax.barh(positions, column, left=left, color=colours[k], label=name)
        share = np.divide(column, totals, out=np.zeros(n), where=totals > 0)
        share_ax.barh(positions, share, left=share_left, color=colours[k])
        left += column
        share_left += share
    examples = [e if e is not None else int(t) for e, t in zip(mix.examples, totals, strict=True)]
    for y, (x, e) in enumerate(zip(left, examples, strict=True)):
        counts_ax.text(x, y, f" {e:,}", va="center", fontsize=8)
    counts_ax.set_xlim(0, max(left.max(), 1) * 1.15)  # room for the count written after each bar
    style(counts_ax, "Examples per class", "training examples", "worker")
    style(share_ax, "Label mix", "share of the worker's examples", "")
    share_ax.set_xlim(0, 1)
    share_ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    _rows(counts_ax, positions, names)
    fig.legend(loc="outside lower center", ncols=min(len(mix.classes), 6), fontsize=9, frameon=False,
               title="class")
    return fig


def _short(label: str, workers: int) -> str:
    """A partition's name in full for a few workers, its number for many (part-003-of-050 -> 003)."""
    if workers <= FULL_NAMES or not label.startswith("part-"):
        return label
    return label.split("-")[1]


def _rows(ax: Axes, positions: np.ndarray, names: list[str]) -> None:
    step = max(1, math.ceil(len(names) / 50))
    ax.set_yticks(positions[::step], names[::step], fontsize=8)
    ax.invert_yaxis()  # the first partition on top, as in a table
    ax.grid(False, axis="y")


def _class_colours(count: int) -> list[tuple[float, float, float, float]]:
    palette = colormaps["tab10" if count <= 10 else "tab20" if count <= 20 else "viridis"]
    if count <= 20:
        return [palette(k) for k in range(count)]
    return [palette(k / max(count - 1, 1)) for k in range(count)]


def figure_confusion(run: RunData, confusion: Confusion) -> Figure:
    """True × predicted counts on the held-out test set; the colour is each count's share of its true class
    (the row), so that a rare class's mistakes show as clearly as a common one's."""
    k = len(confusion.classes)
    counts = np.array(confusion.counts, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = min(3.5 + 0.45 * k, 14)
    fig = figure(max(side + 2.2, 8), side)  # room for the colour bar and the long class names
    fig.suptitle(f"{run.label}: confusion matrix, round {confusion.round}", fontsize=12)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:  # beyond that the numbers would not fit their cells
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(counts[i, j]):,}", ha="center", va="center", fontsize=9 if k <= 10 else 7,
                        color="white" if share[i, j] > 0.5 else "black")
    ticks = range(k)
    ax.set_xticks(ticks, confusion.classes, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(ticks, confusion.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("held-out test set: counts; colour: share of the true class", fontsize=10, loc="left")
    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("share of the row (recall on the diagonal)")
    return fig
