"""Server optimisers: how the aggregated delta moves the global model.

The aggregated delta Δ (the mean of the workers' ``update − global``) is a pseudo-gradient step;
the server can take it as it is (SGD with learning rate 1 is FedAvg), with momentum (FedAvgM, Hsu et
al. 2019), or with an adaptive per-coordinate step (FedAdagrad, FedAdam, FedYogi; Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021)::

    m ← β₁ m + (1 − β₁) Δ
    v ← v + Δ²                              (adagrad)
    v ← β₂ v + (1 − β₂) Δ²                  (adam)
    v ← v − (1 − β₂) Δ² sign(v − Δ²)        (yogi)
    x ← x + η m / (√v + τ)

Each optimiser is a frozen dataclass of its settings with ``init(weights) -> state`` and
``step(state, weights, delta) -> (weights, state)``; the state is a frozen dataclass of arrays,
replaced each round and never mutated. Only floating tensors move; others are kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedfleet.types import Weights


@dataclass(frozen=True)
class OptState:
    m: Weights = field(default_factory=dict)
    v: Weights = field(default_factory=dict)
    step: int = 0


def _floats(weights: Weights) -> list[str]:
    return [k for k, w in weights.items() if w.dtype.kind == "f"]


@dataclass(frozen=True)
class ServerSGD:
    """x ← x + lr · Δ (with lr = 1 and the example-weighted mean, this is FedAvg).

    >>> new, _ = ServerSGD(lr=0.5).step(ServerSGD().init({}), {"w": np.array([1.0])}, {"w": np.array([2.0])})
    >>> new["w"]
    array([2.])
    """

    lr: float = 1.0

    def init(self, weights: Weights) -> OptState:
        return OptState()

    def step(self, state: OptState, weights: Weights, delta: Weights) -> tuple[Weights, OptState]:
        new = dict(weights)
        for k in _floats(weights):
            new[k] = (weights[k] + self.lr * delta[k]).astype(weights[k].dtype)
        return new, OptState(step=state.step + 1)


@dataclass(frozen=True)
class ServerMomentum:
    """FedAvgM: m ← β m + Δ;  x ← x + lr · m."""

    lr: float = 1.0
    momentum: float = 0.9

    def init(self, weights: Weights) -> OptState:
        return OptState(m={k: np.zeros_like(weights[k]) for k in _floats(weights)})

    def step(self, state: OptState, weights: Weights, delta: Weights) -> tuple[Weights, OptState]:
        new, m = dict(weights), {}
        for k in _floats(weights):
            m[k] = (self.momentum * state.m[k] + delta[k]).astype(weights[k].dtype)
            new[k] = (weights[k] + self.lr * m[k]).astype(weights[k].dtype)
        return new, OptState(m=m, step=state.step + 1)


@dataclass(frozen=True)
class ServerAdaptive:
    """FedAdagrad, FedAdam or FedYogi, by ``variant``. ``v`` starts at τ², as in Reddi et al."""

    variant: Literal["adagrad", "adam", "yogi"] = "adam"
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def init(self, weights: Weights) -> OptState:
        floats = _floats(weights)
        return OptState(m={k: np.zeros_like(weights[k]) for k in floats},
                        v={k: np.full_like(weights[k], self.tau**2) for k in floats})

    def step(self, state: OptState, weights: Weights, delta: Weights) -> tuple[Weights, OptState]:
        new, m, v = dict(weights), {}, {}
        for k in _floats(weights):
            d = delta[k]
            m[k] = self.beta1 * state.m[k] + (1 - self.beta1) * d
            d2 = d * d
            if self.variant == "adagrad":
                v[k] = state.v[k] + d2
            elif self.variant == "adam":
                v[k] = self.beta2 * state.v[k] + (1 - self.beta2) * d2
            else:
                v[k] = state.v[k] - (1 - self.beta2) * d2 * np.sign(state.v[k] - d2)
            dtype = weights[k].dtype
            m[k], v[k] = m[k].astype(dtype), v[k].astype(dtype)
            new[k] = (weights[k] + self.lr * m[k] / (np.sqrt(v[k]) + self.tau)).astype(dtype)
        return new, OptState(m=m, v=v, step=state.step + 1)


ServerOptimizer = ServerSGD | ServerMomentum | ServerAdaptive


def state_to_tensors(state: OptState) -> tuple[Weights, dict[str, str]] | None:
    """The state as named tensors (``m/NAME``, ``v/NAME``) plus metadata, for a checkpoint; None if empty."""
    if not state.m and not state.v:
        return None
    tensors = {f"m/{k}": a for k, a in state.m.items()} | {f"v/{k}": a for k, a in state.v.items()}
    return tensors, {"step": str(state.step)}


def state_from_tensors(tensors: Weights, metadata: dict[str, str]) -> OptState:
    m = {k[2:]: a for k, a in tensors.items() if k.startswith("m/")}
    v = {k[2:]: a for k, a in tensors.items() if k.startswith("v/")}
    return OptState(m=m, v=v, step=int(metadata.get("step", "0")))

