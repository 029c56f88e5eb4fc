"""What a task is: data loading, a model's initial weights, local training and evaluation.

A task is used by both sides: the coordinator calls ``init_weights``, ``load_test`` and ``evaluate``;
a worker calls ``load_partition``, ``local_stats`` and ``fit``. Plug in your own by writing a class
with these methods and passing ``--task your.module:YourTask`` (see the README).

The statistics members (``stats_schema``, ``local_stats``, ``apply_stats`` and ``check_stats``) are
optional: ``load_task`` fills in the defaults of ``NoStats`` (no statistics round, every report
accepted) for a task that has none of them. A task with statistics needs the first three.

Two more optional groups of members, in ``SiteTask``:

- ``load_site``: the task can train on a site's own files (``fedfleet worker --data PATH``) instead
  of a partition of one shared data set; the coordinator's ``--test-data`` is read with it too.
- ``describe``, ``check_description``, ``make_plan``, ``with_plan``: before the first round the task
  agrees a *plan* from every site's description of its data (aggregates only: column names and types,
  counts, sums, category values and their counts; never rows). The plan fixes what a central pipeline
  would compute from all the data (label classes, vocabularies, means and scales): the model's shape
  follows from it, so ``init_weights``, ``fit``, ``evaluate`` and ``load_test`` are called only on the
  task ``with_plan`` returns. Descriptions and plans are JSON objects (dicts of str, numbers, lists).

A task that agrees a plan may also have ``check_against_plan(description, plan) -> str | None``: why a
site that joins after the plan was agreed cannot train under it (e.g. an image class the model has no
output for); the coordinator refuses it with that message.

A classification task may say its classes: ``class_names()`` (or a ``classes`` attribute, as a
``Predictor`` has), the names in the order of its outputs and labels (``class_names`` below reads either).
With them, the dashboard names the classes of a worker's label mix and of the confusion matrix; a task
may also have ``evaluate_confusion(weights, data) -> (scores, counts)``: ``evaluate``'s scores and the
confusion counts (true class × predicted class) of the same pass (``evaluate_with_confusion`` below).
A worker reports its label mix (its training examples per class index, counts only) from
``label_counts(data)`` if the task has it, else from a ``Dataset``'s labels (``label_counts`` below).

A task may also have ``check_ready()``: the coordinator calls it before it creates a run, and a
TaskError from it (e.g. "needs --task-option label=COLUMN") ends the start with that message.

Data a task loads (``load_partition``, ``load_site``, ``load_test``) is opaque to fedfleet: it is
passed back to the same task's methods and only ``len()`` of it is taken. ``Dataset`` (arrays in
memory) is what the built-in array tasks use; a task may return anything with ``__len__`` (e.g. a
stream over files larger than memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np

from fedfleet.partition import PartitionSpec
from fedfleet.storage.records import MAX_CONFUSION_CLASSES
from fedfleet.types import Schema, Weights


@dataclass(frozen=True)
class Dataset:
    """Examples as arrays: features ``x`` (n × d) and integer labels ``y`` (n)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TrainParams:
    """The local training settings a worker receives with each round's task."""

    local_epochs: int
    batch_size: int
    lr: float
    seed: int  # differs per round and worker, so shuffles differ but runs stay reproducible
    prox_mu: float = 0.0  # FedProx: add μ·(w − w_global) to the gradient; 0 for plain local SGD


@dataclass(frozen=True)
class FitResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def init_weights(self, seed: int) -> Weights:
        """The initial global model."""
        ...

    def load_test(self) -> Dataset:
        """The coordinator's held-out evaluation set."""
        ...

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        """Worker ``index`` of ``count``'s share of the training data."""
        ...

    def stats_schema(self) -> Schema | None:
        """Schema of the statistics each worker reports before training, or None if none are needed."""
        ...

    def local_stats(self, data: Dataset) -> Weights:
        """This worker's statistics (e.g. count, sum, sum of squares): summed across workers."""
        ...

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        """The model updated with the combined statistics (e.g. a standardisation layer)."""
        ...

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        """Why one worker's statistics report is implausible (naming the tensor and the bound), or None.

        Called by the coordinator on each report, after its schema and finiteness were checked; a
        message makes the report a 422 (reason ``bad_stats``) instead of a term of the sum.
        """
        ...

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        """Train locally from ``weights`` and return the new weights."""
        ...

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        """At least ``loss`` and the score of ``weights`` on ``data``: ``accuracy``, unless the task names
        its score otherwise with a ``score_name`` class attribute (see ``fedfleet.tasks``)."""
        ...


Description = dict[str, Any]  # JSON-able: what one site reports of its data for the plan
Plan = dict[str, Any]  # JSON-able: what every site and the coordinator use, agreed from the descriptions


