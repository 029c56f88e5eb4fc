"""Federated histogram gradient-boosted trees: ``--task-option model=gbdt`` of the songs and tabular tasks.

- ``booster``: the maths (histograms, splits, leaves, the forest as arrays, one level per round).
- ``bins``: the bin edges, agreed from sums before the first tree.
- here: the task options, and ``Gbdt``, what a task with ``model=gbdt`` calls to train, score and check
  that a run can grow its trees (FedAvg with server learning rate 1, no DP or secure aggregation, rounds
  = n_trees × max_depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.options import Option
from fedfleet.tasks.base import FitResult
from fedfleet.tasks.trees import booster
from fedfleet.tasks.trees.booster import Params
from fedfleet.types import Weights

OPTIONS: tuple[Option, ...] = (
    Option("n_trees", int, 50, "model=gbdt: boosting steps (one tree per class per step)", low=1, high=10_000),
    Option("max_depth", int, 4, "model=gbdt: depth of each tree (one round per level)", low=1, high=10),
    Option("learning_rate", float, 0.1, "model=gbdt: shrinkage of each tree's leaves", low=0, high=1, low_open=True),
    Option("min_child_weight", float, 1.0, "model=gbdt: least hessian sum (over all workers) in a child of a split",
           low=0, high=1e12),
    Option("l2", float, 1.0, "model=gbdt: L2 penalty on leaf values (lambda), over all workers' examples",
           low=0, high=1e12),
    Option("bins", int, 64, "model=gbdt: histogram bins per feature", low=2, high=1024),
)
NAMES = tuple(o.name for o in OPTIONS)
AGGREGATORS_OK = ("fedavg", "fedprox")  # the example-weighted mean moved with server SGD


def run_problem(config: Any, p: Params) -> str | None:
    """Why a run with ``config`` (a RunConfig) cannot grow these trees, or None. The histograms must reach the
    workers as the example-weighted mean of theirs, unchanged: a median or Krum picks one worker's (or a
    coordinate-wise mix of them) and the splits would come from part of the data; server momentum or Adam
    move the tree arrays off whole numbers; noise or masking of the structure arrays breaks them too."""
    strategy = str(getattr(config, "strategy", "fedavg"))
    if strategy not in AGGREGATORS_OK:
        why = ("takes a median, trimmed mean or Krum selection of the histograms, not the example-weighted mean "
               "the splits need" if strategy in ("median", "trimmed_mean", "krum") else
               "moves the model with a server optimiser (momentum, Adagrad, Adam, Yogi), which would move the "
               "trees' split arrays")
        return f"model=gbdt cannot be trained with --strategy {strategy}: it {why}; use fedavg"
    server_lr = dict(getattr(config, "strategy_options", ())).get("server_lr")
    if server_lr is not None and float(server_lr) != 1.0:
        return f"model=gbdt needs server_lr 1 (the new model is the workers' mean), got {server_lr}"
    if getattr(config, "dp", "none") != "none":
        return ("model=gbdt cannot be trained with --dp: noise on the split arrays would break the trees, and "
                "the bin edges and example count come from a statistics round without noise")
    if getattr(config, "secure_aggregation", "off") != "off":
        return ("model=gbdt cannot be trained with --secure-aggregation yet: the bin edges and example count come "
                "from a statistics round the coordinator sees in the clear")
    rounds = getattr(config, "rounds", None)
    if rounds is not None and rounds != p.rounds:
        return (f"model=gbdt grows one tree level per round: n_trees {p.n_trees} × max_depth {p.max_depth} needs "
                f"--rounds {p.rounds}, got --rounds {rounds} (or set n_trees to {max(rounds // p.max_depth, 1)})")
    return None


@dataclass(frozen=True)
class Gbdt:
    """The booster as a task's model: ``p`` fixes its shape."""

    p: Params

    def fit(self, weights: Weights, x: np.ndarray, y: np.ndarray) -> FitResult:
        new, raw = booster.grow(weights, np.asarray(x, dtype=np.float64), y, self.p)
        return FitResult(new, len(y), self.scores(raw, y, "train_"))

    def raw(self, weights: Weights, x: np.ndarray) -> np.ndarray:
        return booster.predict_raw(weights, np.asarray(x, dtype=np.float64), self.p)

    def scores(self, raw: np.ndarray, y: np.ndarray, prefix: str = "") -> dict[str, float]:
        """Loss and accuracy (softmax cross-entropy), or mean squared error, of raw scores."""
        if len(y) == 0:
            return {}
        if self.p.regression:
            return {f"{prefix}loss": float(np.mean((raw[:, 0] - y) ** 2))}
        prob = booster.softmax(raw)
        return {f"{prefix}loss": float(-np.log(prob[np.arange(len(y)), y] + 1e-12).mean()),
                f"{prefix}accuracy": float((prob.argmax(axis=1) == y).mean())}


def params(options: dict[str, Any], features: int, outputs: int, regression: bool = False) -> Params:
    """``Params`` from the checked task options (``OPTIONS``' names) and the data's shape."""
    return Params(n_trees=int(options["n_trees"]), max_depth=int(options["max_depth"]),
                  learning_rate=float(options["learning_rate"]), min_child_weight=float(options["min_child_weight"]),
                  l2=float(options["l2"]), bins=int(options["bins"]), features=features, outputs=outputs,
                  regression=regression)


__all__ = ["NAMES", "OPTIONS", "Gbdt", "Params", "params", "run_problem"]
