"""``fedfleet report``: PNG plots and a Markdown summary of one run, or of several side by side.

Reading and drawing are kept apart, so that tests can check the numbers without looking at pixels.
``load_run`` reads a run dir (``fedfleet run --out`` or ``fedfleet coordinator --data-dir``) through
``storage.run_dir.RunDir`` into a ``RunData``: the round records, the run summary, and rounds served
per worker from the state database (``read_participation``); ``round_phases`` splits each round's
seconds from it. The ``plot_*`` functions draw one figure each; ``write_report`` ties them together and
writes ``report.md``. A run with differential privacy (``--dp central``) also gets ``privacy.png`` (ε spent
by round, accuracy against ε) and a section stating its mechanism and what it spent; runs compared side by
side are told apart by their ε where it differs.

A run dir is only read: the state database is opened read-only, so a report can be drawn of a run
that is still going without getting in the coordinator's way. Figures are made with
``matplotlib.figure.Figure`` on an Agg canvas rather than ``pyplot``: no global backend or figure
registry, nothing to close, and no display needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedfleet.errors import StorageError
from fedfleet.partition import partition_name
from fedfleet.storage.records import PrivacySummary, RoundRecord, RunSummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.storage.sqlite import Store

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
SINGLE_RUN_PLOTS = ("accuracy_loss.png", "round_time.png", "participation.png")
PRIVACY_PLOT = "privacy.png"  # a run with --dp central: epsilon by round, accuracy against epsilon
COMPARE_PRIVACY_PLOT = "compare_privacy.png"  # two or more such runs: accuracy against epsilon, run by run
CUT_FACTOR = 4.0  # the round-time axis is cut at this many median rounds when a round is longer
FULL_NAMES = 12  # workers up to which the participation chart writes out partition names


@dataclass(frozen=True)
class WorkerParticipation:
    """How many rounds' aggregates used a worker's update, and with how many examples in all."""

    worker_id: str
    label: str  # the partition name, or "worker ID (replaced)" for a worker whose partition was handed on
    partition: int | None
    name: str
    rounds_served: int
    examples: int


@dataclass(frozen=True)
class RunData:
    path: Path
    name: str
    rounds: list[RoundRecord]  # in round order
    summary: RunSummary | None  # None while the run is going (the summary is written at its end)
    partition: str | None
    workers: int | None
    participation: list[WorkerParticipation] | None  # None when the run dir has no state database

    @property
    def label(self) -> str:
        """The run dir's name with what tells runs apart: its partition and number of workers."""
        return self.label_with()

    def label_with(self, *extra: str) -> str:
        details = [d for d in (self.partition, f"{self.workers} workers" if self.workers else None, *extra) if d]
        return f"{self.name} ({', '.join(details)})" if details else self.name

    @property
    def dp(self) -> PrivacySummary | None:
        """summary.json's dp block: the mechanism's settings and the epsilon spent; None without --dp central
        and while the run is going (its rounds still say what they spent: ``epsilon``)."""
        return self.summary.dp if self.summary else None

    @property
    def epsilon(self) -> float | None:
        """Epsilon spent by the run (at its delta), None for a run without differential privacy. While the
        run is going, what its last recorded round says."""
        if self.dp is not None:
            return self.dp.epsilon
        return self.rounds[-1].dp_epsilon if self.rounds else None

    @property
    def state(self) -> str:
        return self.summary.state if self.summary else "in progress"

    @property
    def final_accuracy(self) -> float | None:
        """The summary's, or while running the last round's; None when the model's score is unknown
        (a diverged model's loss is recorded as unknown). A run without a held-out set (evaluation
        "federated") has its last federated evaluation instead: see ``scored_by``."""
        if self.summary:
            return self.summary.final_fed_accuracy if self.scored_by == "federated" else self.summary.final_accuracy
        return self.rounds[-1].accuracy

    @property
    def scored_by(self) -> str:
        return self.summary.evaluation if self.summary else "test"

    @property
    def final_loss(self) -> float | None:
        return self.summary.final_loss if self.summary else self.rounds[-1].loss

    @property
    def seconds(self) -> float:
        """The coordinator's seconds from start to end; while running, the rounds' seconds so far."""
        return self.summary.seconds if self.summary else sum(r.seconds for r in self.rounds)


