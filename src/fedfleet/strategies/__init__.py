"""Aggregation strategies: an aggregator of the round's deltas composed with a server optimiser.

=============  ======================  ==========================  ==============================
strategy       aggregates deltas by    moves the model with        options (``--strategy-option``)
=============  ======================  ==========================  ==============================
fedavg         example-weighted mean   SGD, lr 1                   server_lr
fedavgm        example-weighted mean   momentum (Hsu et al.)       server_lr, momentum
fedprox        example-weighted mean   SGD; workers add a          server_lr, prox_mu
                                       proximal term (Li et al.)
fedadagrad     example-weighted mean   Adagrad (Reddi et al.)      server_lr, beta1, tau
fedadam        example-weighted mean   Adam                        server_lr, beta1, beta2, tau
fedyogi        example-weighted mean   Yogi                        server_lr, beta1, beta2, tau
median         coordinate-wise median  SGD, lr 1                   server_lr
trimmed_mean   coordinate-wise         SGD, lr 1                   server_lr, trim_fraction
               trimmed mean
krum           (multi-)Krum            SGD, lr 1                   server_lr, byzantine, select
=============  ======================  ==========================  ==============================

Everything here is pure maths with no I/O. The mean is folded in as updates arrive (memory
O(model)); the robust aggregators need every delta of the round at once (O(model × workers)).

With central differential privacy (``Strategy.dp``, see ``strategies.privacy``) the mean becomes
DP-FedAvg's: clipped deltas, unweighted, plus Gaussian noise, over a fixed denominator; the server
optimiser then only post-processes it, which costs no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedfleet.errors import ConfigError, RoundError
from fedfleet.options import Option
from fedfleet.strategies.accumulate import Stack, WeightedSum
from fedfleet.strategies.privacy import CentralDP
from fedfleet.strategies.robust import coordinate_median, krum, trimmed_mean
from fedfleet.strategies.server_opt import OptState, ServerAdaptive, ServerMomentum, ServerOptimizer, ServerSGD
from fedfleet.types import Schema, Weights

Aggregator = Literal["mean", "median", "trimmed_mean", "krum"]

PARAMS: dict[str, Option] = {o.name: o for o in (
    Option("server_lr", float, None, "server learning rate", low=0, high=100, low_open=True, optional=True),
    Option("momentum", float, 0.9, "server momentum", low=0, high=1, high_open=True),
    Option("beta1", float, 0.9, "first-moment decay", low=0, high=1, high_open=True),
    Option("beta2", float, 0.99, "second-moment decay", low=0, high=1, high_open=True),
    Option("tau", float, 1e-3, "adaptivity: added to √v", low=0, high=10, low_open=True),
    Option("prox_mu", float, 0.01, "weight of the workers' proximal term μ/2·‖w − w_global‖²", low=0, high=100),
    Option("trim_fraction", float, 0.1, "share of values dropped at each end, per coordinate",
           low=0, high=0.5, high_open=True),
    Option("byzantine", int, 1, "f, the hostile workers Krum must withstand", low=0, high=10_000),
    Option("select", int, 1, "deltas multi-Krum averages (1: plain Krum)", low=1, high=100_000),
)}

# name: (aggregator, optimiser, default server lr, parameters it takes)
STRATEGIES: dict[str, tuple[Aggregator, str, float, tuple[str, ...]]] = {
    "fedavg": ("mean", "sgd", 1.0, ("server_lr",)),
    "fedavgm": ("mean", "momentum", 1.0, ("server_lr", "momentum")),
    "fedprox": ("mean", "sgd", 1.0, ("server_lr", "prox_mu")),
    "fedadagrad": ("mean", "adagrad", 0.1, ("server_lr", "beta1", "tau")),
    "fedadam": ("mean", "adam", 0.1, ("server_lr", "beta1", "beta2", "tau")),
    "fedyogi": ("mean", "yogi", 0.1, ("server_lr", "beta1", "beta2", "tau")),
    "median": ("median", "sgd", 1.0, ("server_lr",)),
    "trimmed_mean": ("trimmed_mean", "sgd", 1.0, ("server_lr", "trim_fraction")),
    "krum": ("krum", "sgd", 1.0, ("server_lr", "byzantine", "select")),
}


@dataclass(frozen=True)
class Strategy:
    """A configured strategy. ``accumulator`` collects a round's updates, ``aggregate`` turns them into
    one delta, and ``init``/``apply`` move the model with the server optimiser's immutable state."""

    name: str
    aggregator: Aggregator
    optimizer: ServerOptimizer
    prox_mu: float = 0.0
    trim_fraction: float = 0.0
    byzantine: int = 0
    select: int = 1
    dp: CentralDP | None = None  # set (with ``dataclasses.replace``) for a run with central DP; mean only

    def accumulator(self, schema: Schema, base: Weights) -> WeightedSum | Stack:
        if self.aggregator != "mean":
            return Stack(schema, base)
        return WeightedSum(schema, base, wide_deltas=self.dp is not None)

    def aggregate(self, acc: WeightedSum | Stack, round: int | None = None,
                  rng: np.random.Generator | None = None) -> Weights:
        """The round's delta; RoundError if there are too few updates for this aggregator. With ``dp``, the
        noised mean of the clipped deltas, its noise drawn from ``rng``."""
        if isinstance(acc, WeightedSum):
            if self.dp is None:
                return acc.mean()
            if rng is None:
                raise TypeError("a differentially private aggregate needs a random generator for its noise")
            return self.dp.aggregate(acc, rng)
        n = len(acc.deltas)
        try:
            if self.aggregator == "median":
                return coordinate_median(acc.deltas)
            if self.aggregator == "trimmed_mean":
                return trimmed_mean(acc.deltas, math.floor(self.trim_fraction * n))
            return krum(acc.deltas, self.byzantine, min(self.select, n))
        except ValueError as exc:
            raise RoundError(f"round {round}: {self.name} cannot aggregate {n} updates: {exc}", round=round) from exc

    def init(self, weights: Weights) -> OptState:
        return self.optimizer.init(weights)

    def apply(self, state: OptState, weights: Weights, delta: Weights) -> tuple[Weights, OptState]:
        return self.optimizer.step(state, weights, delta)


