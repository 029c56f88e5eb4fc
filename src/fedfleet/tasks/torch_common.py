"""What every PyTorch task shares: torch imported lazily, weights <-> state_dict, local SGD, evaluation.

torch is the optional extra ``fedfleet[torch]``; the core package never imports it. A torch task calls
:func:`require_torch` first, so a missing install is a TaskError that says how to get it, not an
ImportError from deep inside a worker.

Weights cross the wire as float32 numpy arrays named as in the model's ``state_dict`` (parameters
and buffers, in the module's registration order, which is stable for a given model class). Tensors
are always built from numpy arrays: nothing here unpickles (``torch.load`` is never used).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.tasks.base import Dataset, FitResult, TrainParams, confusion_counts
from fedfleet.types import Weights

if TYPE_CHECKING:
    import torch

    Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets) of one mini-batch
    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, targets) -> the batch's mean loss
    MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]  # (outputs, targets) -> named scores

INSTALL_HINT = "pip install 'fedfleet[torch]'"

# Many workers share a machine (often several per process, several processes per host): one thread
# each keeps them from oversubscribing the cores, which is far slower than running them side by side.
# `fedfleet run` gives a worker process more ($FEDFLEET_TORCH_THREADS) when there are more cores than
# logical workers; the coordinator raises it (use_threads): it evaluates while every worker waits.
THREADS_ENV = "FEDFLEET_TORCH_THREADS"
_threads: int | None = None  # None: not set yet; the first require_torch reads THREADS_ENV, else 1


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may keep busy: its CPU affinity, capped by a cgroup CPU quota (a container's
    ``--cpus``), which affinity does not show: threads beyond the quota are throttled, not run."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(n, math.ceil(quota))) if quota else n


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs' worth of time per period allowed by cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``; None: no limit."""
    try:
        fields = (root / "cpu.max").read_text().split()
        return int(fields[0]) / int(fields[1]) if fields[0] != "max" else None
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def use_threads(n: int) -> None:
    """Run torch ops of this process on ``n`` intra-op threads (now, if torch is loaded, and from then on)."""
    global _threads
    _threads = max(1, n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)


def threads() -> int:
    """This process's intra-op threads: as ``use_threads`` set them, else ``$FEDFLEET_TORCH_THREADS``, else 1."""
    global _threads
    if _threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            _threads = 1
        elif text.isdigit() and int(text) >= 1:
            _threads = int(text)
        else:
            raise TaskError(f"${THREADS_ENV} must be a whole number >= 1 (torch threads per process). "
                            f"Got {text!r} instead.")
    return _threads


def require_torch(task: str) -> ModuleType:
    """The torch module, set to this process's intra-op threads (``threads()``); TaskError naming the extra
    if it is not installed."""
    try:
        torch_mod = importlib.import_module("torch")
    except ImportError as exc:
        raise TaskError(f"the {task!r} task needs PyTorch, which is not installed: {INSTALL_HINT}") from exc
    n = threads()
    if torch_mod.get_num_threads() != n:
        torch_mod.set_num_threads(n)
    return torch_mod


class ThreadModels:
    """One module per thread. The logical workers of a process (``--clients K``) train side by side in
    threads sharing one task object, and a module holds the weights and autograd state of whoever
    trains it: shared, two threads' steps would overwrite each other's tensors mid-backward."""

    def __init__(self, build: Callable[[], torch.nn.Module]) -> None:
        self._build = build
        self._local = threading.local()

    def get(self) -> torch.nn.Module:
        model: torch.nn.Module | None = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = self._build()
        return model


