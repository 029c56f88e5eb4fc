"""Declared options: a type, a default, allowed values as data, and one error template for all.

Run options (``fedfleet.config``), strategy options (``fedfleet.strategies``) and the options of the
built-in tasks (their ``OPTIONS``) are declared this way, so every bad value anywhere gets the same
kind of message and tests can generate bad values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedfleet.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One run option: its type, default, allowed values and a one-line help."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True when ``low`` itself is not allowed
    high_open: bool = False  # True when ``high`` itself is not allowed
    choices: tuple[str, ...] = ()
    optional: bool = False  # None allowed: the value is derived, as ``default_text`` says
    default_text: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """The allowed values in words, for error messages and ``--help``."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kind = {int: "an int", float: "a float", str: "a string"}[self.kind]
        if self.low is None:
            return kind
        left = "(" if self.low_open else "["
        high = "inf)" if self.high is None else f"{_num(self.high)}{')' if self.high_open else ']'}"
        return f"{kind} in the range {left}{_num(self.low)}, {high}"

    def check(self, value: Any, noun: str = "option") -> Any:
        """Return ``value`` converted to this option's type, or raise ConfigError naming the option
        (``noun`` says what kind: "task option" for a task's)."""
        if value is None and self.optional:
            return None
        converted = _convert(self.kind, value)
        if converted is None or not self._in_range(converted):
            raise ConfigError(
                f"The '{self.name}' {noun} must be {self.allowed()}. Got {value!r} instead.",
                option=self.name,
            )
        return converted

    def _in_range(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is None:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _convert(kind: type, value: Any) -> Any:
    """Convert a flag string or TOML value to ``kind``; None when it does not fit."""
    if isinstance(value, bool):
        return None
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return None
        return None
    if kind is float:
        if isinstance(value, int | float | str):
            try:
                return float(value)
            except (ValueError, OverflowError):  # OverflowError: a TOML integer of 400 digits
                return None
        return None
    return value if isinstance(value, str) else None