def make_strategy(name: str, options: Mapping[str, str] | None = None) -> Strategy:
    """The strategy called ``name`` with its options; ConfigError names a bad name, option or value."""
    if name not in STRATEGIES:
        raise ConfigError(f"The 'strategy' option must be one of {', '.join(STRATEGIES)}. Got {name!r} instead.",
                          option="strategy")
    aggregator, opt, default_lr, allowed = STRATEGIES[name]
    options = dict(options or {})
    for key in options:
        if key not in allowed:
            raise ConfigError(f"The strategy {name!r} takes the options {', '.join(allowed)}. Got {key!r} instead.",
                              option="strategy_options")
    values = {k: PARAMS[k].check(options[k]) if k in options else PARAMS[k].default for k in PARAMS}
    lr = default_lr if values["server_lr"] is None else values["server_lr"]
    optimizer: ServerOptimizer
    if opt == "sgd":
        optimizer = ServerSGD(lr=lr)
    elif opt == "momentum":
        optimizer = ServerMomentum(lr=lr, momentum=values["momentum"])
    else:
        optimizer = ServerAdaptive(variant=opt, lr=lr, beta1=values["beta1"],  # type: ignore[arg-type]
                                   beta2=values["beta2"], tau=values["tau"])
    return Strategy(name=name, aggregator=aggregator, optimizer=optimizer,
                    prox_mu=values["prox_mu"] if name == "fedprox" else 0.0,
                    trim_fraction=values["trim_fraction"], byzantine=values["byzantine"], select=values["select"])


__all__ = ["PARAMS", "STRATEGIES", "Strategy", "make_strategy"]
