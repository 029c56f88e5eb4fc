"""``fedfleet serve DIR`` on a folder of runs: which folders under DIR are runs, and what the run list shows.

A run folder is one with a ``config.toml`` (``fedfleet run``, ``simulate`` and ``coordinator`` write it
when a run starts). DIR's subfolders are looked through to ``MAX_DEPTH`` levels; a run folder is not
looked into. A folder with no run anywhere beneath it is *skipped*, and the page says so; a run whose
files cannot be read is listed with its error, so one damaged folder never hides the others.

Every run is named by its path under DIR ("sweep/lr-0.1"), and only names found by the last scan are
served: a name in a URL is looked up, never joined to a path, so ``..`` reaches nothing. The list is
rescanned each time it is asked for; a run's files are read again only when their size or time changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedfleet.config import differing_options, flat_options
from fedfleet.coordinator.server import ADDRESS_FILE
from fedfleet.errors import FedfleetError
from fedfleet.storage.records import RoundRecord, RunSummary
from fedfleet.storage.run_dir import CONFIG, METRICS, MODEL, SUMMARY, RunDir

MAX_DEPTH = 3  # levels of folders under DIR looked through: runs/sweep/seed-1 is found, deeper is not
MAX_RUNS = 1000  # a folder of more runs than a page can show is cut here, and the page says so


def is_run(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


@dataclass(frozen=True)
class RunEntry:
    """One row of the run list: what a run is and how far it got, from its files."""

    name: str  # its path under DIR, "/"-separated; its dashboard is /runs/NAME/
    state: str  # summary.json's (finished, failed, stopped); "running" or "incomplete" without one; "damaged"
    run_id: str | None = None
    task: str | None = None
    rounds: int = 0  # completed
    rounds_planned: int | None = None
    final: float | None = None  # the final model's score (accuracy, or R² for regression)
    best: float | None = None  # the best round's score...
    best_round: int | None = None  # ...and that round
    scored_by: str = "test"  # "test": the held-out set; "federated": the workers' validation splits
    ended: float | None = None  # unix seconds the run last wrote: its summary, else its last round
    message: str = ""
    options: dict[str, str] = field(default_factory=dict)  # config.flat_options: what the run was set to
    error: str | None = None  # why the folder cannot be read (state "damaged")
    dashboard: bool = False  # it has what its dashboard needs: a summary and a final model

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = _finite(asdict(self))
        return row


@dataclass(frozen=True)
class Skipped:
    name: str
    why: str


@dataclass(frozen=True)
class Scan:
    runs: list[RunEntry]
    skipped: list[Skipped]
    truncated: bool = False  # more than MAX_RUNS runs were found

    def to_dict(self) -> dict[str, Any]:
        readable = [r.options for r in self.runs if r.error is None]  # a damaged run has no options to compare
        return {"runs": [r.to_dict() for r in self.runs], "skipped": [asdict(s) for s in self.skipped],
                "truncated": self.truncated, "differing": differing_options(readable)}


def find_runs(root: Path, max_depth: int = MAX_DEPTH) -> tuple[list[Path], list[Skipped]]:
    """The run folders under ``root`` (not ``root`` itself), in name order, and the folders skipped: a folder
    with no run anywhere beneath it is named once, not with each of its subfolders."""
    runs: list[Path] = []

    def walk(folder: Path, depth: int) -> list[Skipped]:
        try:
            children = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
        except OSError as exc:
            return [Skipped(_name(root, folder), f"cannot be listed: {exc.strerror or exc}")]
        skipped: list[Skipped] = []
        for child in children:
            if is_run(child):
                runs.append(child)
                continue
            before = len(runs)
            inside = walk(child, depth + 1) if depth < max_depth else []
            if len(runs) > before:
                skipped += inside  # a folder of runs: what in it is not a run is named
            else:
                why = "no config.toml in it" + (" or in its subfolders" if depth < max_depth else "")
                skipped.append(Skipped(_name(root, child), f"not a run: {why}"))
        return skipped

    skipped = walk(root, 1)
    return runs, skipped


def _name(root: Path, folder: Path) -> str:
    return folder.relative_to(root).as_posix()


def read_entry(root: Path, folder: Path) -> RunEntry:
    """``folder``'s row of the list; a file that cannot be read gives a "damaged" row naming it."""
    name = _name(root, folder)
    run_dir = RunDir(folder)
    try:
        config = run_dir.read_config()
        summary = run_dir.read_summary()
        records = run_dir.read_rounds() if run_dir.metrics_path.is_file() else []
    except FedfleetError as exc:
        return RunEntry(name, "damaged", error=_relative(str(exc), root), ended=_mtime(folder / CONFIG))
    scored_by = _scored_by(summary, records)
    best_round, best = _best(records, scored_by)
    ended = _mtime(run_dir.summary_path if summary else run_dir.metrics_path) or _mtime(run_dir.config_path)
    entry = RunEntry(name, _state(folder, summary), task=config.task, rounds=len(records),
                     rounds_planned=config.rounds, best=best, best_round=best_round, scored_by=scored_by,
                     ended=ended, options=flat_options(config.to_dict()),
                     final=_score(records[-1], scored_by) if records else None)
    if summary is None:
        return entry
    final = summary.final_fed_accuracy if scored_by == "federated" else summary.final_accuracy
    return _replace(entry, run_id=summary.run_id, rounds=summary.rounds, final=final, message=summary.message,
                    dashboard=run_dir.model_path.is_file())


