"""``load_task``: every member of the Task protocol checked at load, the optional statistics members
defaulted, and which tasks a command may load at all (``check_allowed``)."""

from __future__ import annotations

import numpy as np
import pytest

from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import (
    BUILTIN,
    Dataset,
    FitResult,
    NoStats,
    Task,
    TaskWithDefaults,
    TrainParams,
    check_allowed,
    load_task,
)
from fedfleet.types import Schema, TensorSpec, Weights

HERE = __name__  # this module, importable by the loader as tests import it


class Minimal:
    """The required members only: no statistics round, every report accepted."""

    name = "minimal"

    def __init__(self, size: str = "3") -> None:
        self.size = int(size)

    def init_weights(self, seed: int) -> Weights:
        return {"w": np.full(self.size, float(seed), dtype=np.float32)}

    def load_test(self) -> Dataset:
        return Dataset(np.zeros((2, 1)), np.zeros(2, dtype=np.int64))

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        return Dataset(np.full((index + 1, 1), float(index)), np.zeros(index + 1, dtype=np.int64))

    def fit(self, weights: Weights, data: Dataset, params: TrainParams) -> FitResult:
        return FitResult({"w": weights["w"] + 1}, len(data), {"train_loss": 0.5})

    def evaluate(self, weights: Weights, data: Dataset) -> dict[str, float]:
        return {"loss": float(weights["w"].sum()), "accuracy": 1.0}

    def extra(self) -> str:
        return "the task's own"


class WithStats(Minimal):
    """Statistics without check_stats: its own statistics, and every report accepted."""

    def stats_schema(self) -> Schema | None:
        return (TensorSpec("n", "float64", (1,)),)

    def local_stats(self, data: Dataset) -> Weights:
        return {"n": np.array([float(len(data))])}

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        return {"w": weights["w"] * 0 + sums["n"][0]}


class Complete(WithStats):
    def check_stats(self, stats: Weights, num_examples: int) -> str | None:
        return None if stats["n"][0] == num_examples else "n is not num_examples"


class NoFit(Minimal):
    fit = None  # type: ignore[assignment]


class NoName(Minimal):
    name = None  # type: ignore[assignment]


class NothingButName:
    name = "bare"


class SchemaOnly(Minimal):
    def stats_schema(self) -> Schema | None:
        return (TensorSpec("n", "float64", (1,)),)


class StatsWithoutSchema(Minimal):
    def local_stats(self, data: Dataset) -> Weights:
        return {}

    def apply_stats(self, weights: Weights, sums: Weights) -> Weights:
        return weights


class CheckNotCallable(Complete):
    check_stats = "yes"  # type: ignore[assignment]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_tasks_load_as_their_own_class_with_every_member(name: str) -> None:
    if name in ("songs-mlp", "mnist", "fashion-mnist", "images"):
        pytest.importorskip("torch")
    task = load_task(name)
    assert not isinstance(task, TaskWithDefaults)  # complete already: not wrapped
    module, _, cls = BUILTIN[name].partition(":")
    assert type(task).__module__ == module and type(task).__name__ == cls
    assert isinstance(task, Task)
    assert callable(task.check_stats)


def test_a_complete_task_is_returned_as_it_is() -> None:
    task = load_task(f"{HERE}:Complete")
    assert type(task) is Complete
    assert task.check_stats({"n": np.array([2.0])}, 3) == "n is not num_examples"


def test_a_task_without_statistics_gets_the_defaults() -> None:
    task = load_task(f"{HERE}:Minimal", {"size": "4"})
    assert isinstance(task, TaskWithDefaults)
    assert isinstance(task, Task)
    assert task.name == "minimal"
    assert task.stats_schema() is None
    data = task.load_partition(PartitionSpec("iid"), 2, 3, 0)
    assert len(data) == 3
    assert task.local_stats(data) == {}
    w = task.init_weights(7)
    np.testing.assert_array_equal(w["w"], np.full(4, 7.0, dtype=np.float32))
    assert task.apply_stats(w, {}) is w
    assert task.check_stats({"anything": np.array([np.inf])}, 1) is None
    fit = task.fit(w, data, TrainParams(1, 1, 0.1, 0))
    np.testing.assert_array_equal(fit.weights["w"], w["w"] + 1)
    assert task.evaluate(w, task.load_test()) == {"loss": 28.0, "accuracy": 1.0}
    assert task.extra() == "the task's own"  # what the protocol does not name passes through
    assert task.size == 4


def test_a_task_with_statistics_but_no_check_accepts_every_report() -> None:
    task = load_task(f"{HERE}:WithStats")
    assert isinstance(task, TaskWithDefaults)
    assert task.stats_schema() == (TensorSpec("n", "float64", (1,)),)
    data = task.load_partition(PartitionSpec("iid"), 1, 2, 0)
    assert task.local_stats(data)["n"][0] == 2.0
    assert task.apply_stats(task.init_weights(0), {"n": np.array([5.0])})["w"][0] == 5.0
    assert task.check_stats({"n": np.array([-1.0])}, 1) is None


def test_no_stats_accepts_every_report() -> None:
    assert NoStats().check_stats({"x": np.array([np.nan])}, 3) is None


@pytest.mark.parametrize(("cls", "message"), [
    ("NoFit", "task '{}' lacks fit: every task needs a name and the methods init_weights, load_test, "
              "load_partition, fit, evaluate"),
    ("NoName", r"task '{}' lacks name \(a str attribute\):"),
    ("NothingButName", "task '{}' lacks init_weights, load_test, load_partition, fit, evaluate:"),
    ("SchemaOnly", "task '{}' has stats_schema but lacks local_stats, apply_stats: a task with statistics needs "
                   "all of stats_schema, local_stats, apply_stats"),
    ("StatsWithoutSchema", "task '{}' has local_stats, apply_stats but lacks stats_schema:"),
    ("CheckNotCallable", "task '{}' has a check_stats that is not a method"),
])
def test_an_incomplete_task_fails_at_load_naming_what_it_lacks(cls: str, message: str) -> None:
    name = f"{HERE}:{cls}"
    with pytest.raises(TaskError, match=message.format(name)):
        load_task(name)


def test_unknown_and_malformed_names_are_task_errors() -> None:
    with pytest.raises(TaskError, match="unknown task 'nope': use one of fashion-mnist, images, mnist, null, "
                                        "songs, songs-mlp, tabular"):
        load_task("nope")
    with pytest.raises(TaskError, match="cannot import task module 'no_such_module_here'"):
        load_task("no_such_module_here:Task")
    with pytest.raises(TaskError, match=f"task module '{HERE}' has no attribute 'Missing'"):
        load_task(f"{HERE}:Missing")
    with pytest.raises(TaskError, match=r"does not accept options \{'colour': 'red'\}"):
        load_task(f"{HERE}:Minimal", {"colour": "red"})


@pytest.mark.parametrize("name", [*sorted(BUILTIN), BUILTIN["songs"], "mine:Task"])
def test_built_in_and_allowed_tasks_are_allowed(name: str) -> None:
    check_allowed(name, ("mine:Task",), "refused")


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "mine:Other"])
def test_other_tasks_are_refused_naming_allow_task(name: str) -> None:
    with pytest.raises(TaskError) as info:
        check_allowed(name, ("mine:Task",), f"this run's task {name!r} is not loaded")
    assert str(info.value) == (f"this run's task {name!r} is not loaded: built-in tasks are fashion-mnist, "
                               "images, mnist, null, songs, songs-mlp, tabular; pass --allow-task "
                               f"{name} to load it, if you trust its code")
