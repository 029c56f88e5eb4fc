"""The examples in the docstrings run, and give what they say: every module of the package that has one
(found by walking the package, so a new module's examples are never left out of the suite)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from importlib.util import find_spec
from pathlib import Path

import pytest

import fedfleet


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(fedfleet.__path__, "fedfleet."):
        spec = find_spec(info.name)
        origin = spec.origin if spec is not None else None
        if origin and origin.endswith(".py") and ">>> " in Path(origin).read_text(encoding="utf-8"):
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_walk_finds_the_modules_known_to_have_examples() -> None:
    assert {"fedfleet.config", "fedfleet.storage.history", "fedfleet.report.compare"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has '>>> ' in its text but no example doctest can find"
    assert result.failed == 0