# --- reading a run -------------------------------------------------------------------------------
def load_run(path: Path) -> RunData:
    """Read a run dir; raise StorageError with a one-line message if it is not a readable run."""
    if not path.exists():
        raise StorageError(f"run dir {path} does not exist")
    if not path.is_dir():
        raise StorageError(f"{path} is not a directory; give the run's folder (fedfleet run --out DIR)")
    run_dir = RunDir(path)
    rounds = run_dir.read_rounds()
    if not rounds:
        raise StorageError(f"{run_dir.metrics_path} holds no rounds yet; nothing to report")
    summary = run_dir.read_summary()
    # The summary is written when the run ends, config.toml when it starts: a running run has only that.
    if summary is not None:
        partition: str | None = summary.partition
        workers: int | None = summary.workers
    else:
        partition, workers = _labels_from_config(run_dir)
    workers = workers if workers is not None and workers > 0 else None
    return RunData(path=path, name=path.resolve().name, rounds=rounds, summary=summary, partition=partition,
                   workers=workers, participation=read_participation(run_dir.state_path, workers)
                   if run_dir.state_path.exists() else None)


def _labels_from_config(run_dir: RunDir) -> tuple[str | None, int | None]:
    # Only labels come from here, so a missing or unreadable config costs labels, not the report.
    try:
        config = run_dir.read_config()
    except StorageError:
        return None, None
    return config.partition, config.workers


def read_participation(db_path: Path, workers: int | None) -> list[WorkerParticipation]:
    """Rounds served per worker, from the updates the coordinator accepted (``Store.served``), in
    partition order. A worker whose partition was handed to a new worker has left the workers' table
    but keeps its updates: it is shown as replaced."""
    with closing(Store.read_only(db_path)) as store:
        known = store.workers()
        served = store.served()
    count = workers or (max((w.partition for w in known), default=-1) + 1)
    by_id = {s.worker_id: (s.rounds, s.examples) for s in served}
    out = [WorkerParticipation(w.worker_id, partition_name(w.partition, count), w.partition, w.name,
                               *by_id.pop(w.worker_id, (0, 0)))
           for w in sorted(known, key=lambda w: w.partition)]
    out += [WorkerParticipation(wid, f"worker {wid[:8]} (replaced)", None, "", n, ex)
            for wid, (n, ex) in sorted(by_id.items())]
    return out


def round_phases(run: RunData) -> dict[str, list[float]]:
    """Seconds of each phase of each round, in the order they happen; per round they add up to its seconds.

    The round is open from the moment workers may fetch the model until the last answer arrived. The
    workers report their download and training times, and each record's ``worker_metrics`` carries
    their means; the rest of the open time is uploads and waiting for the slowest worker (a mean
    leaves the straggler's extra time there). Runs whose records lack those times keep the open time
    whole.
    """
    split = all("download_s" in r.worker_metrics and "train_s" in r.worker_metrics for r in run.rounds)
    phases: dict[str, list[float]] = {"waiting for workers": []}
    if split:
        for label in ("model download (workers' mean)", "local training (workers' mean)", "upload + slowest worker"):
            phases[label] = []
    else:
        phases["open (transfer + training)"] = []
    for label in ("aggregation", "evaluation", "checkpoint"):
        phases[label] = []
    for r in run.rounds:
        t = r.timings
        phases["waiting for workers"].append(t.wait_workers)
        if split:
            download = max(0.0, r.worker_metrics["download_s"])
            train = max(0.0, r.worker_metrics["train_s"])
            # Worker and coordinator clocks start at slightly different moments: should the workers'
            # times ever exceed the open time, shrink them to fit, so the bar still shows the round.
            scale = min(1.0, t.open / (download + train)) if download + train > 0 else 1.0
            phases["model download (workers' mean)"].append(download * scale)
            phases["local training (workers' mean)"].append(train * scale)
            phases["upload + slowest worker"].append(t.open - (download + train) * scale)
        else:
            phases["open (transfer + training)"].append(t.open)
        phases["aggregation"].append(t.aggregate)
        phases["evaluation"].append(t.evaluate)
        phases["checkpoint"].append(t.checkpoint)
    return phases


