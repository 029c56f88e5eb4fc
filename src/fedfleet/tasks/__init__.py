"""Built-in tasks and the loader for a user's own (``module.path:Class``).

``load_task`` checks a task against the ``Task`` protocol when it is loaded, so that a missing method
is a clear error at start rather than an AttributeError in the middle of a run, and fills in the
optional statistics members a task leaves out (see ``fedfleet.tasks.base``).

A task may also have ``check_run(config) -> str | None``: why a run with these settings (strategy, DP,
secure aggregation, rounds) cannot train it; ``check_run`` below turns that into a ConfigError.

A task class may declare, as class attributes (the built-in ones all do):

- ``OPTIONS``, a tuple of ``fedfleet.options.Option``: the task options it takes, checked and converted
  to their types (defaults filled in) before the class is called, with the same messages as the run
  options. Without it the options go to the constructor as the strings they are.
- ``TRAINING_DEFAULTS``, e.g. ``{"lr": 0.1}``: the local training settings (``local_epochs``,
  ``batch_size``, ``lr``) it is best trained with, used by a run that does not set them itself.
- ``score_name``: what the score its ``evaluate`` returns is (default ``accuracy``), e.g. ``mean``
  for a task whose ``evaluate`` returns ``{"loss": ..., "mean": ...}``. Runs show it under that name.

The parent of a run (``fedfleet run``, ``fedfleet coordinator``) checks a task's name and options with
``find_task`` and ``task_arguments`` before it starts anything.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

from fedfleet.errors import ConfigError, TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec
from fedfleet.tasks.base import Dataset, FitResult, NoStats, Task, TrainParams, site_task
from fedfleet.types import Schema, Weights

BUILTIN = {
    "songs": "fedfleet.tasks.songs:SongsTask",
    "songs-mlp": "fedfleet.tasks.songs_mlp:SongsMlpTask",
    "mnist": "fedfleet.tasks.mnist:MnistTask",
    "fashion-mnist": "fedfleet.tasks.mnist:FashionMnistTask",
    "null": "fedfleet.tasks.null:NullTask",
    "images": "fedfleet.tasks.images:ImagesTask",
    "tabular": "fedfleet.tasks.tabular:TabularTask",
}
REQUIRED = ("init_weights", "load_test", "load_partition", "fit", "evaluate")
STATISTICS = ("stats_schema", "local_stats", "apply_stats")  # all or none; check_stats is optional either way
TRAINING = ("local_epochs", "batch_size", "lr")  # the settings a task may recommend (TRAINING_DEFAULTS)
SCORE = "accuracy"  # the score's name unless a task names its own (score_name)


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


def find_task(name: str) -> Callable[..., object]:
    """The class (or factory) the task ``name`` refers to, imported but not called; TaskError if none."""
    target = BUILTIN.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        close = difflib.get_close_matches(name, BUILTIN, n=1)
        raise TaskError(f"unknown task {name!r}: use one of {', '.join(sorted(BUILTIN))}, "
                        "or module.path:Class for your own" + (f" (did you mean {close[0]!r}?)" if close else ""))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TaskError(f"cannot import task module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise TaskError(f"task module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise TaskError(f"task {name!r} is not a class: {factory!r}")
    return cast(Callable[..., object], factory)


def declared_options(factory: Callable[..., object], name: str) -> tuple[Option, ...] | None:
    """The task's ``OPTIONS``, or None if it declares none (its options then go to it unchecked)."""
    declared = getattr(factory, "OPTIONS", None)
    if declared is None:
        return None
    if not isinstance(declared, tuple) or not all(isinstance(o, Option) for o in declared):
        raise TaskError(f"task {name!r} has OPTIONS that are not a tuple of fedfleet.options.Option")
    return declared


