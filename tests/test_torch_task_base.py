"""TorchTask: a user's PyTorch task from build_model() and load_data(source), on sites' files and on partitions."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conftest import Fleet, run_fedfleet
from fedfleet.errors import TaskError
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import TaskWithDefaults, load_task
from fedfleet.tasks.base import Dataset, TrainParams, has_plan, loads_sites
from fedfleet.tasks.torch_task import TorchTask

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASK = "torch_task:BlobsTask"


@pytest.fixture(scope="module")
def example() -> Iterator[Any]:
    """The module examples/torch_task.py, imported as a user's task module is."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import torch_task

        yield torch_task
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def sites(example: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """site-0.npz, site-1.npz, site-2.npz and test.npz."""
    paths: list[Path] = example.write_sites(tmp_path_factory.mktemp("blobs"), 3)
    return paths


class Pairs(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A Dataset yielding (input, target) pairs one at a time, as a lazy reader of files would."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x.astype(np.float32), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x[i]), torch.tensor(self.y[i])


def npz(paths: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(paths[0]) as f:
        return f["x"], f["y"]


class LazyBlobs(TorchTask):
    name = "lazy-blobs"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))

    def load_data(self, source: Sequence[Path]) -> Pairs:
        return Pairs(*npz(source))


class Regression(TorchTask):
    """Predict the first coordinate from the second: a score of its own, not an accuracy."""

    name = "regression"
    score_name = "mae"

    def build_model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def load_data(self, source: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
        x, _ = npz(source)
        return x[:, 1:], x[:, :1]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"mae": float((outputs - targets).abs().mean())}


class NoScore(Regression):
    score_name = "accuracy"


class Junk(LazyBlobs):
    def load_data(self, source: Sequence[Path]) -> Any:
        return {"x": 1}


class Unreadable(LazyBlobs):
    def load_data(self, source: Sequence[Path]) -> Any:
        with np.load(source[0]) as f:
            return f["no-such-array"], f["y"]


class Empty(LazyBlobs):
    def load_data(self, source: Sequence[Path]) -> Any:
        return np.zeros((0, 2)), np.zeros(0)


class ModelLess(TorchTask):
    name = "model-less"


def test_the_example_loads_as_it_is_a_task_on_sites_files_without_a_plan(example: Any) -> None:
    task = load_task(TASK)
    assert isinstance(task, example.BlobsTask) and task.name == "blobs"
    assert loads_sites(task) and not has_plan(task)
    assert task.data_at_sites
    assert not load_task(TASK, {"data": "all.npz"}).data_at_sites  # type: ignore[attr-defined]


def test_load_site_keeps_a_reproducible_validation_split(example: Any, sites: list[Path]) -> None:
    task = example.BlobsTask()
    train, val = task.load_site([sites[0]], 0.1, seed=3)
    assert (len(train), len(val)) == (180, 20)
    again_train, again_val = task.load_site([sites[0]], 0.1, seed=3)
    assert list(val.indices) == list(again_val.indices) and list(train.indices) == list(again_train.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(200))
    assert list(task.load_site([sites[0]], 0.1, seed=4)[1].indices) != list(val.indices)
    whole, none = task.load_site([sites[0], sites[1]], 0.0, seed=3)  # two files of one site: one data set
    assert none is None and len(whole) == 400


def test_fit_learns_and_is_reproducible_and_a_lazy_dataset_trains_the_same(example: Any, sites: list[Path]) -> None:
    task, lazy = example.BlobsTask(), LazyBlobs()
    train, _ = task.load_site([sites[0]], 0.1, seed=0)
    lazy_train, _ = lazy.load_site([sites[0]], 0.1, seed=0)
    init = task.init_weights(5)
    assert all(np.array_equal(init[k], task.init_weights(5)[k]) for k in init)
    assert not np.array_equal(init["0.weight"], task.init_weights(6)["0.weight"])
    assert all(v.dtype == np.float32 for v in init.values())
    params = TrainParams(local_epochs=3, batch_size=16, lr=0.1, seed=1)
    fit = task.fit(init, train, params)
    assert fit.num_examples == 180 and set(fit.metrics) == {"train_loss", "train_accuracy"}
    assert all(np.array_equal(fit.weights[k], task.fit(init, train, params).weights[k]) for k in init)
    # Items collated one by one or rows sliced out of tensors: the same batches, so the same model.
    slow = lazy.fit(init, lazy_train, params)
    assert all(np.array_equal(fit.weights[k], slow.weights[k]) for k in init)
    test = task.load_site([sites[-1]], 0.0, seed=0)[0]
    before, after = task.evaluate(init, test), task.evaluate(fit.weights, test)
    assert set(after) == {"loss", "accuracy"}
    assert after["accuracy"] > before["accuracy"] + 0.3 and after["loss"] < before["loss"], (before, after)
    assert lazy.evaluate(fit.weights, lazy.load_site([sites[-1]], 0.0, 0)[0]) == pytest.approx(after)


def test_fedprox_pulls_toward_the_global_weights(example: Any, sites: list[Path]) -> None:
    task = example.BlobsTask()
    train, _ = task.load_site([sites[1]], 0.0, seed=0)
    start = task.init_weights(2)

    def drift(mu: float) -> float:
        w = task.fit(start, train, TrainParams(3, 10, 0.1, seed=5, prox_mu=mu)).weights
        return float(np.sqrt(sum(np.square(w[k] - start[k]).sum() for k in start)))

    assert drift(2.0) < 0.5 * drift(0.0)


def test_a_loss_and_score_of_ones_own(sites: list[Path]) -> None:
    task = load_task("test_torch_task_base:Regression")
    assert isinstance(task, TaskWithDefaults)  # its score is reported under "accuracy" too
    train, val = task.load_site([sites[0]], 0.2, seed=0)
    fit = task.fit(task.init_weights(0), train, TrainParams(2, 16, 0.05, 0))
    assert set(fit.metrics) == {"train_loss", "train_mae"}
    scores = task.evaluate(fit.weights, val)
    assert set(scores) == {"loss", "mae", "accuracy"} and scores["accuracy"] == scores["mae"]
    with pytest.raises(TaskError, match=r"scores runs by 'accuracy', which its metrics\(\) does not return"):
        NoScore().evaluate(fit.weights, val)


def test_partitions_of_a_shared_data_set_and_its_test_set(example: Any, sites: list[Path]) -> None:
    task = example.BlobsTask(data=str(sites[0]), test=str(sites[-1]))
    for spec in (PartitionSpec("iid"), PartitionSpec("dirichlet", 0.5), PartitionSpec("natural")):
        parts = [task.load_partition(spec, i, 4, seed=1) for i in range(4)]
        assert all(isinstance(p, Dataset) and p.x.dtype == np.float32 for p in parts)
        assert sum(len(p) for p in parts) == 200
    assert np.array_equal(parts[2].x, example.BlobsTask(data=str(sites[0])).load_partition(spec, 2, 4, 1).x)
    fit = task.fit(task.init_weights(0), parts[0], TrainParams(1, 16, 0.1, 0))
    assert len(task.load_test()) == 200 and "accuracy" in task.evaluate(fit.weights, task.load_test())
    lazy = LazyBlobs(data=str(sites[0]))  # a Dataset of pairs is read into arrays to be split
    assert np.array_equal(lazy.load_partition(spec, 2, 4, 1).y, parts[2].y)


def test_what_is_missing_or_wrong_is_a_task_error_naming_it(example: Any, sites: list[Path], tmp_path: Path) -> None:
    task = example.BlobsTask()
    with pytest.raises(TaskError, match=f"^{re.escape(str(tmp_path / 'nope.npz'))}: no such file or folder"):
        task.load_site([tmp_path / "nope.npz"], 0.1, 0)
    with pytest.raises(TaskError, match="has no shared data set to split into partitions: start each worker "
                                        "on its own files with --data PATH, or set the task option data=PATH"):
        task.load_partition(PartitionSpec("iid"), 0, 2, 0)
    with pytest.raises(TaskError, match="has no test set: start the coordinator with --test-data PATH"):
        task.load_test()
    with pytest.raises(TaskError, match=r"cannot split .* into partitions: cannot split 200 examples into 300"):
        example.BlobsTask(data=str(sites[0])).load_partition(PartitionSpec("iid"), 0, 300, 0)
    with pytest.raises(TaskError, match=r"load_data\(.*site-0.npz\) returned a dict: it must return \(inputs, "):
        Junk().load_site([sites[0]], 0.1, 0)
    with pytest.raises(TaskError, match=r"task 'lazy-blobs' cannot read .*site-0.npz: KeyError: .*no-such-array"):
        Unreadable().load_site([sites[0]], 0.1, 0)
    with pytest.raises(TaskError, match=r"site-0\.npz holds no examples"):
        Empty().load_site([sites[0]], 0.1, 0)
    with pytest.raises(TaskError, match=r"does not define build_model\(\)"):
        ModelLess().init_weights(0)
    with pytest.raises(TaskError, match=r"does not define load_data\(source\)"):
        ModelLess().load_site([sites[0]], 0.1, 0)


def test_a_run_on_partitions_of_a_shared_file(example: Any, sites: list[Path], tmp_path: Path) -> None:
    shared = example.write_sites(tmp_path / "shared", 0, per_site=400, seed=1)[-1]  # all three blobs alike
    out = tmp_path / "run"
    r = run_fedfleet("run", "--task", TASK, "--task-option", f"data={shared}", "--task-option", f"test={sites[-1]}",
                     "--workers", "2", "--rounds", "2", "--lr", "0.1", "--out", str(out), "--quiet", cwd=EXAMPLES)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["task"] == TASK and summary["rounds"] == 2
    assert summary["data_source"] == "partitions" and summary["final_accuracy"] > 0.75, summary


def test_three_sites_train_the_example_on_their_own_files(fleet: Fleet, sites: list[Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # the user's module, for the coordinator and the workers
    c = fleet.coordinator("--task", TASK, "--workers", "3", "--rounds", "2", "--lr", "0.1", "--test-data",
                          str(sites[-1]), "--linger", "1")
    workers = [fleet.worker(c.url, "--allow-task", TASK, "--data", str(path)) for path in sites[:3]]
    for w in workers:
        assert w.proc.wait(timeout=120) == 0, fleet.logs()
    assert c.proc.wait(timeout=30) == 0, fleet.logs()
    summary = json.loads((c.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished" and summary["data_source"] == "sites" and summary["evaluation"] == "test"
    assert summary["final_accuracy"] > 0.6, summary  # chance is a third
    rounds = [json.loads(line) for line in (c.data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [3, 3]
    assert rounds[-1]["fed_examples"] == 60  # each site kept 10% of its 200 points to score the global model on