def weights_of(model: torch.nn.Module) -> Weights:
    """The model's parameters and buffers as C-ordered float32 numpy copies, in ``state_dict`` order
    (a channels-last tensor's numpy view is not C-ordered, and the codec writes raw row-major bytes)."""
    return {name: np.array(t.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
            for name, t in model.state_dict().items()}


def load_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Copy ``weights`` into the model; TaskError if a name or shape does not match its state_dict."""
    import torch

    state = model.state_dict()
    if set(weights) != set(state):
        missing = [k for k in state if k not in weights]
        extra = [k for k in weights if k not in state]
        raise TaskError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    # Weights decoded from the wire are read-only views of the received bytes; torch warns that a tensor
    # made from one could write to it, but this one is only read from (copied into the model).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, target in state.items():
            value = np.asarray(weights[name])
            if tuple(value.shape) != tuple(target.shape):
                raise TaskError(f"weight {name!r} has shape {tuple(value.shape)}, "
                                f"the model needs {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))


def _tensors(data: Dataset, transform: Callable[[np.ndarray], np.ndarray] | None) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    import torch

    x = data.x if transform is None else transform(data.x)
    # A data set's arrays may be read-only (shared, or views of a file); the tensors made from them are
    # only indexed for batches, never written, so torch's warning about that does not apply.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(data.y, dtype=np.int64)))


def fit(model: torch.nn.Module, weights: Weights, data: Dataset, params: TrainParams,
        transform: Callable[[np.ndarray], np.ndarray] | None = None) -> FitResult:
    """Local mini-batch SGD from ``weights`` with the cross-entropy loss (``train``), on arrays in memory.

    ``transform`` maps raw features to model inputs (e.g. standardisation) before training.
    """
    import torch
    import torch.nn.functional as F

    x, y = _tensors(data, transform)

    def batches(order: np.ndarray) -> Iterator[Batch]:
        idx = torch.from_numpy(order)
        for start in range(0, len(idx), params.batch_size):
            rows = idx[start:start + params.batch_size]
            yield x[rows], y[rows]

    return train(model, weights, params, len(y), batches, F.cross_entropy, accuracy)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The share of ``outputs`` (logits, one row per example) whose largest entry is at the target class."""
    return {"accuracy": float((outputs.argmax(dim=1) == targets).sum()) / max(len(targets), 1)}


def train(model: torch.nn.Module, weights: Weights, params: TrainParams, num_examples: int,
          batches: Callable[[np.ndarray], Iterable[Batch]], loss: LossFn, metrics: MetricsFn) -> FitResult:
    """Local mini-batch SGD from ``weights``: ``params.local_epochs`` passes over ``num_examples`` examples,
    each in the order of a permutation drawn with ``params.seed``, which ``batches`` turns into (inputs,
    targets) mini-batches.

    With ``params.prox_mu`` > 0 the loss gets FedProx's μ/2·‖w − w_global‖² over the trainable
    parameters (its gradient added directly: ``add_prox_gradient``). Buffers (none in the built-in models)
    are returned as the model leaves them. The result's metrics are ``train_loss`` and ``train_`` + each of
    ``metrics``, means over the examples of the last epoch (each batch's value weighted by its size).
    """
    import torch

    torch.manual_seed(params.seed)
    load_weights(model, weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in trainable]
    mu = float(params.prox_mu)
    opt = torch.optim.SGD(trainable, lr=params.lr)
    rng = np.random.default_rng(params.seed)
    model.train()
    sums: dict[str, float] = {"loss": 0.0}
    seen = 0
    for _ in range(params.local_epochs):
        sums, seen = {"loss": 0.0}, 0  # report the last epoch, as the numpy tasks do
        for xb, yb in batches(rng.permutation(num_examples)):
            opt.zero_grad(set_to_none=True)
            outputs = model(xb)
            batch_loss = loss(outputs, yb)
            torch.autograd.backward(batch_loss)
            if mu > 0:
                add_prox_gradient(trainable, anchors, mu)
            opt.step()
            n = len(yb)
            sums["loss"] += float(batch_loss.detach()) * n
            for name, value in metrics(outputs.detach(), yb).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            seen += n
    return FitResult(weights_of(model), num_examples, {f"train_{k}": v / max(seen, 1) for k, v in sums.items()})


def add_prox_gradient(params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor], mu: float) -> None:
    """Add the gradient of FedProx's μ/2·‖w − w_global‖², μ·(w − w_global), to each parameter's gradient.

    Written out rather than left to autograd, which would build, run and differentiate the term over every
    weight each batch (benchmarks/prox_cost.py times the two). It adds μ·w and subtracts μ·w_global in place
    rather than adding μ·(w − w_global): that difference is a new weight-sized tensor every batch, which glibc
    hands out as freshly mapped pages once it is past its mmap threshold, and faulting those in cost more than
    the arithmetic (0.6 s an epoch for the MNIST CNN, and it swung with the allocator's state).
    """
    import torch

    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            if p.grad is None:  # a parameter the batch's loss does not reach: the term alone moves it
                p.grad = mu * (p - a)
            else:
                p.grad.add_(p, alpha=mu).sub_(a, alpha=mu)


def predict_logits(model: torch.nn.Module, weights: Weights, x: np.ndarray, batch_size: int = 100,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The model's logits for ``x``, computed without gradients in batches (small ones keep a CNN's activations
    in cache: 100 images a batch evaluate MNIST's CNN 1.6x as fast as 1000 here, benchmarks/cnn_layout.py)."""
    import torch

    load_weights(model, weights)
    model.eval()
    xs = x if transform is None else transform(x)
    out = []
    with torch.no_grad():
        for start in range(0, len(xs), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(xs[start:start + batch_size], dtype=np.float32))
            out.append(model(xb).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(model: torch.nn.Module, weights: Weights, data: Dataset,
             transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``weights`` on ``data``."""
    return evaluate_confusion(model, weights, data, transform)[0]


def evaluate_confusion(model: torch.nn.Module, weights: Weights, data: Dataset,
                       transform: Callable[[np.ndarray], np.ndarray] | None = None,
                       ) -> tuple[dict[str, float], np.ndarray | None]:
    """``evaluate``'s scores and the true × predicted class counts of the same predictions (None for no data)."""
    logits = predict_logits(model, weights, data.x, transform=transform).astype(np.float64)
    if len(data) == 0:
        return {"loss": 0.0, "accuracy": 0.0}, None
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = np.asarray(data.y, dtype=np.int64)
    predicted = logits.argmax(axis=1)
    return ({"loss": float(-logp[np.arange(len(y)), y].mean()), "accuracy": float((predicted == y).mean())},
            confusion_counts(y, predicted, logits.shape[1]))


def num_parameters(model: torch.nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())
