"""``fedfleet report``: PNG plots and a Markdown summary of one run, or of several side by side.

Reading and drawing are kept apart, so that tests can check the numbers without looking at pixels:

- ``data``: ``load_run`` reads a run dir (``fedfleet run --out`` or ``fedfleet coordinator --data-dir``)
  through ``storage.run_dir.RunDir`` into a ``RunData``: the round records, the summary, the options, and
  from the state database (opened read-only, so that a report of a running run does not get in the
  coordinator's way) the rounds each worker served and its own numbers (``storage.history``). Also the
  table's scores (final, best, mean of the last rounds) and the confusion matrix of the last scored round.
- ``compare``: what sets compared runs apart: every option whose value differs between them.
- ``plots``: accuracy and loss (with the workers' spread), time per round, participation, privacy, and the
  comparisons; ``workers``: each worker's own score and loss by round, its label mix, the confusion matrix.
- ``markdown``: report.md.

A run with differential privacy (``--dp central``) also gets ``privacy.png`` (ε spent by round, accuracy
against ε) and a section stating its mechanism and what it spent.

>>> from fedfleet.report import block_size, unique_names
>>> unique_names(["a", "a"]), block_size(160)
(['a', 'a-2'], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from fedfleet.errors import StorageError
from fedfleet.report.compare import compare_labels, option_diff, unique_names
from fedfleet.report.data import (
    LAST_N,
    Confusion,
    RunData,
    Scores,
    WorkerParticipation,
    accuracies,
    last_confusion,
    load_run,
    read_participation,
    read_workers,
    round_phases,
    scores,
)
from fedfleet.report.markdown import Section, privacy_lines, render_markdown
from fedfleet.report.plots import (
    MAX_BARS,
    block_size,
    figure_accuracy_loss,
    figure_compare,
    figure_participation,
    figure_round_time,
    plot_accuracy_loss,
    plot_compare,
    plot_compare_privacy,
    plot_participation,
    plot_privacy,
    plot_round_time,
    save,
)
from fedfleet.report.workers import (
    figure_confusion,
    figure_worker_data,
    figure_worker_heatmap,
    figure_worker_loss,
    label_mix,
)

__all__ = [
    "COMPARE_PRIVACY_PLOT",
    "LAST_N",
    "MAX_BARS",
    "PRIVACY_PLOT",
    "SINGLE_RUN_PLOTS",
    "WORKER_PLOTS",
    "Confusion",
    "RunData",
    "Scores",
    "Section",
    "WorkerParticipation",
    "accuracies",
    "block_size",
    "compare_labels",
    "default_out",
    "figure_accuracy_loss",
    "figure_compare",
    "figure_confusion",
    "figure_participation",
    "figure_round_time",
    "figure_worker_data",
    "figure_worker_heatmap",
    "figure_worker_loss",
    "label_mix",
    "last_confusion",
    "load_run",
    "main",
    "option_diff",
    "plot_accuracy_loss",
    "plot_compare",
    "plot_compare_privacy",
    "plot_participation",
    "plot_privacy",
    "plot_round_time",
    "privacy_lines",
    "read_participation",
    "read_workers",
    "render_markdown",
    "round_phases",
    "scores",
    "unique_names",
    "write_report",
]

SINGLE_RUN_PLOTS = ("accuracy_loss.png", "round_time.png", "participation.png")  # every run gets these
# Drawn when the run has their data: the workers' own numbers (a state database), a confusion matrix.
WORKER_PLOTS: dict[str, Callable[[RunData], Figure | None]] = {
    "worker_heatmap.png": figure_worker_heatmap,
    "worker_loss.png": figure_worker_loss,
    "worker_data.png": figure_worker_data,
}
PRIVACY_PLOT = "privacy.png"  # a run with --dp central: epsilon by round, accuracy against epsilon
COMPARE_PRIVACY_PLOT = "compare_privacy.png"  # two or more such runs: accuracy against epsilon, run by run


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
    sections: list[Section] = []
    if len(runs) == 1:
        plots = _plot_run(runs[0], out)
        written += plots
        sections.append(Section(runs[0], "", {p.name for p in plots}))
    else:
        written.append(plot_compare(runs, out / "compare.png"))
        private = [(run, label) for run, label in zip(runs, compare_labels(runs), strict=True)
                   if run.epsilon is not None]
        if len(private) > 1:
            written.append(plot_compare_privacy([r for r, _ in private], [label for _, label in private],
                                                out / COMPARE_PRIVACY_PLOT))
        for run, folder in zip(runs, unique_names([r.name for r in runs]), strict=True):
            plots = _plot_run(run, out / folder)
            written += plots
            sections.append(Section(run, folder + "/", {p.name for p in plots}))
    md = out / "report.md"
    try:
        md.write_text(render_markdown(runs, sections))
    except OSError as exc:
        raise StorageError(f"cannot write {md}: {exc}") from None
    return [*written, md]


def _plot_run(run: RunData, out: Path) -> list[Path]:
    plots = (plot_accuracy_loss, plot_round_time, plot_participation)
    written = [plot(run, out / name) for plot, name in zip(plots, SINGLE_RUN_PLOTS, strict=True)]
    for name, draw in WORKER_PLOTS.items():
        fig = draw(run)
        if fig is not None:
            written.append(save(fig, out / name))
    confusion = last_confusion(run)
    if confusion is not None:
        written.append(save(figure_confusion(run, confusion), out / "confusion.png"))
    if run.epsilon is not None:
        written.append(plot_privacy(run, out / PRIVACY_PLOT))
    return written


def main(run_dirs: Sequence[Path], out: Path | None) -> int:
    """The ``fedfleet report`` command: write the report and say where it is."""
    written = write_report(run_dirs, out)
    print(f"fedfleet: report of {len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''} in {written[-1].parent}: "
          f"{written[-1].name} and {len(written) - 1} plots")
    return 0
