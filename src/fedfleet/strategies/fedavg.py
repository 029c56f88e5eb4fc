"""FedAvg (McMahan et al., 2017): the new model is the old one plus the example-weighted mean delta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fedfleet.types import Weights


class Strategy(Protocol):
    """Server-side update rule. ``state`` is immutable and replaced each round, never mutated."""

    @property
    def name(self) -> str: ...

    def init(self, weights: Weights) -> Any: ...

    def apply(self, state: Any, weights: Weights, mean_delta: Weights) -> tuple[Weights, Any]: ...


@dataclass(frozen=True)
class FedAvg:
    """``apply`` returns ``weights + server_lr · mean_delta``; with server_lr = 1 that is the weighted
    mean of the workers' models.

    >>> import numpy as np
    >>> new, _ = FedAvg().apply(None, {"w": np.array([1.0])}, {"w": np.array([0.5])})
    >>> new["w"]
    array([1.5])
    """

    server_lr: float = 1.0
    name: str = "fedavg"

    def init(self, weights: Weights) -> None:
        return None

    def apply(self, state: None, weights: Weights, mean_delta: Weights) -> tuple[Weights, None]:
        new = {k: (w + self.server_lr * mean_delta[k]).astype(w.dtype) for k, w in weights.items()}
        return new, state
