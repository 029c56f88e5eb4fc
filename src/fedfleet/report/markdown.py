"""report.md: the table of runs, what they share and what sets them apart, and the charts, section by section."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from fedfleet.report.compare import compare_labels, option_diff, unique_names
from fedfleet.report.data import LAST_N, RunData, Scores, last_confusion, scores
from fedfleet.report.plots import g
from fedfleet.report.workers import MAX_MIX_WORKERS, label_mix

MAX_WORKER_ROWS = 32  # workers up to which report.md lists them in a table; the charts show any number

# Each run's charts, in the order report.md shows them, with their headings.
RUN_PLOTS = {
    "accuracy_loss.png": "Accuracy and loss by round",
    "round_time.png": "Time per round by phase",
    "participation.png": "Participation",
    "worker_heatmap.png": "Each worker's own score by round",
    "worker_data.png": "Each worker's data",
    "worker_loss.png": "Local training loss per worker",
    "confusion.png": "Confusion matrix",
    "privacy.png": "Differential privacy",
}


@dataclass(frozen=True)
class Section:
    """One run's part of report.md: where its charts are (relative to report.md) and which were drawn."""

    run: RunData
    prefix: str
    plots: set[str] = field(default_factory=set)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def best_cell(s: Scores) -> str:
    return "-" if s.best is None else f"{s.best:.4f} (round {s.best_round})"


def mean_cell(s: Scores) -> str:
    """The mean of the last rounds, saying over how many when it is not LAST_N known scores.

    >>> mean_cell(Scores(0.5, 0.6, 2, 0.55, 3, 3)), mean_cell(Scores(0.5, 0.6, 2, 0.55, 10, 8))
    ('0.5500 (last 3)', '0.5500 (8 known of last 10)')
    """
    if s.mean_last is None:
        return "-"
    if s.known < s.last:
        return f"{s.mean_last:.4f} ({s.known} known of last {s.last})"
    return f"{s.mean_last:.4f}" + (f" (last {s.last})" if s.last < LAST_N else "")


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def runs_table(runs: Sequence[RunData]) -> list[str]:
    """One row per run: the options that set the runs apart (a single run: its partition and workers),
    its state, and its scores: final, best with its round, and the mean of its last rounds."""
    private = any(run.epsilon is not None for run in runs)  # the column only where a run has DP
    diff = option_diff(runs)
    option_names = diff.differing if len(runs) > 1 else ["partition", "workers"]
    header = ["run", *option_names, "state", "rounds", "final accuracy", "best accuracy (round)",
              f"mean of last {LAST_N}", "final loss", "seconds", *(["ε spent (δ)"] if private else [])]
    option_align = ["---"] * len(option_names) if len(runs) > 1 else ["---", "---:"]
    align = ["---", *option_align, "---", "---:", "---:", "---:", "---:", "---:", "---:",
             *(["---:"] if private else [])]
    lines = [_row(header), "|" + "|".join(align) + "|"]
    for i, (run, name) in enumerate(zip(runs, unique_names([r.name for r in runs]), strict=True)):
        if len(runs) > 1:
            mine = dict(diff.of(i))
            opts = [mine.get(o, "?") for o in option_names]
        else:
            opts = [run.partition or "-", str(run.workers or "-")]
        s = scores(run)
        cells = [name, *opts, run.state, str(len(run.rounds)),
                 fmt(s.final) + (" (federated)" if run.scored_by == "federated" else ""), best_cell(s),
                 mean_cell(s), fmt(run.final_loss), f"{run.seconds:.1f}"]
        if private:
            cells.append("no DP" if run.epsilon is None else g(run.epsilon)
                         + (f" ({g(run.dp.delta)})" if run.dp is not None else ""))
        lines.append(_row(cells))
    return lines


def common_lines(runs: Sequence[RunData]) -> list[str]:
    """Several runs: the options they share, said once (the table and labels give only those that differ)."""
    diff = option_diff(runs)
    lines = []
    if diff.common:
        lines.append("Options common to every run: " + ", ".join(f"`{k}={v}`" for k, v in diff.common.items())
                     + ".")
    unknown = [run.name for run, v in zip(runs, diff.values, strict=True) if v is None]
    if unknown:
        lines.append(f"Options unknown (no config.toml or summary.json): {', '.join(unknown)}.")
    return lines


def render_markdown(runs: Sequence[RunData], sections: Sequence[Section]) -> str:
    lines = ["# fedfleet report", "", *runs_table(runs), ""]
    if len(runs) > 1:
        lines += [*common_lines(runs), ""] if common_lines(runs) else []
        lines += ["## Side by side", "", "![accuracy and loss by round, run by run](compare.png)", ""]
        if sum(run.epsilon is not None for run in runs) > 1:
            lines += ["![accuracy against ε spent, run by run](compare_privacy.png)", ""]
    labels = dict(zip((id(run) for run in runs), compare_labels(runs), strict=True))
    for section in sections:
        if len(runs) > 1:
            lines += [f"## {labels[id(section.run)]}", ""]
        lines += run_section(section, "##" if len(runs) == 1 else "###")
    return "\n".join(lines)


def run_section(section: Section, heading: str) -> list[str]:
    run, prefix = section.run, section.prefix
    lines: list[str] = []
    for name in ("accuracy_loss.png", "round_time.png", "participation.png"):
        lines += _image(heading, name, prefix)
    if run.participation is None:
        lines += [f"{run.path} has no state.sqlite, so rounds served per worker are not shown.", ""]
    else:
        lines += worker_lines(section, heading)
    confusion = last_confusion(run)
    if confusion is not None and "confusion.png" in section.plots:
        lines += _image(heading, "confusion.png", prefix)
        lines += recall_lines(run)
    if run.epsilon is not None:
        lines += [f"{heading} Differential privacy", "", *privacy_lines(run), "",
                  f"![privacy spent]({quote(prefix + 'privacy.png')})", ""]
    return lines