def _score(record: RoundRecord, key: str) -> float | None:
    return record.accuracy if key == "accuracy" else record.loss


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _values(values: Sequence[float | None]) -> list[float]:
    """Scores to plot: an unknown one (a diverged model's) as NaN, a gap in the line."""
    return [math.nan if v is None else v for v in values]


def _g(value: float) -> str:
    """Epsilon, delta and the mechanism's settings as people write them: 2.31, 0.5, 1e-05."""
    return f"{value:.3g}"


def _accuracies(run: RunData) -> tuple[list[float | None], str]:
    """The run's accuracy by round and what it was measured on: the held-out test set, or, for a run
    without one, the workers' validation splits (federated evaluation)."""
    test = [r.accuracy for r in run.rounds]
    fed = [r.fed_accuracy for r in run.rounds]
    if all(v is None for v in test) and any(v is not None for v in fed):
        return fed, "workers' validation splits (federated evaluation)"
    return test, "held-out test set"


def compare_labels(runs: Sequence[RunData]) -> list[str]:
    """Each run's label for a comparison; with its epsilon (or "no DP") when the runs' epsilons differ,
    since then privacy is what sets them apart as much as their partition.

    >>> base = RunData(Path("a"), "a", [], None, "iid", 8, None)
    >>> compare_labels([base, base])
    ['a (iid, 8 workers)', 'a (iid, 8 workers)']
    """
    shown = [_epsilon_label(run.epsilon) for run in runs]
    if len(set(shown)) <= 1:
        return [run.label for run in runs]
    return [run.label_with(text) for run, text in zip(runs, shown, strict=True)]


def _epsilon_label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"ε {_g(epsilon)}"


# --- drawing -------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=12, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig: Figure, path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, format="png")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from None
    return path


