"""The examples in the docstrings of the pure modules run, and give what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fedfleet.config",
    "fedfleet.coordinator.live",
    "fedfleet.coordinator.ranges",
    "fedfleet.coordinator.rounds",
    "fedfleet.protocol.transfer",
    "fedfleet.report",
    "fedfleet.storage.records",
    "fedfleet.strategies.accumulate",
    "fedfleet.strategies.robust",
    "fedfleet.strategies.server_opt",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples left: remove it from MODULES"
    assert result.failed == 0
