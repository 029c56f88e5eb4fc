"""The tabular task's models, and the local SGD both are trained with.

- ``LogReg``: multinomial logistic regression in numpy (softmax, cross-entropy); for a regression
  label, linear regression (mean squared error). Weights ``linear.weight`` (inputs × outputs) and
  ``linear.bias``.
- ``Trees``: histogram gradient-boosted trees (``fedfleet.tasks.trees``), one tree level a round; not
  trained by SGD: ``Trees.fit`` sums the level's histograms over the chunks instead.
- ``Mlp``: inputs → hidden layers with ReLU → outputs in PyTorch (the ``fedfleet[torch]`` extra,
  imported only when an MLP is built). Weights named as its ``state_dict``: ``hidden1.weight``,
  ``hidden1.bias``, ... ``out.weight``, ``out.bias``.

Both are trained by ``train`` over chunks of rows as they are read from the files: the rows of each
chunk are shuffled and cut into mini-batches, since the whole file is never in memory to shuffle.
FedProx (``prox_mu``) adds μ·(w − w_global) to each gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import FitResult, TrainParams
from fedfleet.tasks.tabular.describe import NumberFeature, Plan
from fedfleet.tasks.tabular.metrics import ClassScores, RegressionScores
from fedfleet.tasks.trees import Gbdt, booster
from fedfleet.tasks.trees.bins import uniform_edges
from fedfleet.types import Weights

if TYPE_CHECKING:
    import torch

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass over (features, targets)
PREDICT_ROWS = 4096  # rows an MLP predicts at a time


class Trainer(Protocol):
    def step(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """One SGD step on a mini-batch; the model's outputs for it, from before the step."""
        ...

    def weights(self) -> Weights:
        ...