def plot_accuracy_loss(run: RunData, path: Path) -> Path:
    """Test accuracy and loss of the global model by round, next to the workers' local training ones."""
    fig = _figure(11, 4.5)
    fig.suptitle(f"{run.label}: accuracy and loss by round", fontsize=13)
    xs = [r.round for r in run.rounds]
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("accuracy", "loss"), ("Accuracy", "Loss"), strict=True):
        test = [_score(r, key) for r in run.rounds]
        if any(v is not None for v in test) or not run.rounds:
            ax.plot(xs, _values(test), marker="o", markersize=4, label="global model, held-out test set")
        fed = [r.fed_accuracy if key == "accuracy" else r.fed_loss for r in run.rounds]
        if all(v is None for v in test) and any(v is not None for v in fed):
            # No held-out set (a sites run without --test-data): the workers' scores are the run's. Each is of
            # the model a worker was sent that round, on its own validation split, before it trained.
            ax.plot(xs, _values(fed), marker="D", markersize=4,
                    label="global model sent that round, workers' validation splits (federated evaluation)")
        local = [r.worker_metrics.get(f"train_{key}") for r in run.rounds]
        if all(v is not None for v in local):
            ax.plot(xs, _values(local), marker="s", markersize=3, linestyle="--", alpha=0.8,
                    label="workers' local training (mean)")
        _style(ax, name, "round", name.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Both panels show the same two series: one legend below them, where it covers no point.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return _save(fig, path)


def plot_round_time(run: RunData, path: Path) -> Path:
    """Seconds per round as stacked bars, one segment per phase."""
    phases = round_phases(run)
    xs = [r.round for r in run.rounds]
    fig = _figure(11, 4.8)
    ax = fig.subplots()
    bottom = [0.0] * len(xs)
    for label, values in phases.items():
        ax.bar(xs, values, bottom=bottom, width=0.8, label=label, color=PHASE_COLOURS[label])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    _style(ax, f"{run.label}: time per round by phase", "round", "seconds")
    ax.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    # One long round (typically the first, waiting for workers to start) would flatten all the others
    # into slivers: cut the axis at a few typical rounds and write the cut bars' totals on them.
    typical = statistics.median(bottom)
    if typical > 0 and max(bottom) > CUT_FACTOR * typical:
        top = CUT_FACTOR * typical
        ax.set_ylim(0, top)
        for x, total in zip(xs, bottom, strict=True):
            if total > top:
                ax.annotate(f"{total:.2f} s", (x, top), xytext=(0, -4), textcoords="offset points", ha="center",
                            va="top", fontsize=8, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False, axis="x")
    # Phases read bottom to top in the bars; list them the same way in the legend.
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper", fontsize=9, frameon=False)
    return _save(fig, path)


def plot_participation(run: RunData, path: Path) -> Path:
    """Rounds served per worker (left) and workers that answered per round against those sampled (right)."""
    fig = _figure(11, 4.6)
    fig.suptitle(f"{run.label}: participation", fontsize=13)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    people = run.participation or []
    if people:
        positions = list(range(len(people)))
        bars = left.bar(positions, [p.rounds_served for p in people], color="#4c78a8", width=0.7)
        many = len(people) > FULL_NAMES
        if not many:
            left.bar_label(bars, fontsize=8, padding=2)
        # Full partition names do not fit under more than a dozen bars: show their numbers then
        # (the axis label says how to read them), and only every few of them beyond about forty.
        labels = [p.label if not many else f"{p.partition:03d}" if p.partition is not None
                  else f"{p.worker_id[:4]} repl." for p in people]
        step = max(1, math.ceil(len(people) / 40))
        left.set_xticks(positions[::step], labels[::step], fontsize=8, rotation=90 if many else 30,
                        ha="center" if many else "right")
        left.axhline(len(run.rounds), color="#e45756", linestyle="--", linewidth=1,
                     label=f"rounds completed ({len(run.rounds)})")
        # Headroom above the line for the legend, so that it covers no bar.
        left.set_ylim(0, len(run.rounds) * 1.3)
        left.legend(fontsize=9, loc="upper right", frameon=False)
    else:
        left.text(0.5, 0.5, "no state.sqlite in the run dir", ha="center", va="center", transform=left.transAxes)
    count = run.workers or len(people)
    xlabel = f"worker, by partition number (part-NNN-of-{count:03d})" if len(people) > FULL_NAMES \
        else "worker (partition)"
    _style(left, "Rounds served per worker", xlabel, "rounds")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.grid(False, axis="x")
    xs = [r.round for r in run.rounds]
    # Answered drawn inside sampled: the grey that shows above a blue bar is the workers that missed it.
    right.bar(xs, [r.sampled for r in run.rounds], width=0.8, color="#d9d9d9", label="sampled")
    right.bar(xs, [r.participants for r in run.rounds], width=0.5, color="#4c78a8",
              label="answered in time (aggregated)")
    _style(right, "Workers per round", "round", "workers")
    right.grid(False, axis="x")
    # Headroom above the bars for the legend, which would otherwise cover them.
    right.set_ylim(bottom=0, top=max(r.sampled for r in run.rounds) * 1.35 + 0.5)
    right.set_xlim(min(xs) - 0.7, max(xs) + 0.7)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=9, loc="upper center", ncols=2, frameon=False)
    return _save(fig, path)


def plot_privacy(run: RunData, path: Path) -> Path:
    """A run with differential privacy: the epsilon spent by round against its budget (left), and the
    accuracy each round reached against the epsilon spent by then (right), the privacy-utility trade-off."""
    private = [r for r in run.rounds if r.dp_epsilon is not None]
    if not private:
        raise StorageError(f"{run.path}: no round records an epsilon spent; the run has no differential privacy")
    fig = _figure(11, 4.5)
    dp = run.dp
    fig.suptitle(f"{run.label}: privacy spent" + (f" (δ {_g(dp.delta)})" if dp is not None else ""), fontsize=13)
    left, right = fig.subplots(1, 2)
    xs = [r.round for r in private]
    eps = [r.dp_epsilon or 0.0 for r in private]
    left.plot(xs, eps, marker="o", markersize=4, color="#7c3aed", label="ε spent")
    if dp is not None and dp.max_epsilon is not None:
        left.axhline(dp.max_epsilon, color="#e45756", linestyle="--", linewidth=1,
                     label=f"--dp-max-epsilon {_g(dp.max_epsilon)}: the run stops before it")
    if dp is not None and dp.target_epsilon is not None:
        left.axhline(dp.target_epsilon, color="#f58518", linestyle=":", linewidth=1.2,
                     label=f"--dp-target-epsilon {_g(dp.target_epsilon)} (σ solved for it)")
    _style(left, "ε spent by round", "round", "ε (cumulative)")
    left.set_ylim(bottom=0)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=9, loc="upper left", frameon=False)
    scores, scored_on = _accuracies(run)
    accuracy = {r.round: a for r, a in zip(run.rounds, scores, strict=True)}
    right.plot(eps, _values([accuracy[r] for r in xs]), marker="o", markersize=4, color="#4c78a8")
    _style(right, f"Accuracy ({scored_on}) against ε spent", "ε spent", "accuracy")
    return _save(fig, path)


