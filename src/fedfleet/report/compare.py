"""What tells compared runs apart: every option whose value differs between them.

Runs are compared by their configs (summary.json's ``config``, else config.toml): an option set the same in
every run is "common" and said once; the others label each run (``fraction=0.5, local_epochs=2``). The task's
and the strategy's own options count as options too (``task.model``, ``strategy.mu``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedfleet.config import UNSET, differing_options, flat_options
from fedfleet.report.data import RunData


@dataclass(frozen=True)
class OptionDiff:
    differing: list[str]  # option names whose values are not the same in every run with a known config
    common: dict[str, str]  # options set to one value in all of them
    values: list[dict[str, str] | None]  # each run's options (None: its config is unknown)

    def of(self, index: int) -> list[tuple[str, str]]:
        """The differing options of run ``index`` with its values (UNSET where it leaves one unset)."""
        mine = self.values[index]
        return [] if mine is None else [(name, mine.get(name, UNSET)) for name in self.differing]


def option_diff(runs: Sequence[RunData]) -> OptionDiff:
    """The options that set ``runs`` apart, and those they share. A run whose config cannot be read
    (a folder with only metrics.jsonl) takes no part: it would make every option look different."""
    values = [flat_options(run.config) if run.config is not None else None for run in runs]
    known = [v for v in values if v is not None]
    names = list(dict.fromkeys(n for v in known for n in v))  # in config order: the first run's, then new ones
    differing = differing_options(known)
    common = {n: known[0][n] for n in names if n not in differing and all(n in v for v in known)} if known else {}
    return OptionDiff(differing, common, values)


def compare_labels(runs: Sequence[RunData]) -> list[str]:
    """Each run's label in a comparison: its folder name and every option that differs between the runs;
    with its epsilon (or "no DP") when the runs' epsilons differ, since privacy spent sets runs apart even
    when their options agree. One run alone keeps its own label (name, partition, workers).

    >>> from pathlib import Path
    >>> a = RunData(Path("a"), "a", [], None, "iid", 8, None, config={"partition": "iid", "fraction": 1.0})
    >>> b = RunData(Path("b"), "b", [], None, "iid", 8, None, config={"partition": "iid", "fraction": 0.5})
    >>> compare_labels([a, b])
    ['a (fraction=1.0)', 'b (fraction=0.5)']
    """
    if len(runs) == 1:
        return [runs[0].label]
    diff = option_diff(runs)
    epsilons = [_epsilon_label(run.epsilon) for run in runs]
    labels = []
    for i, name in enumerate(unique_names([r.name for r in runs])):
        details = [f"{k}={v}" for k, v in diff.of(i)] if diff.values[i] is not None else ["options unknown"]
        if len(set(epsilons)) > 1:
            details.append(epsilons[i])
        labels.append(f"{name} ({', '.join(details)})" if details else name)
    return labels


def _epsilon_label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"ε {epsilon:.3g}"


def unique_names(names: Sequence[str]) -> list[str]:
    """Runs' names made unique (their plots' folders, their labels): numbered where two runs share one.

    >>> unique_names(["songs", "songs", "x"])
    ['songs', 'songs-2', 'x']
    """
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}-{n}"
        out.append(candidate)
    return out
