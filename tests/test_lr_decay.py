"""``--lr-decay γ``: round t's training instruction carries lr × γ^(t−1), for every worker, on a retried attempt
and after a resume alike (issue 18: the decaying client step FedAvg needs to settle on non-IID data)."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Fleet
from fedfleet.config import RunConfig
from fedfleet.coordinator.rounds import round_lr
from fedfleet.errors import ConfigError
from hostile import HostileWorker


def test_the_rate_is_a_function_of_the_round_only() -> None:
    assert [round_lr(0.2, 0.5, t) for t in (1, 2, 3)] == [0.2, 0.1, 0.05]
    assert round_lr(0.1, 1.0, 1000) == 0.1  # the default: a constant rate
    assert round_lr(0.1, 0.99, 0) == 0.1  # a statistics round (0) is not a training round


def test_a_decay_outside_zero_to_one_is_refused_naming_the_option() -> None:
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="lr_decay"):
            RunConfig.from_mapping({"lr_decay": bad})
    assert RunConfig.from_mapping({"lr_decay": 0.9}).lr_decay == 0.9


def test_each_round_trains_with_the_decayed_rate(fleet: Fleet) -> None:
    coord = fleet.coordinator("--task", "songs", "--workers", "1", "--rounds", "3", "--lr", "0.2", "--lr-decay",
                              "0.5", "--seed", "3", "--wait-timeout", "60", "--round-timeout", "30", "--linger", "5")
    client = HostileWorker(coord.url)
    seen: list[tuple[int, float]] = []  # (round, lr) of every training instruction the coordinator sent
    real_next = client.next_instruction

    def recording(wait: float = 2.0) -> dict[str, Any]:
        msg = real_next(wait)
        if msg.get("kind") == "train":
            seen.append((int(msg["round"]), float(msg["params"]["lr"])))
        return msg

    client.next_instruction = recording  # type: ignore[method-assign]
    try:
        client.register()
        client.run(budget=120)
    finally:
        client.close()
    assert client.stopped
    assert sorted(set(seen)) == [(1, 0.2), (2, 0.1), (3, 0.05)]
