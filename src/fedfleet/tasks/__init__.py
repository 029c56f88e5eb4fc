"""Built-in tasks and the loader for a user's own (``module.path:Class``).

``load_task`` checks a task against the ``Task`` protocol when it is loaded, so that a missing method
is a clear error at start rather than an AttributeError in the middle of a run, and fills in the
optional statistics members a task leaves out (see ``fedfleet.tasks.base``).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping
from typing import Any, cast

from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec
from fedfleet.tasks.base import Dataset, FitResult, NoStats, Task, TrainParams
from fedfleet.types import Schema, Weights

BUILTIN = {
    "songs": "fedfleet.tasks.songs:SongsTask",
    "songs-mlp": "fedfleet.tasks.songs_mlp:SongsMlpTask",
    "mnist": "fedfleet.tasks.mnist:MnistTask",
    "fashion-mnist": "fedfleet.tasks.mnist:FashionMnistTask",
    "null": "fedfleet.tasks.null:NullTask",
}
REQUIRED = ("init_weights", "load_test", "load_partition", "fit", "evaluate")
STATISTICS = ("stats_schema", "local_stats", "apply_stats")  # all or none; check_stats is optional either way


def check_allowed(name: str, allowed: Collection[str], refusal: str) -> None:
    """TaskError unless ``name`` is a built-in task or in ``allowed`` (the operator's ``--allow-task``).

    Loading a task imports a module and calls it: a task named by someone else (a coordinator, a run
    folder's config.toml) must not run code the operator did not choose. ``refusal`` starts the
    message, saying who asked for the task.
    """
    if name in BUILTIN or name in BUILTIN.values() or name in allowed:
        return
    raise TaskError(f"{refusal}: built-in tasks are {', '.join(sorted(BUILTIN))}; "
                    f"pass --allow-task {name} to load it, if you trust its code")


def load_task(name: str, options: Mapping[str, str] | None = None) -> Task:
    """Instantiate the task called ``name`` with its string options; TaskError says what went wrong."""
    target = BUILTIN.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"unknown task {name!r}: use one of {', '.join(sorted(BUILTIN))}, "
                        "or module.path:Class for your own")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import task module {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise TaskError(f"task module {module_name!r} has no attribute {attr!r}")
    try:
        task = cls(**dict(options or {}))
    except TypeError as exc:
        raise TaskError(f"task {name!r} does not accept options {dict(options or {})}: {exc}") from exc
    return complete(task, name)


def complete(task: object, name: str) -> Task:
    """``task`` checked against the Task protocol, with defaults for the optional members it lacks.

    A task with every member is returned as it is (its class still matters, e.g. to the predict
    page); one without statistics members or ``check_stats`` is wrapped in ``TaskWithDefaults``.
    """
    missing = [m for m in REQUIRED if not callable(getattr(task, m, None))]
    if not isinstance(getattr(task, "name", None), str):
        missing.insert(0, "name (a str attribute)")
    if missing:
        raise TaskError(f"task {name!r} lacks {', '.join(missing)}: every task needs a name and the methods "
                        f"{', '.join(REQUIRED)} (see fedfleet.tasks.base.Task)")
    has = [m for m in STATISTICS if callable(getattr(task, m, None))]
    if has and len(has) < len(STATISTICS):
        lacking = [m for m in STATISTICS if m not in has]
        raise TaskError(f"task {name!r} has {', '.join(has)} but lacks {', '.join(lacking)}: a task with "
                        f"statistics needs all of {', '.join(STATISTICS)} (one with none of them has no "
                        "statistics round)")
    check = getattr(task, "check_stats", None)
    if check is not None and not callable(check):
        raise TaskError(f"task {name!r} has a check_stats that is not a method")
    if has and check is not None:
        return cast(Task, task)
    return TaskWithDefaults(task, statistics=bool(has))


class TaskWithDefaults:
    """A task lacking optional members, completed: without statistics members it gets ``NoStats``'s
    (no statistics round); without ``check_stats``, one that accepts every report. Every other
    attribute is the task's own."""

    def __init__(self, task: object, *, statistics: bool) -> None:
        self.inner = cast(Task, task)
        self.name: str = self.inner.name
        self._stats: Task | NoStats = self.inner if statistics else NoStats()
        own_check = getattr(task, "check_stats", None)
        self._check = own_check if callable(own_check) else NoStats().check_stats

    def init_weights(self, seed: int) -> Weights:
        return self.inner.init_weights(seed)

    def load_test(self) -> Dataset:
        return self.inner.load_test()

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        return self.inner.load_partition(spec, index, count, seed)

    def stats_schema(self) -> Schema | None:
        return self._stats.stats_schema()

    def local_stats(self, data: Dataset) -> Weights:
        return self._stats.local_stats(data)

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        return self._stats.apply_stats(weights, sums)

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        problem: str | None = self._check(stats, num_examples)
        return problem

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        return self.inner.fit(weights, data, params)

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return self.inner.evaluate(weights, data)

    def __getattr__(self, attr: str) -> Any:
        # Only reached for what this class lacks: the task's own extras. "inner" itself is guarded, so
        # that a half-built instance (copy, pickle) raises AttributeError instead of recursing.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"TaskWithDefaults({self.inner!r})"


__all__ = ["BUILTIN", "Dataset", "FitResult", "NoStats", "Task", "TaskWithDefaults", "TrainParams",
           "check_allowed", "complete", "load_task"]