@runtime_checkable
class SiteTask(Protocol):
    """The optional members of a task that trains on each site's own files and agrees a plan first.

    ``load_site`` alone is enough for ``--data``; the four plan members come together (all or none).
    """

    def load_site(self, paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[Any, Any | None]:
        """This site's own files (each a file or a folder), as (training data, validation data or None).

        ``val_fraction`` of the examples (chosen with ``seed``, reproducibly) is kept apart to score the
        global model on (federated evaluation); 0 keeps none. TaskError names the file and what was
        wrong with it (missing, empty, not a format the task reads).
        """
        ...

    def describe(self, data: Any) -> Description:
        """Aggregates of this site's ``data`` that the plan is made from: never rows."""
        ...

    def check_description(self, description: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str | None:
        """Why ``description`` (sent by a worker: untrusted) cannot be part of the run, or None.

        Malformed, out of range, or (given the ``reference``, the first description the run accepted)
        data that differs from the other sites': the message names the columns and types that differ.
        """
        ...

    def make_plan(self, descriptions: Sequence[Mapping[str, Any]]) -> Plan:
        """The plan, from the accepted descriptions of all the sites (each checked already)."""
        ...

    def with_plan(self, plan: Mapping[str, Any]) -> Task:
        """A new task set up with ``plan``; ``self`` is left as it was."""
        ...


def has_plan(task: object) -> bool:
    """Whether ``task`` agrees a plan from the sites' descriptions before training."""
    return all(callable(getattr(task, m, None)) for m in PLAN_MEMBERS)


def loads_sites(task: object) -> bool:
    """Whether ``task`` can train on a site's own files (``fedfleet worker --data``)."""
    return callable(getattr(task, "load_site", None))


PLAN_MEMBERS = ("describe", "check_description", "make_plan", "with_plan")


def site_task(task: object) -> SiteTask:
    """``task`` seen through its SiteTask members (check ``has_plan`` or ``loads_sites`` first)."""
    return cast(SiteTask, task)


class NoStats:
    """Mix in for a task that needs no statistics from the workers before training."""

    def stats_schema(self) -> Schema | None:
        return None

    def local_stats(self, data: Dataset) -> Weights:
        return {}

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        return weights

    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        return None




def class_names(task: object) -> list[str] | None:
    """The class names of a classification task, in the order of its outputs and labels: its
    ``class_names()``, else its ``classes`` attribute; None for a task that does not say (or does not
    classify: regression, a task whose classes are agreed in a plan it does not have yet).

    >>> class Eras:
    ...     classes = ("old", "new")
    >>> class_names(Eras()), class_names(object())
    (['old', 'new'], None)
    """
    named = getattr(task, "class_names", None)
    try:
        names = named() if callable(named) else getattr(task, "classes", None)
    except Exception:  # a task not set up yet (no plan) cannot say; it is not an error of the caller
        return None
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
        return None
    return list(names)


def evaluate_with_confusion(task: Any, weights: Weights, data: Any) -> tuple[dict[str, float], np.ndarray | None]:
    """``task.evaluate``'s scores of ``weights`` on ``data`` and, from the same pass, the confusion counts
    (rows: true class, columns: predicted class) when the task offers ``evaluate_confusion``; None when it
    does not, or for more than ``MAX_CONFUSION_CLASSES`` classes."""
    detailed = getattr(task, "evaluate_confusion", None)
    if not callable(detailed):
        return task.evaluate(weights, data), None
    scores, counts = detailed(weights, data)
    if counts is None:
        return scores, None
    counts = np.asarray(counts)
    k = counts.shape[0] if counts.ndim == 2 else 0
    if counts.shape != (k, k) or not 1 <= k <= MAX_CONFUSION_CLASSES:
        return scores, None
    return scores, counts.astype(np.int64)


def confusion_counts(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """classes × classes counts of (true, predicted) pairs; labels outside [0, classes) are left out.

    >>> confusion_counts(np.array([0, 1, 1, 2]), np.array([0, 1, 0, 2]), 3).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    t = np.asarray(true, dtype=np.int64)
    p = np.asarray(predicted, dtype=np.int64)
    ok = (t >= 0) & (t < classes) & (p >= 0) & (p < classes)
    out: np.ndarray = np.bincount(t[ok] * classes + p[ok], minlength=classes * classes).reshape(classes, classes)
    return out


def label_counts(task: Any, data: Any) -> list[int] | None:
    """How many of ``data``'s examples each class index of ``task`` has: the task's ``label_counts(data)``
    if it has one, else the labels of a ``Dataset``; None for a task that does not name its classes or
    data whose labels cannot be read here.

    >>> class Two:
    ...     classes = ("a", "b")
    >>> label_counts(Two(), Dataset(np.zeros((3, 1)), np.array([1, 1, 0])))
    [1, 2]
    """
    names = class_names(task)
    if names is None:
        return None
    own = getattr(task, "label_counts", None)
    if callable(own):
        counted = own(data)
        return None if counted is None else [int(n) for n in counted]
    if not isinstance(data, Dataset) or not np.issubdtype(np.asarray(data.y).dtype, np.integer):
        return None
    y = np.asarray(data.y, dtype=np.int64)
    y = y[(y >= 0) & (y < len(names))]
    return [int(n) for n in np.bincount(y, minlength=len(names))]