def plot_compare_privacy(runs: Sequence[RunData], labels: Sequence[str], path: Path) -> Path:
    """Several runs with differential privacy: each one's accuracy against the epsilon it had spent."""
    fig = _figure(11, 4.6 + 0.25 * math.ceil(len(runs) / 2))
    ax = fig.subplots()
    for run, label in zip(runs, labels, strict=True):
        accuracy = _accuracies(run)[0]
        points = [(r.dp_epsilon, a) for r, a in zip(run.rounds, accuracy, strict=True) if r.dp_epsilon is not None]
        ax.plot([e for e, _ in points], _values([a for _, a in points]), marker="o", markersize=3, label=label)
    _style(ax, "Accuracy against ε spent, run by run", "ε spent", "accuracy")
    fig.legend(loc="outside lower center", ncols=min(len(runs), 2), fontsize=9, frameon=False)
    return _save(fig, path)


def plot_compare(runs: Sequence[RunData], path: Path) -> Path:
    """Accuracy and loss by round of several runs on one chart each, a line per run."""
    fig = _figure(11, 4.2 + 0.25 * math.ceil(len(runs) / 2))
    fig.suptitle("Accuracy and loss by round, run by run", fontsize=13)
    axes = fig.subplots(1, 2)
    labels = compare_labels(runs)
    for key, ax in zip(("accuracy", "loss"), axes, strict=True):
        for run, label in zip(runs, labels, strict=True):
            ax.plot([r.round for r in run.rounds], _values([_score(r, key) for r in run.rounds]), marker="o",
                    markersize=3, label=label)
        _style(ax, f"Test {key} of the global model", "round", key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(runs), 2), fontsize=9, frameon=False)
    return _save(fig, path)


# --- the report ----------------------------------------------------------------------------------
def default_out(run_dirs: Sequence[Path]) -> Path:
    return run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report")


def write_report(run_dirs: Sequence[Path], out: Path | None = None) -> list[Path]:
    """Read every run first (so a bad one fails before anything is written), then write the plots
    and ``report.md`` into ``out``; returns the files written, report.md last."""
    if not run_dirs:
        raise StorageError("no run dir given")
    runs = [load_run(p) for p in run_dirs]
    out = out if out is not None else default_out(run_dirs)
    written: list[Path] = []
    sections: list[tuple[RunData, str]] = []
    if len(runs) == 1:
        written += _plot_run(runs[0], out)
        sections.append((runs[0], ""))
    else:
        written.append(plot_compare(runs, out / "compare.png"))
        private = [(run, label) for run, label in zip(runs, compare_labels(runs), strict=True)
                   if run.epsilon is not None]
        if len(private) > 1:
            written.append(plot_compare_privacy([r for r, _ in private], [label for _, label in private],
                                                out / COMPARE_PRIVACY_PLOT))
        for run, folder in zip(runs, _unique_names([r.name for r in runs]), strict=True):
            written += _plot_run(run, out / folder)
            sections.append((run, folder + "/"))
    md = out / "report.md"
    try:
        md.write_text(render_markdown(runs, sections))
    except OSError as exc:
        raise StorageError(f"cannot write {md}: {exc}") from None
    return [*written, md]


def _plot_run(run: RunData, out: Path) -> list[Path]:
    plots = (plot_accuracy_loss, plot_round_time, plot_participation)
    written = [plot(run, out / name) for plot, name in zip(plots, SINGLE_RUN_PLOTS, strict=True)]
    if run.epsilon is not None:
        written.append(plot_privacy(run, out / PRIVACY_PLOT))
    return written


def _unique_names(names: Sequence[str]) -> list[str]:
    """Folder names for the runs' plots: their dir names, numbered where two runs share one."""
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}-{n}"
        out.append(candidate)
    return out