class Model(Protocol):
    def init_weights(self, seed: int) -> Weights:
        ...

    def trainer(self, weights: Weights, params: TrainParams) -> Trainer:
        ...

    def outputs(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        """Logits (rows × classes), or standardised predictions (rows × 1) for a regression label."""
        ...


def check_weights(weights: Weights, expected: Weights) -> None:
    """TaskError unless ``weights`` has the names and shapes of ``expected`` (the model's own)."""
    if list(weights) != list(expected):
        raise TaskError(f"weights do not match the model: they are {', '.join(weights)}; the model's are "
                        f"{', '.join(expected)}")
    for name, value in expected.items():
        if weights[name].shape != value.shape:
            raise TaskError(f"weight {name!r} has shape {weights[name].shape}; the model needs {value.shape}")


class LogReg:
    def __init__(self, inputs: int, outputs: int, regression: bool) -> None:
        self.n_in, self.n_out, self.regression = inputs, outputs, regression

    def init_weights(self, seed: int) -> Weights:
        rng = np.random.default_rng([seed, 0x7AB])
        return {"linear.weight": (rng.standard_normal((self.n_in, self.n_out)) * 0.01).astype(np.float32),
                "linear.bias": np.zeros(self.n_out, dtype=np.float32)}

    def trainer(self, weights: Weights, params: TrainParams) -> Trainer:
        check_weights(weights, self.init_weights(0))
        return _LogRegTrainer(weights, params, self.regression)

    def outputs(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        check_weights(weights, self.init_weights(0))
        out: np.ndarray = x @ weights["linear.weight"] + weights["linear.bias"]
        return out


class _LogRegTrainer:
    def __init__(self, weights: Weights, params: TrainParams, regression: bool) -> None:
        self.w0, self.b0 = weights["linear.weight"], weights["linear.bias"]
        self.w = self.w0.astype(np.float32, copy=True)
        self.b = self.b0.astype(np.float32, copy=True)
        self.lr, self.mu = np.float32(params.lr), np.float32(params.prox_mu)
        self.regression = regression

    def step(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out: np.ndarray = x @ self.w + self.b
        n = np.float32(len(y))
        if self.regression:
            grad = (2 * (out[:, 0] - y) / n)[:, None]  # of the mean squared error
        else:
            z = out - out.max(axis=1, keepdims=True)
            grad = np.exp(z)
            grad /= grad.sum(axis=1, keepdims=True)
            grad[np.arange(len(y)), y] -= 1  # softmax − one-hot: the cross-entropy's gradient
            grad /= n
        gw, gb = x.T @ grad, grad.sum(axis=0)
        if self.mu:
            gw, gb = gw + self.mu * (self.w - self.w0), gb + self.mu * (self.b - self.b0)
        self.w -= self.lr * gw
        self.b -= self.lr * gb
        return out

    def weights(self) -> Weights:
        return {"linear.weight": self.w, "linear.bias": self.b}


def encoded_ranges(plan: Plan, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each encoded input's least and greatest value over all sites, from the plan (see ``encode``): a number's
    standardised min and max (0 if its values are all the mean), 0..1 for a missing indicator or a one-hot."""
    low, high = np.zeros(width), np.ones(width)
    at = 0
    for f in plan.features:
        if isinstance(f, NumberFeature):
            low[at], high[at] = min((f.min - f.mean) / f.scale, 0.0), max((f.max - f.mean) / f.scale, 0.0)
            at += 1 + f.missing
        else:
            at += len(f.values) + 1
    return low, high


class Trees:
    """Gradient-boosted trees over the encoded inputs. The bins are equal-width between each input's plan min
    and max (the plan has them already, so no extra round; quantile bins would need a grid count from every
    site, as the songs task takes in its statistics round); N is the plan's rows, every site's training rows."""

    def __init__(self, gbdt: Gbdt, plan: Plan, width: int) -> None:
        self.gbdt, self.plan, self.width = gbdt, plan, width

    def init_weights(self, seed: int) -> Weights:
        p = self.gbdt.p
        low, high = encoded_ranges(self.plan, self.width)
        return booster.init_weights(p, uniform_edges(low, high, p.bins), float(self.plan.rows))

    def trainer(self, weights: Weights, params: TrainParams) -> Trainer:
        raise TaskError("gradient-boosted trees are grown a level a round by Trees.fit, not trained by SGD steps")

    def outputs(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        return self.gbdt.raw(weights, x)

    def fit(self, weights: Weights, chunks: Chunks, scores: ClassScores | RegressionScores) -> FitResult:
        """One round: the pending level applied, this site's histograms of the next summed over its chunks."""
        rounds = booster.grow_chunks(weights, chunks(), self.gbdt.p)
        while True:
            try:
                raw, y = next(rounds)
            except StopIteration as done:
                return FitResult(done.value, scores.rows, scores.result("train_"))
            scores.add(raw, y)


class Mlp:
    def __init__(self, inputs: int, hidden: tuple[int, ...], outputs: int, regression: bool) -> None:
        torch_common.require_torch("tabular")
        self.n_in, self.hidden, self.n_out, self.regression = inputs, hidden, outputs, regression
        # One module per thread: the workers of one process (--clients K) share this task in threads.
        self._models = torch_common.ThreadModels(self._build)

    def _build(self) -> torch.nn.Module:
        from torch import nn

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = self.n_in
        for i, size in enumerate(self.hidden, start=1):
            layers[f"hidden{i}"] = nn.Linear(width, size)
            layers[f"relu{i}"] = nn.ReLU()
            width = size
        layers["out"] = nn.Linear(width, self.n_out)
        return nn.Sequential(layers)

    def init_weights(self, seed: int) -> Weights:
        torch = torch_common.require_torch("tabular")
        with torch.random.fork_rng(devices=[]):  # the caller's torch random state is left as it was
            torch.manual_seed(seed)
            return torch_common.weights_of(self._build())

    def trainer(self, weights: Weights, params: TrainParams) -> Trainer:
        model = self._models.get()
        torch_common.load_weights(model, weights)
        return _TorchTrainer(model, params, self.regression)

    def outputs(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        return torch_common.predict_logits(self._models.get(), weights, x, batch_size=PREDICT_ROWS)


class _TorchTrainer:
    def __init__(self, model: torch.nn.Module, params: TrainParams, regression: bool) -> None:
        import torch

        torch.manual_seed(params.seed)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]
        self.mu = float(params.prox_mu)
        self.opt = torch.optim.SGD(self.params, lr=params.lr)
        self.regression = regression
        model.train()

    def step(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        out = self.model(torch.from_numpy(np.ascontiguousarray(x)))
        target = torch.from_numpy(np.ascontiguousarray(y))
        loss = F.mse_loss(out[:, 0], target) if self.regression else F.cross_entropy(out, target)
        torch.autograd.backward(loss)
        if self.mu > 0:
            torch_common.add_prox_gradient(self.params, self.anchors, self.mu)
        self.opt.step()
        result: np.ndarray = out.detach().numpy()
        return result

    def weights(self) -> Weights:
        return torch_common.weights_of(self.model)


def train(model: Model, weights: Weights, chunks: Chunks, params: TrainParams,
          scores: Callable[[], ClassScores | RegressionScores]) -> FitResult:
    """``params.local_epochs`` passes of mini-batch SGD over ``chunks``, from ``weights``; the metrics
    (``train_loss`` and ``train_accuracy`` or ``train_r2``) are of the last pass, as the other tasks report."""
    trainer = model.trainer(weights, params)
    rng = np.random.default_rng(params.seed)
    seen = scores()
    for _ in range(params.local_epochs):
        seen = scores()
        for x, y in chunks():
            order = rng.permutation(len(y))
            for start in range(0, len(order), params.batch_size):
                idx = order[start:start + params.batch_size]
                seen.add(trainer.step(x[idx], y[idx]), y[idx])
    return FitResult(trainer.weights(), seen.rows, seen.result("train_"))