def _image(heading: str, name: str, prefix: str) -> list[str]:
    title = RUN_PLOTS[name]
    return [f"{heading} {title}", "", f"![{title.lower()}]({quote(prefix + name)})", ""]


def worker_lines(section: Section, heading: str) -> list[str]:
    """The per-worker charts that were drawn, and a table of each worker's numbers for a fleet that fits one."""
    lines: list[str] = []
    for name in ("worker_heatmap.png", "worker_loss.png", "worker_data.png"):
        if name in section.plots:
            lines += _image(heading, name, section.prefix)
    if "worker_heatmap.png" not in section.plots:
        lines += ["The workers reported no validation accuracy or training loss of their own.", ""]
    if "worker_data.png" not in section.plots and len(section.run.worker_rows()) > MAX_MIX_WORKERS:
        lines += [f"Each worker's data (examples, label mix) is drawn for up to {MAX_MIX_WORKERS} workers.", ""]
    rows = worker_table(section.run)
    if rows:
        lines += [*rows, ""]
    return lines


def worker_table(run: RunData) -> list[str]:
    """Each worker: examples, rounds served, its last reported validation accuracy and training loss, and
    its label mix as shares of its examples. What the workers sent: their numbers, not the coordinator's."""
    pairs = run.worker_rows()
    if not pairs or len(pairs) > MAX_WORKER_ROWS:
        return [f"{len(pairs)} workers: too many for a table, see the charts."] if pairs else []
    mix = label_mix(run)
    lines = [_row(["worker", "examples", "rounds served", "val accuracy (last)", "train loss (last)",
                   "label mix"]), "|---|---:|---:|---:|---:|---|"]
    for i, (p, h) in enumerate(pairs):
        counts = mix.counts[i] if mix is not None and mix.counts is not None else None
        lines.append(_row([p.label, "-" if h.examples is None else f"{h.examples:,}", str(p.rounds_served),
                           fmt(_last(h.series["val_accuracy"])), fmt(_last(h.series["train_loss"])),
                           _mix_cell(counts, mix.classes if mix is not None else [])]))
    return lines


def _last(series: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(series) if v is not None), None)


def _mix_cell(counts: Sequence[int] | None, classes: Sequence[str]) -> str:
    """A worker's label counts as shares: ``80s-90s 61%, 1960s-70s 27%, ...`` (largest first).

    >>> _mix_cell([1, 3, 0], ["a", "b", "c"])
    'b 75%, a 25%, c 0%'
    """
    total = sum(counts or [])
    if not counts or not total:
        return "-"
    order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
    return ", ".join(f"{classes[k]} {counts[k] / total:.0%}" for k in order)


def recall_lines(run: RunData) -> list[str]:
    """Per-class recall of the last scored model, from its confusion matrix."""
    confusion = last_confusion(run)
    if confusion is None:
        return []
    lines = [f"Per-class recall of the model of round {confusion.round} on the held-out test set:", "",
             "| class | test examples | predicted right | recall |", "|---|---:|---:|---:|"]
    for i, (name, recall) in enumerate(zip(confusion.classes, confusion.recall(), strict=True)):
        row = confusion.counts[i]
        lines.append(_row([name, f"{sum(row):,}", f"{row[i]:,}", fmt(recall)]))
    return [*lines, ""]


def privacy_lines(run: RunData) -> list[str]:
    """What report.md says of a run's differential privacy: the mechanism, its settings and the epsilon
    spent, from summary.json's dp block (while the run is going, only the epsilon its rounds recorded)."""
    dp = run.dp
    if dp is None:
        spent = run.rounds[-1]
        return [f"- ε spent so far: **{g(run.epsilon or 0.0)}** after round {spent.round} (metrics.jsonl); the "
                "mechanism's settings and δ are written to summary.json when the run ends."]
    if dp.target_epsilon is not None:
        sigma = f"{g(dp.noise_multiplier)}, solved for --dp-target-epsilon {g(dp.target_epsilon)}"
    else:
        sigma = g(dp.noise_multiplier)
    budget = f" of --dp-max-epsilon {g(dp.max_epsilon)}" if dp.max_epsilon is not None else ""
    lines = [
        f"- Mechanism: {dp.mechanism} differential privacy (DP-FedAvg with a trusted coordinator): each sampled "
        "worker's update clipped to L2 norm C, Gaussian noise of standard deviation σ·C added to their sum, "
        f"divided by the expected number sampled ({g(dp.denominator)})",
        f"- Clip norm C: {g(dp.clip)}",
        f"- Noise multiplier σ: {sigma}",
        f"- δ: {g(dp.delta)}",
        f"- Sampling rate q: {g(dp.sample_rate)} (Poisson: each live worker independently, each round)",
        f"- ε spent: **{g(dp.epsilon)}**{budget} at δ {g(dp.delta)}, by {dp.rounds} noised "
        f"round{'s' if dp.rounds != 1 else ''}; the unit of privacy is a worker (all of one site's examples)",
        f"- Accountant: {dp.accountant}",
    ]
    if dp.seeded:
        lines.append("- **--dp-seed was set: the sampling and the noise are reproducible by whoever knows the seed, "
                     "so this run is not private (for tests only).**")
    return lines