def render_markdown(runs: Sequence[RunData], sections: Sequence[tuple[RunData, str]]) -> str:
    # The privacy column only where a run has differential privacy: a report of runs without it is unchanged.
    private = any(run.epsilon is not None for run in runs)
    lines = ["# fedfleet report", "",
             "| run | partition | workers | state | rounds | final accuracy | final loss | seconds |"
             + (" ε spent (δ) |" if private else ""),
             "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|" if private else "")]
    for run in runs:
        cells = [run.name, run.partition or "-", str(run.workers or "-"), run.state, str(len(run.rounds)),
                 _fmt(run.final_accuracy) + (" (federated)" if run.scored_by == "federated" else ""),
                 _fmt(run.final_loss), f"{run.seconds:.1f}"]
        if private:
            cells.append("no DP" if run.epsilon is None else _g(run.epsilon)
                         + (f" ({_g(run.dp.delta)})" if run.dp is not None else ""))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    labels = dict(zip((id(run) for run in runs), compare_labels(runs), strict=True))
    if len(runs) > 1:
        lines += ["## Side by side", "", "![accuracy and loss by round, run by run](compare.png)", ""]
        if sum(run.epsilon is not None for run in runs) > 1:
            lines += ["![accuracy against ε spent, run by run](compare_privacy.png)", ""]
    for run, prefix in sections:
        heading = "##" if len(runs) == 1 else "###"
        if len(runs) > 1:
            lines += [f"## {labels[id(run)]}", ""]
        for title, name in zip(("Accuracy and loss by round", "Time per round by phase", "Participation"),
                               SINGLE_RUN_PLOTS, strict=True):
            lines += [f"{heading} {title}", "", f"![{title.lower()}]({quote(prefix + name)})", ""]
        if run.participation is None:
            lines += [f"{run.path} has no state.sqlite, so rounds served per worker are not shown.", ""]
        if run.epsilon is not None:
            lines += [f"{heading} Differential privacy", "", *privacy_lines(run), "",
                      f"![privacy spent]({quote(prefix + PRIVACY_PLOT)})", ""]
    return "\n".join(lines)


def privacy_lines(run: RunData) -> list[str]:
    """What report.md says of a run's differential privacy: the mechanism, its settings and the epsilon
    spent, from summary.json's dp block (while the run is going, only the epsilon its rounds recorded)."""
    dp = run.dp
    if dp is None:
        spent = run.rounds[-1]
        return [f"- ε spent so far: **{_g(run.epsilon or 0.0)}** after round {spent.round} (metrics.jsonl); the "
                "mechanism's settings and δ are written to summary.json when the run ends."]
    if dp.target_epsilon is not None:
        sigma = f"{_g(dp.noise_multiplier)}, solved for --dp-target-epsilon {_g(dp.target_epsilon)}"
    else:
        sigma = _g(dp.noise_multiplier)
    budget = f" of --dp-max-epsilon {_g(dp.max_epsilon)}" if dp.max_epsilon is not None else ""
    lines = [
        f"- Mechanism: {dp.mechanism} differential privacy (DP-FedAvg with a trusted coordinator): each sampled "
        "worker's update clipped to L2 norm C, Gaussian noise of standard deviation σ·C added to their sum, "
        f"divided by the expected number sampled ({_g(dp.denominator)})",
        f"- Clip norm C: {_g(dp.clip)}",
        f"- Noise multiplier σ: {sigma}",
        f"- δ: {_g(dp.delta)}",
        f"- Sampling rate q: {_g(dp.sample_rate)} (Poisson: each live worker independently, each round)",
        f"- ε spent: **{_g(dp.epsilon)}**{budget} at δ {_g(dp.delta)}, by {dp.rounds} noised "
        f"round{'s' if dp.rounds != 1 else ''}; the unit of privacy is a worker (all of one site's examples)",
        f"- Accountant: {dp.accountant}",
    ]
    if dp.seeded:
        lines.append("- **--dp-seed was set: the sampling and the noise are reproducible by whoever knows the seed, "
                     "so this run is not private (for tests only).**")
    return lines


def main(run_dirs: Sequence[Path], out: Path | None) -> int:
    """The ``fedfleet report`` command: write the report and say where it is."""
    written = write_report(run_dirs, out)
    print(f"fedfleet: report of {len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''} in {written[-1].parent}: "
          f"{written[-1].name} and {len(written) - 1} plots")
    return 0