def _relative(message: str, root: Path) -> str:
    """``message`` with the served folder's own path left out: the page names a run by its name under it, and
    a viewer learns nothing of the server's file system."""
    return message.replace(f"{root}{os.sep}", "").replace(str(root), ".")


def _replace(entry: RunEntry, **changes: Any) -> RunEntry:
    return RunEntry(**{**asdict(entry), **changes})


def _state(folder: Path, summary: RunSummary | None) -> str:
    if summary is not None:
        return summary.state
    # A coordinator writes its address while it serves and removes it on every way out.
    return "running" if (folder / ADDRESS_FILE).is_file() else "incomplete"


def _scored_by(summary: RunSummary | None, records: Sequence[RoundRecord]) -> str:
    if summary is not None:
        return summary.evaluation
    if any(r.accuracy is not None for r in records) or not any(r.fed_accuracy is not None for r in records):
        return "test"
    return "federated"


def _score(record: RoundRecord, scored_by: str) -> float | None:
    return record.fed_accuracy if scored_by == "federated" else record.accuracy


def _best(records: Iterable[RoundRecord], scored_by: str) -> tuple[int | None, float | None]:
    """The round with the highest score (the earliest of equals) and that score."""
    scored = [(s, -r.round) for r in records if (s := _score(r, scored_by)) is not None]
    if not scored:
        return None, None
    score, minus_round = max(scored)
    return -minus_round, score


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _finite(obj: Any) -> Any:
    """JSON has no NaN or Infinity: such a value (none should be in a run's files) is sent as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


class Catalog:
    """The runs under ``root``, scanned again on each ``scan()``; a run's row is read again only when
    one of its files changed (its stamp: size and time of each)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._rows: dict[Path, tuple[tuple[tuple[int, int], ...], RunEntry]] = {}
        self._paths: dict[str, Path] = {}

    def scan(self) -> Scan:
        found, skipped = find_runs(self.root)
        truncated = len(found) > MAX_RUNS
        found = found[:MAX_RUNS]
        rows = {}
        for folder in found:
            stamp = run_stamp(folder)
            cached = self._rows.get(folder)
            rows[folder] = cached if cached is not None and cached[0] == stamp else (stamp, read_entry(self.root,
                                                                                                       folder))
        self._rows = rows
        self._paths = {_name(self.root, folder): folder for folder in found}
        return Scan([row for _, row in rows.values()], skipped, truncated)

    def path(self, name: str) -> Path | None:
        """The folder of the run named ``name`` by a scan; a name not seen yet triggers one (a run made since)."""
        if name not in self._paths:
            self.scan()
        return self._paths.get(name)

    def names(self) -> list[str]:
        return list(self._paths)

    def rounds(self, name: str) -> list[dict[str, Any]]:
        """The run's rounds, for the compare view: each round's score and loss (test or federated, as the run
        is scored) and its seconds."""
        folder = self.path(name)
        if folder is None:
            raise KeyError(name)
        entry = self._rows[folder][1] if folder in self._rows else read_entry(self.root, folder)
        run_dir = RunDir(folder)
        records = run_dir.read_rounds() if run_dir.metrics_path.is_file() else []
        federated = entry.scored_by == "federated"
        rows: list[dict[str, Any]] = _finite([{"round": r.round, "score": _score(r, entry.scored_by),
                         "loss": r.fed_loss if federated else r.loss, "seconds": r.seconds} for r in records])
        return rows

    def entry(self, name: str) -> RunEntry | None:
        folder = self.path(name)
        if folder is None:
            return None
        stamp = run_stamp(folder)
        cached = self._rows.get(folder)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_entry(self.root, folder))
            self._rows[folder] = cached
        return cached[1]


def run_stamp(folder: Path) -> tuple[tuple[int, int], ...]:
    """Size and modification time of the files a run's row is read from: a change in any reads it again."""
    stamps = []
    for name in (CONFIG, SUMMARY, METRICS, ADDRESS_FILE, MODEL):
        try:
            st = os.stat(folder / name)
            stamps.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stamps.append((-1, -1))
    return tuple(stamps)
