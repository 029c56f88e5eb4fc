"""Aggregation strategies: pure maths over named arrays, no I/O.

A strategy is a pair of functions, ``init(weights) -> state`` and
``apply(state, weights, mean_delta) -> (weights, state)``; the running weighted sum that produces
``mean_delta`` lives in ``fedfleet.strategies.accumulate`` and is shared by all of them.
"""

from fedfleet.errors import ConfigError
from fedfleet.strategies.fedavg import FedAvg, Strategy

STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"The 'strategy' option must be one of {sorted(STRATEGIES)}. Got {name!r} instead.",
                          option="strategy") from None


__all__ = ["STRATEGIES", "FedAvg", "Strategy", "make_strategy"]
