"""Your own PyTorch model in a few lines: subclass ``TorchTask``, write ``build_model`` and ``load_data``.

::

    class Blobs(TorchTask):
        name = "blobs"

        def build_model(self) -> nn.Module:
            return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))

        def load_data(self, source: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
            ...  # read the files in ``source``: (inputs, targets)

What a subclass writes:

- ``name``: the task's name (a class attribute).
- ``build_model()``: a fresh ``torch.nn.Module`` mapping a batch of inputs to outputs (logits, by default).
- ``load_data(source)``: the examples in the files or folders ``source`` (a tuple of ``Path``), as a
  ``(inputs, targets)`` pair of tensors or numpy arrays (first dimension: examples; floating-point ones
  are made float32, the models' dtype), or as a ``torch.utils.data.Dataset`` whose items are
  ``(input, target)`` pairs, read lazily if it likes (e.g. files larger than memory).
- optionally ``loss(outputs, targets)``: the batch's mean loss, a scalar tensor (default cross-entropy);
  ``metrics(outputs, targets)``: named scores of a set of outputs (default ``{"accuracy": ...}``, the
  share of argmax hits); a task whose score is not an accuracy names it with ``score_name``.

Where ``load_data``'s ``source`` comes from:

- a run on each site's own files (``fedfleet worker --data PATH``, repeatable): the worker's paths. The
  coordinator's ``--test-data PATH`` is read the same way. ``val_fraction`` of a site's examples,
  chosen with the run's seed, is kept to score the global model on (``load_site``).
- a run on partitions of one shared data set: the task option ``data=PATH``, read by every worker,
  which then keeps its partition (``--partition``: ``dirichlet`` and ``natural`` split by the targets,
  ``natural`` into contiguous runs of sorted targets); ``test=PATH``, the coordinator's held-out set.
  Such a run holds the whole shared data set in memory on every worker process.

The base does the rest, as the built-in PyTorch tasks do (``torch_common``): reproducible initial weights
(``init_weights(seed)``), local SGD with FedProx's term (``TrainParams.prox_mu``), one module per thread
for ``--clients K``, one intra-op thread per worker, and weights crossing the wire as float32 numpy
arrays named as in the model's ``state_dict``. ``evaluate`` returns ``loss`` and ``metrics``' scores.

A task with options of its own declares them after the base's and passes the base's on::

    OPTIONS = (*TorchTask.OPTIONS, Option("hidden", int, 32, "hidden units", low=1, high=4096))

    def __init__(self, hidden: int = 32, **base: Any) -> None:
        super().__init__(**base)
        self.hidden = hidden

torch is imported only when a task is made or used, so that ``fedfleet --help`` (which lists the
built-in tasks, ``images`` among them) works without the torch extra.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec, holdout_indices, split
from fedfleet.storage.records import MAX_CONFUSION_CLASSES
from fedfleet.tasks import score_name, torch_common
from fedfleet.tasks.base import (
    Dataset,
    FitResult,
    NoStats,
    TrainParams,
    class_names,
    confusion_counts,
)
from fedfleet.types import Weights

if TYPE_CHECKING:
    import torch

# Evaluation batches: small ones keep a CNN's activations in cache (see torch_common.predict_logits).
EVAL_BATCH = 100
VAL_STREAM = 0x7A1  # the validation split's own random stream, the constant the worker splits partitions with


class Examples(Protocol):
    """A map-style dataset of known length (a torch Dataset with the ``__len__`` its type leaves out)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted indices of the ``n`` examples to train on and to validate on (``val_fraction`` of them, drawn
    with ``seed``); None instead of the latter when that would leave either side empty."""
    n_val = round(val_fraction * n)
    if n_val < 1 or n_val >= n:
        return np.arange(n), None
    order = np.random.default_rng([seed, VAL_STREAM]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class TorchTask(NoStats):
    """A task around the PyTorch model of ``build_model`` and the data of ``load_data`` (module docstring)."""

    name: str
    OPTIONS: ClassVar[tuple[Option, ...]] = (
        Option("data", str, None, "a file or folder of the shared data set that every worker reads and keeps "
               "its partition of", optional=True, default_text="none: each worker brings its own (--data)"),
        Option("test", str, None, "a file or folder of held-out examples the coordinator scores the model on",
               optional=True, default_text="none: --test-data, else federated evaluation only"),
    )

    def __init__(self, data: str | None = None, test: str | None = None) -> None:
        torch_common.require_torch(getattr(self, "name", type(self).__name__))
        self.data = data
        self.test = test

    # --- what a subclass writes -------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        """A fresh model; every subclass writes its own."""
        raise TaskError(f"task {type(self).__name__} does not define build_model(): a TorchTask returns its "
                        "torch.nn.Module from it")

    def load_data(self, source: Sequence[Path]) -> Any:
        """The examples in ``source``: ``(inputs, targets)`` or a Dataset of such pairs; every subclass writes it."""
        raise TaskError(f"task {type(self).__name__} does not define load_data(source): a TorchTask returns its "
                        "examples from it, as (inputs, targets) or a torch Dataset of such pairs")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch: cross-entropy of logits and class indices unless a subclass says otherwise."""
        import torch.nn.functional as F

        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Named scores of ``outputs`` for ``targets`` (the whole evaluation set at once; during training one
        batch at a time, averaged): the argmax accuracy unless a subclass says otherwise."""
        return torch_common.accuracy(outputs, targets)

    # --- the Task protocol --------------------------------------------------------------------------------------
    @property
    def data_at_sites(self) -> bool:
        """Whether workers bring their own data (``--data``): they do unless there is a shared set to split."""
        return self.data is None

    @functools.cached_property
    def _models(self) -> torch_common.ThreadModels:
        return torch_common.ThreadModels(self.build_model)

    @property
    def model(self) -> torch.nn.Module:
        """This thread's own module (see ``ThreadModels``)."""
        return self._models.get()

    def init_weights(self, seed: int) -> Weights:
        torch = torch_common.require_torch(self.name)
        torch.manual_seed(seed)
        return torch_common.weights_of(self.build_model())

    def load_site(self, paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[Any, Any | None]:
        from torch.utils.data import Dataset as TorchDataset
        from torch.utils.data import Subset

        data = self._load(paths)
        train, val = validation_split(len(data), val_fraction, seed)
        if val is None:
            return data, None
        whole = cast("TorchDataset[Any]", data)
        return Subset(whole, train.tolist()), Subset(whole, val.tolist())

    def load_server_val(self, spec: PartitionSpec, seed: int) -> Dataset:
        """The coordinator's validation set (``--server-val``): the pool's examples ``load_partition`` leaves out."""
        pool = self._pool
        keep = holdout_indices(pool.y, spec.holdout, seed)
        return Dataset(pool.x[keep], pool.y[keep])

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        pool = self._pool
        try:
            part = split(pool.y, pool.y, spec, count, seed)[index]
        except ValueError as exc:
            raise TaskError(f"task {self.name!r}: cannot split {self.data} into partitions: {exc}") from exc
        return Dataset(pool.x[part], pool.y[part])

    def load_test(self) -> Any:
        if self.test is None:
            raise TaskError(f"task {self.name!r} has no test set: start the coordinator with --test-data PATH, "
                            "or set the task option test=PATH")
        return self._load([Path(self.test)])

    def fit(self, weights: Weights, data: Any, params: TrainParams) -> FitResult:
        dataset = self.torch_dataset(data)
        return torch_common.train(self.model, weights, params, len(dataset),
                                  lambda order: batches(dataset, order, params.batch_size), self.loss, self.metrics)

    def evaluate(self, weights: Weights, data: Any) -> dict[str, float]:
        return self.evaluate_confusion(weights, data)[0]

    def evaluate_confusion(self, weights: Weights, data: Any) -> tuple[dict[str, float], np.ndarray | None]:
        """``evaluate``'s scores, and for a classifier that names its classes (``class_names``: e.g. the
        images task's plan) whose outputs are a score per class, the true × predicted class counts."""
        import torch

        dataset = self.torch_dataset(data)
        if len(dataset) == 0:
            raise TaskError(f"task {self.name!r}: no examples to evaluate on")
        model = self.model
        torch_common.load_weights(model, weights)
        model.eval()
        outputs, targets, loss_sum = [], [], 0.0
        with torch.no_grad():
            for xb, yb in batches(dataset, np.arange(len(dataset)), EVAL_BATCH):
                out = model(xb)
                loss_sum += float(self.loss(out, yb)) * len(yb)
                outputs.append(out)
                targets.append(yb)
        scores = {"loss": loss_sum / len(dataset),
                  **{k: float(v) for k, v in self.metrics(torch.cat(outputs), torch.cat(targets)).items()}}
        score = score_name(self)
        if score not in scores:
            raise TaskError(f"task {self.name!r} scores runs by {score!r}, which its metrics() does not return "
                            f"(only {', '.join(sorted(scores))}): return it, or name the score with score_name")
        return scores, _confusion(torch.cat(outputs), torch.cat(targets), class_names(self))

    def label_counts(self, data: Any) -> list[int] | None:
        """Examples per class index of ``data`` held in memory as (inputs, targets) tensors, for a task that
        names its classes (``class_names``); None for a lazy Dataset (reading it to count would be a pass over
        the files) or targets that are not class indices."""
        from torch.utils.data import TensorDataset

        classes = class_names(self)
        dataset = self.torch_dataset(data)
        if classes is None or not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
            return None
        targets = dataset.tensors[1]
        if targets.ndim != 1 or targets.is_floating_point():
            return None
        y = targets.numpy().astype(np.int64)
        return [int(n) for n in np.bincount(y[(y >= 0) & (y < len(classes))], minlength=len(classes))]

    # --- data -------------------------------------------------------------------------------------------------
    def torch_dataset(self, data: Any) -> Examples:
        """``data`` as loaded here (a site's or a test set), or a partition's arrays, as a Dataset of pairs."""
        from torch.utils.data import Dataset as TorchDataset

        if isinstance(data, Dataset):
            return as_dataset((data.x, data.y), "a partition")
        if isinstance(data, TorchDataset):
            return cast(Examples, data)
        raise TaskError(f"task {self.name!r} cannot train on {type(data).__name__}: it needs data its load_site, "
                        "load_test or load_partition returned")

    def _load(self, paths: Sequence[Path]) -> Examples:
        """``load_data(paths)`` as a Dataset of pairs; TaskError naming the path if it is missing, unreadable or
        holds no examples."""
        paths = tuple(Path(p) for p in paths)
        where = ", ".join(str(p) for p in paths)
        for p in paths:
            if not p.exists():
                raise TaskError(f"{p}: no such file or folder (task {self.name!r} reads its data from it)")
        try:
            loaded = self.load_data(paths)
        except (OSError, ValueError, KeyError, EOFError) as exc:  # what reading a file wrongly shaped raises
            raise TaskError(f"task {self.name!r} cannot read {where}: {type(exc).__name__}: {exc}") from exc
        dataset = as_dataset(loaded, f"load_data({where})")
        if len(dataset) == 0:
            raise TaskError(f"{where} holds no examples (task {self.name!r})")
        return dataset

    @functools.cached_property
    def _pool(self) -> Dataset:
        """The shared data set (task option ``data``) as arrays, for ``load_partition`` to split."""
        import torch
        from torch.utils.data import TensorDataset

        if self.data is None:
            raise TaskError(f"task {self.name!r} has no shared data set to split into partitions: start each "
                            "worker on its own files with --data PATH, or set the task option data=PATH")
        dataset = self._load([Path(self.data)])
        if isinstance(dataset, TensorDataset):
            x, y = dataset.tensors
        else:
            x, y = (torch.cat(parts) for parts in zip(*batches(dataset, np.arange(len(dataset)), 1024),
                                                           strict=True))
        return Dataset(x.numpy(), y.numpy())


def as_dataset(data: Any, what: str) -> Examples:
    """``data`` (an ``(inputs, targets)`` pair of tensors or arrays, or a Dataset) as a Dataset of pairs;
    TaskError naming ``what`` returned it if it is neither."""
    import torch
    from torch.utils.data import Dataset as TorchDataset
    from torch.utils.data import TensorDataset

    if isinstance(data, TorchDataset):
        if not hasattr(data, "__len__"):
            raise TaskError(f"{what} returned a {type(data).__name__} without __len__: fedfleet needs to know "
                            "how many examples there are")
        return cast(Examples, data)
    if isinstance(data, tuple | list) and len(data) == 2 \
            and all(isinstance(a, torch.Tensor | np.ndarray) for a in data):
        x, y = (torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a for a in data)
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
            raise TaskError(f"{what} returned inputs of shape {tuple(x.shape)} and targets of shape "
                            f"{tuple(y.shape)}: both need one entry per example along their first dimension")
        # The models' parameters are float32: float64 inputs (numpy's default) would not multiply with them.
        x, y = (t.float() if t.is_floating_point() else t for t in (x, y))
        return cast(Examples, TensorDataset(x, y))
    raise TaskError(f"{what} returned a {type(data).__name__}: it must return (inputs, targets), tensors or numpy "
                    "arrays, or a torch.utils.data.Dataset of (input, target) pairs")


def batches(data: Examples, order: np.ndarray, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``data``'s examples in ``order``, as (inputs, targets) batches of ``size``: sliced out of the tensors of
    a TensorDataset (under any Subsets), else collated from its items as torch's DataLoader does."""
    import torch
    from torch.utils.data import TensorDataset, default_collate

    source, index = _unwrap(data)
    for start in range(0, len(order), size):
        rows = order[start:start + size] if index is None else index[order[start:start + size]]
        if isinstance(source, TensorDataset) and len(source.tensors) == 2:
            idx = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
            x, y = (t[idx] for t in source.tensors)
        else:
            items = [source[int(i)] for i in rows]
            if not isinstance(items[0], tuple | list) or len(items[0]) != 2:
                raise TaskError(f"{type(source).__name__}[{int(rows[0])}] is a {type(items[0]).__name__}: a "
                                "TorchTask's Dataset yields (input, target) pairs")
            x, y = default_collate(items)
        yield x, y


def _unwrap(data: Examples) -> tuple[Examples, np.ndarray | None]:
    """The dataset under any Subsets of ``data``, and the indices into it of ``data``'s items (None: all, in order)."""
    from torch.utils.data import Subset

    index: np.ndarray | None = None
    while isinstance(data, Subset):
        inner = np.asarray(data.indices, dtype=np.int64)
        index = inner if index is None else inner[index]
        data = cast(Examples, data.dataset)
    return data, index


def _confusion(outputs: torch.Tensor, targets: torch.Tensor, classes: list[str] | None) -> np.ndarray | None:
    """True × predicted class counts when the outputs are a score per named class and the targets class
    indices; None for anything else (a regression, a task that does not name its classes)."""
    if classes is None or outputs.ndim != 2 or outputs.shape[1] != len(classes) or targets.ndim != 1 \
            or targets.is_floating_point() or len(classes) > MAX_CONFUSION_CLASSES:
        return None
    return confusion_counts(targets.numpy(), outputs.argmax(dim=1).numpy(), len(classes))
