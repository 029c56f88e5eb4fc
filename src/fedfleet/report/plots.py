"""The run's own charts: accuracy and loss, time per round, participation, privacy, and the comparisons.

Each chart is a ``figure_*`` function that returns a ``matplotlib.figure.Figure`` (tests look at its
artists) and a ``plot_*`` one that saves it. Figures are drawn on an Agg canvas rather than with
``pyplot``: no global backend or figure registry, nothing to close, and no display needed.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from fedfleet.errors import StorageError
from fedfleet.report.compare import compare_labels
from fedfleet.report.data import RunData, WorkerParticipation, accuracies, round_phases

DPI = 110
# One colour per phase of a round, in the order the phases happen; the three parts of the open round
# share a hue so that the eye reads them as one phase split three ways.
PHASE_COLOURS = {
    "waiting for workers": "#b0b0b0",
    "open (transfer + training)": "#4c78a8",
    "model download (workers' mean)": "#9ecae9",
    "local training (workers' mean)": "#4c78a8",
    "upload + slowest worker": "#2b4a6f",
    "aggregation": "#f58518",
    "evaluation": "#54a24b",
    "checkpoint": "#b279a2",
}
SERVED = "#4c78a8"
CUT_FACTOR = 4.0  # the round-time axis is cut at this many median rounds when a round is longer
FULL_NAMES = 12  # workers up to which charts write out partition names
MAX_WORKER_BARS = 200  # workers up to which rounds served is a bar per worker; beyond, a histogram
MAX_BARS = 80  # more rounds than this are drawn as one bar per block of rounds: single ones would be stripes


# --- shared pieces -------------------------------------------------------------------------------
def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=12, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def save(fig: Figure, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from None
    return path


def values(scores: Sequence[float | None]) -> list[float]:
    """Scores to plot: an unknown one (a diverged model's) as NaN, a gap in the line."""
    return [math.nan if v is None else v for v in scores]


def g(value: float) -> str:
    """Epsilon, delta and the mechanism's settings as people write them: 2.31, 0.5, 1e-05."""
    return f"{value:.3g}"


def worker_ticks(ax: Axes, labels: Sequence[str], partitions: Sequence[int | None], most: int = 40) -> None:
    """Name the rows of a worker × round image: partition names for a few workers, their numbers for many
    (every few of them beyond ``most``, so that they do not overlap)."""
    many = len(labels) > FULL_NAMES
    shown = [label if not many else f"{p:03d}" if p is not None else "repl." for label, p in
             zip(labels, partitions, strict=True)]
    step = max(1, math.ceil(len(labels) / most))
    ax.set_yticks(range(0, len(labels), step), shown[::step], fontsize=8 if not many else 7)


def block_size(rounds: int) -> int:
    """Rounds per bar: 1 up to MAX_BARS rounds, more beyond, so that bars stay wider than a line.

    >>> block_size(80), block_size(81), block_size(400)
    (1, 2, 5)
    """
    return max(1, math.ceil(rounds / MAX_BARS))


def count_ticks(count: int) -> list[int]:
    """Ticks of a workers axis: whole numbers, at most about six, the last one the worker count itself.

    >>> count_ticks(3), count_ticks(6), count_ticks(7), count_ticks(50)
    ([0, 1, 2, 3], [0, 2, 4, 6], [0, 2, 4, 7], [0, 10, 20, 30, 40, 50])
    """
    step = max(1, math.ceil(count / 5))
    ticks = list(range(0, count, step))
    if len(ticks) > 1 and count - ticks[-1] < step:
        ticks.pop()  # too close to the count to label both
    return [*ticks, count]


def blocks(xs: Sequence[int], series: Sequence[float], size: int) -> tuple[list[float], list[float]]:
    """The centre round and the mean of each block of ``size`` rounds.

    >>> blocks([1, 2, 3, 4, 5], [1.0, 3.0, 2.0, 2.0, 5.0], 2)
    ([1.5, 3.5, 5.0], [2.0, 2.0, 5.0])
    """
    centres, means = [], []
    for i in range(0, len(xs), size):
        part = series[i:i + size]
        centres.append((xs[i] + xs[min(i + size, len(xs)) - 1]) / 2)
        means.append(math.fsum(part) / len(part))
    return centres, means


# --- one run -------------------------------------------------------------------------------------
def figure_accuracy_loss(run: RunData) -> Figure:
    """Test accuracy and loss of the global model by round (and on the coordinator's validation examples with
    --server-val), next to the workers' local training ones, with the spread of the workers' own validation
    accuracy as a band."""
    fig = figure(11, 4.8)
    fig.suptitle(f"{run.label}: accuracy and loss by round", fontsize=13)
    xs = [r.round for r in run.rounds]
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("accuracy", "loss"), ("Accuracy", "Loss"), strict=True):
        test = [r.accuracy if key == "accuracy" else r.loss for r in run.rounds]
        if any(v is not None for v in test) or not run.rounds:
            ax.plot(xs, values(test), marker="o", markersize=4, label="global model, held-out test set")
        val = [r.val_accuracy if key == "accuracy" else r.val_loss for r in run.rounds]
        if any(v is not None for v in val):  # --server-val: what the run's choices are made on
            ax.plot(xs, values(val), marker="^", markersize=4, linestyle="-.",
                    label="global model, the coordinator's validation examples (--server-val)")
        fed = [r.fed_accuracy if key == "accuracy" else r.fed_loss for r in run.rounds]
        if all(v is None for v in test) and any(v is not None for v in fed):
            # No held-out set (a sites run without --test-data): the workers' scores are the run's. Each is of
            # the model a worker was sent that round, on its own validation split, before it trained.
            ax.plot(xs, values(fed), marker="D", markersize=4,
                    label="global model sent that round, workers' validation splits (federated evaluation)")
        if key == "accuracy":
            _spread_band(ax, run)
        local = [r.worker_metrics.get(f"train_{key}") for r in run.rounds]
        if all(v is not None for v in local):
            ax.plot(xs, values(local), marker="s", markersize=3, linestyle="--", alpha=0.8,
                    label="workers' local training (mean)")
        style(ax, name, "round", name.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Both panels show the same series (the band only on the left): one legend below them, covering no point.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return fig


def _spread_band(ax: Axes, run: RunData) -> None:
    """The lowest to highest accuracy any worker measured that round (the global model sent to it, on its
    own validation split): how unevenly the model serves the workers, which a mean hides."""
    low = [r.fed_accuracy_min for r in run.rounds]
    high = [r.fed_accuracy_max for r in run.rounds]
    if all(v is None for v in low) or all(v is None for v in high):
        return
    ax.fill_between([r.round for r in run.rounds], values(low), values(high), color="#54a24b", alpha=0.2,
                    linewidth=0, label="workers' own validation accuracy, lowest to highest")


def plot_accuracy_loss(run: RunData, path: Path) -> Path:
    return save(figure_accuracy_loss(run), path)


def figure_round_time(run: RunData) -> Figure:
    """Seconds per round as stacked bars, one segment per phase; a bar per block of rounds in a long run."""
    phases = round_phases(run)
    rounds = [r.round for r in run.rounds]
    size = block_size(len(rounds))
    xs = blocks(rounds, [0.0] * len(rounds), size)[0]
    fig = figure(11, 5.0)
    # The title above the figure, not the axes: a cut bar's label at the top of the axes cannot reach it.
    fig.suptitle(f"{run.label}: time per round by phase", fontsize=13)
    ax = fig.subplots()
    bottom = [0.0] * len(xs)
    for label, series in phases.items():
        heights = blocks(rounds, series, size)[1]
        ax.bar(xs, heights, bottom=bottom, width=0.8 * size, label=label, color=PHASE_COLOURS[label])
        bottom = [b + v for b, v in zip(bottom, heights, strict=True)]
    xlabel = "round" if size == 1 else f"round (each bar: the mean of {size} rounds)"
    style(ax, "", xlabel, "seconds")
    ax.set_xlim(min(rounds) - 0.7 * size, max(rounds) + 0.7 * size)
    _cut_long_bars(ax, xs, bottom)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False, axis="x")
    # Phases read bottom to top in the bars; the legend lists them in the order they happen.
    handles, labels = ax.get_legend_handles_labels()
    # Below the chart: beside it, the legend's top row could run into a long title.
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    return fig