def task_arguments(factory: Callable[..., object], name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``factory`` is called with: ``options`` checked against its ``OPTIONS``,
    converted, defaults filled in; ConfigError names a bad option. Without ``OPTIONS``, ``options`` as given."""
    declared = declared_options(factory, name)
    if declared is None:
        return dict(options)
    known = {o.name: o for o in declared}
    for key in options:
        if key not in known:
            takes = f"the options {', '.join(known)}" if known else "no options"
            raise ConfigError(f"The task {name!r} takes {takes}. Got {key!r} instead.", option="task_options")
    return {k: o.check(options[k], "task option") if k in options else o.default for k, o in known.items()}


def training_defaults(factory: Callable[..., object], name: str) -> dict[str, Any]:
    """The training settings the task recommends (its ``TRAINING_DEFAULTS``), to use where a run sets none."""
    declared = getattr(factory, "TRAINING_DEFAULTS", {})
    if not isinstance(declared, Mapping) or not set(declared) <= set(TRAINING):
        raise TaskError(f"task {name!r} has TRAINING_DEFAULTS that are not a mapping with keys among "
                        f"{', '.join(TRAINING)}: {declared!r}")
    return dict(declared)


def score_name(factory: object) -> str:
    """What the task's score is called (its ``score_name``; ``accuracy`` by default)."""
    name = getattr(factory, "score_name", SCORE)
    return name if isinstance(name, str) and name else SCORE


def score_low(task: object) -> float:
    """The lowest honest value of the task's score (its ``score_low``; 0 for an accuracy). Workers' validation
    scores below it are not counted in the federated evaluation: an R² may be negative, an accuracy not."""
    low = getattr(task, "score_low", 0.0)
    return float(low) if isinstance(low, int | float) and not isinstance(low, bool) else 0.0


def load_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """Instantiate the task called ``name`` with its options (strings, or values of its ``OPTIONS``' types):
    TaskError says what went wrong with the task, ConfigError which option is bad."""
    factory = find_task(name)
    kwargs = task_arguments(factory, name, options or {})
    try:
        task = factory(**kwargs)
    except TypeError as exc:
        raise TaskError(f"task {name!r} does not accept options {dict(options or {})}: {exc}") from exc
    return complete(task, name)


def complete(task: object, name: str) -> Task:
    """``task`` checked against the Task protocol, with defaults for the optional members it lacks.

    A task with every member and the default score is returned as it is (its class still matters,
    e.g. to the predict page); one without statistics members or ``check_stats``, or with a
    ``score_name`` of its own, is wrapped in ``TaskWithDefaults``.
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
    if has and check is not None and score_name(task) == SCORE:
        return cast(Task, task)
    return TaskWithDefaults(task, statistics=bool(has))


def check_ready(task: object) -> None:
    """TaskError if the task says its options cannot make a run (its ``check_ready``), e.g. the tabular
    task without the column to predict. A task built with its defaults is still a valid object, so this is
    asked where a run starts, not at load."""
    ready = getattr(task, "check_ready", None)
    if callable(ready):
        ready()


def check_run(task: object, config: Any) -> None:
    """ConfigError if the task says it cannot be trained by a run with ``config`` (a RunConfig): its
    ``check_run(config) -> str | None``, e.g. trees that need the workers' plain mean and a round per level.
    Asked where a run is configured and where a coordinator starts, before anything is written."""
    own = getattr(task, "check_run", None)
    problem = own(config) if callable(own) else None
    if problem:
        raise ConfigError(str(problem), option="task_options")


def with_plan(task: Task, plan: Mapping[str, Any]) -> Task:
    """``task`` set up with the run's ``plan`` (its ``with_plan``), checked and completed like a loaded task."""
    return complete(site_task(task).with_plan(plan), task.name)


class TaskWithDefaults:
    """A task lacking optional members, completed: without statistics members it gets ``NoStats``'s
    (no statistics round); without ``check_stats``, one that accepts every report. A score of its own
    (``score_name``) is also reported as ``accuracy``, the name the coordinator and workers read. Every
    other attribute is the task's own."""

    def __init__(self, task: object, *, statistics: bool) -> None:
        self.inner = cast(Task, task)
        self.name: str = self.inner.name
        self._stats: Task | NoStats = self.inner if statistics else NoStats()
        own_check = getattr(task, "check_stats", None)
        self._check = own_check if callable(own_check) else NoStats().check_stats
        self._score = score_name(task)

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
        metrics = self.inner.evaluate(weights, data)
        if self._score == SCORE:
            return metrics
        if self._score not in metrics:
            raise TaskError(f"task {self.name!r} names its score {self._score!r}, but its evaluate returned only "
                            f"{', '.join(sorted(metrics))}")
        return {**metrics, SCORE: metrics[self._score]}

    def evaluate_confusion(self, weights: Weights, data: Dataset) -> tuple[dict[str, float], Any]:
        """The task's own ``evaluate_confusion`` with the score named as ``evaluate`` names it; without one,
        ``evaluate`` and no counts (see ``base.evaluate_with_confusion``)."""
        own = getattr(self.inner, "evaluate_confusion", None)
        if not callable(own):
            return self.evaluate(weights, data), None
        metrics, counts = own(weights, data)
        if self._score != SCORE and self._score in metrics:
            metrics = {**metrics, SCORE: metrics[self._score]}
        return metrics, counts

    def __getattr__(self, attr: str) -> Any:
        # Only reached for what this class lacks: the task's own extras. "inner" itself is guarded, so
        # that a half-built instance (copy, pickle) raises AttributeError instead of recursing.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"TaskWithDefaults({self.inner!r})"


__all__ = ["BUILTIN", "Dataset", "FitResult", "NoStats", "Task", "TaskWithDefaults", "TrainParams",
           "check_allowed", "check_ready", "check_run", "complete", "declared_options", "find_task", "load_task",
           "score_low", "score_name", "task_arguments", "training_defaults", "with_plan"]