def _cut_long_bars(ax: Axes, xs: Sequence[float], totals: Sequence[float]) -> None:
    """One long round (typically the first, waiting for workers to start) would flatten all the others
    into slivers: cut the axis at a few typical rounds and write the cut bars' totals inside the axes."""
    typical = statistics.median(totals)
    if typical <= 0 or max(totals) <= CUT_FACTOR * typical:
        return
    top = CUT_FACTOR * typical
    ax.set_ylim(0, top)
    for x, total in zip(xs, totals, strict=True):
        if total > top:
            ax.annotate(f"{total:.2f} s", (x, top), xytext=(0, -4), textcoords="offset points", ha="center",
                        va="top", fontsize=8, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})


def plot_round_time(run: RunData, path: Path) -> Path:
    return save(figure_round_time(run), path)


def figure_participation(run: RunData) -> Figure:
    """Rounds served per worker (left); which worker's update went into which round, as a worker × round
    image (top right), and how many answered against how many were sampled, by round (bottom right). An
    image and lines stay readable with hundreds of rounds, where a bar per round became stripes."""
    fig = figure(11, 5.4)
    fig.suptitle(f"{run.label}: participation", fontsize=13)
    grid = fig.add_gridspec(2, 2, width_ratios=[2, 3], height_ratios=[3, 2])
    left = fig.add_subplot(grid[:, 0])
    image = fig.add_subplot(grid[0, 1])
    counts = fig.add_subplot(grid[1, 1], sharex=image)
    _served_bars(left, run)
    _served_image(image, run)
    _workers_per_round(counts, run)
    handles = [*left.get_legend_handles_labels()[0], Patch(color=SERVED, label="update aggregated"),
               *counts.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    return fig


def _served_bars(ax: Axes, run: RunData) -> None:
    people = run.participation or []
    count = run.workers or len(people)
    many = len(people) > FULL_NAMES
    xlabel = f"worker, by partition number (part-NNN-of-{count:03d})" if many else "worker (partition)"
    style(ax, "Rounds served per worker", xlabel, "rounds")
    ax.grid(False, axis="x")
    if not people:
        _no_state(ax)
        return
    if len(people) > MAX_WORKER_BARS:
        _served_histogram(ax, run, people)
        return
    positions = list(range(len(people)))
    bars = ax.bar(positions, [p.rounds_served for p in people], color=SERVED, width=0.7)
    if not many:
        ax.bar_label(bars, fontsize=8, padding=2)
    # Full partition names do not fit under more than a dozen bars: show their numbers then (the axis label
    # says how to read them), and only every few of them beyond about forty.
    labels = [p.label if not many else f"{p.partition:03d}" if p.partition is not None
              else f"{p.worker_id[:4]} repl." for p in people]
    step = max(1, math.ceil(len(people) / 40))
    ax.set_xticks(positions[::step], labels[::step], fontsize=8, rotation=90 if many else 30,
                  ha="center" if many else "right")
    ax.axhline(len(run.rounds), color="#e45756", linestyle="--", linewidth=1,
               label=f"rounds completed ({len(run.rounds)})")
    ax.set_ylim(0, len(run.rounds) * 1.1)  # room for the bars' labels above a worker that served every round
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _served_histogram(ax: Axes, run: RunData, people: Sequence[WorkerParticipation]) -> None:
    """Thousands of workers: how many workers served each number of rounds (a bar per worker would be a hair)."""
    served = Counter(p.rounds_served for p in people)
    xs = sorted(served)
    bars = ax.bar(xs, [served[x] for x in xs], color=SERVED, width=0.8)
    if len(xs) <= 30:
        ax.bar_label(bars, fontsize=8, padding=2)
    style(ax, "Workers by rounds served", f"rounds served (of {len(run.rounds)})", "workers")
    ax.grid(False, axis="x")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _no_state(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no state.sqlite in the run dir", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _served_image(ax: Axes, run: RunData) -> None:
    people = run.participation or []
    rounds = [r.round for r in run.rounds]
    style(ax, "Updates aggregated, worker by round", "", "worker")
    ax.grid(False)
    ax.tick_params(labelbottom=False)  # the rounds are numbered once, under the chart below it
    if not people:
        _no_state(ax)
        return
    if len(people) > MAX_WORKER_BARS:
        # Thousands of workers, a few sampled: rows for those that took part, or the image is all grey.
        people = [p for p in people if run.served.get(p.worker_id)]
        ax.set_title(f"Updates aggregated, by round: the {len(people):,} workers that took part", fontsize=12,
                     loc="left")
        if not people:
            return
    grid = [[1.0 if r in run.served.get(p.worker_id, ()) else 0.0 for r in rounds] for p in people]
    # More rounds or workers than pixels: averaging neighbours keeps a part-time worker mid-blue, not a
    # moiré of whichever cells the resampling happened to hit.
    dense = len(rounds) > 300 or len(people) > 300
    ax.imshow(grid, aspect="auto", cmap="Blues" if dense else ListedColormap(["#f0f0f0", SERVED]),
              vmin=0, vmax=1, interpolation="antialiased" if dense else "nearest",
              extent=(min(rounds) - 0.5, max(rounds) + 0.5, len(people) - 0.5, -0.5))
    worker_ticks(ax, [p.label for p in people], [p.partition for p in people], most=12)


def _workers_per_round(ax: Axes, run: RunData) -> None:
    xs = [r.round for r in run.rounds]
    count = run.workers or len(run.participation or []) or max(r.sampled for r in run.rounds)
    ax.step(xs, [r.sampled for r in run.rounds], where="mid", color="#888888", linewidth=1.2, label="sampled")
    ax.fill_between(xs, [r.participants for r in run.rounds], step="mid", color=SERVED, alpha=0.6, linewidth=0,
                    label="answered in time (aggregated)")
    most = max(r.sampled for r in run.rounds)
    # The axis ends at the run's worker count: a full sample touches the top, a half one sits half way. A
    # fleet of thousands sampling a few would leave the lines flat on the floor: there it ends at the most
    # sampled, and says of how many.
    top = count if most * 4 >= count else most
    style(ax, "", "round", "workers" if top == count else f"workers (of {count:,})")
    ax.set_ylim(0, top * 1.04)
    ax.set_yticks(count_ticks(top))
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_participation(run: RunData, path: Path) -> Path:
    return save(figure_participation(run), path)


def plot_privacy(run: RunData, path: Path) -> Path:
    """A run with differential privacy: the epsilon spent by round against its budget (left), and the
    accuracy each round reached against the epsilon spent by then (right), the privacy-utility trade-off."""
    private = [r for r in run.rounds if r.dp_epsilon is not None]
    if not private:
        raise StorageError(f"{run.path}: no round records an epsilon spent; the run has no differential privacy")
    fig = figure(11, 4.5)
    dp = run.dp
    fig.suptitle(f"{run.label}: privacy spent" + (f" (δ {g(dp.delta)})" if dp is not None else ""), fontsize=13)
    left, right = fig.subplots(1, 2)
    xs = [r.round for r in private]
    eps = [r.dp_epsilon or 0.0 for r in private]
    left.plot(xs, eps, marker="o", markersize=4, color="#7c3aed", label="ε spent")
    if dp is not None and dp.max_epsilon is not None:
        left.axhline(dp.max_epsilon, color="#e45756", linestyle="--", linewidth=1,
                     label=f"--dp-max-epsilon {g(dp.max_epsilon)}: the run stops before it")
    if dp is not None and dp.target_epsilon is not None:
        left.axhline(dp.target_epsilon, color="#f58518", linestyle=":", linewidth=1.2,
                     label=f"--dp-target-epsilon {g(dp.target_epsilon)} (σ solved for it)")
    style(left, "ε spent by round", "round", "ε (cumulative)")
    left.set_ylim(bottom=0)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=9, loc="upper left", frameon=False)
    scores, scored_on = accuracies(run)
    accuracy = {r.round: a for r, a in zip(run.rounds, scores, strict=True)}
    right.plot(eps, values([accuracy[r] for r in xs]), marker="o", markersize=4, color="#4c78a8")
    style(right, f"Accuracy ({scored_on}) against ε spent", "ε spent", "accuracy")
    return save(fig, path)


# --- several runs --------------------------------------------------------------------------------
def plot_compare_privacy(runs: Sequence[RunData], labels: Sequence[str], path: Path) -> Path:
    """Several runs with differential privacy: each one's accuracy against the epsilon it had spent."""
    fig = figure(11, 4.6 + 0.25 * math.ceil(len(runs) / 2))
    ax = fig.subplots()
    for run, label in zip(runs, labels, strict=True):
        accuracy = accuracies(run)[0]
        points = [(r.dp_epsilon, a) for r, a in zip(run.rounds, accuracy, strict=True) if r.dp_epsilon is not None]
        ax.plot([e for e, _ in points], values([a for _, a in points]), marker="o", markersize=3, label=label)
    style(ax, "Accuracy against ε spent, run by run", "ε spent", "accuracy")
    fig.legend(loc="outside lower center", ncols=min(len(runs), 2), fontsize=9, frameon=False)
    return save(fig, path)


def figure_compare(runs: Sequence[RunData]) -> Figure:
    """Accuracy and loss by round of several runs on one chart each, a line per run, labelled by what sets
    the runs apart (``compare_labels``)."""
    labels = compare_labels(runs)
    fig = figure(11, 4.2 + 0.25 * math.ceil(len(runs) / 2))
    fig.suptitle("Accuracy and loss by round, run by run", fontsize=13)
    axes = fig.subplots(1, 2)
    for key, ax in zip(("accuracy", "loss"), axes, strict=True):
        for run, label in zip(runs, labels, strict=True):
            series = accuracies(run)[0] if key == "accuracy" else [r.loss for r in run.rounds]
            ax.plot([r.round for r in run.rounds], values(series), marker="o", markersize=3 if len(run.rounds) <= 60
                    else 0, label=label)
        style(ax, f"Test {key} of the global model" if key == "loss" else "Accuracy of the global model", "round",
              key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, shown = axes[0].get_legend_handles_labels()
    # Long labels (many differing options) take a row each; short ones share rows two by two.
    ncols = 1 if max(len(label) for label in labels) > 60 else min(len(runs), 2)
    fig.legend(handles, shown, loc="outside lower center", ncols=ncols, fontsize=9, frameon=False)
    return fig


def plot_compare(runs: Sequence[RunData], path: Path) -> Path:
    return save(figure_compare(runs), path)
