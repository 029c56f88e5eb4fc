"""Prediction, a capability a task may offer: what the predict page and ``POST /v1/predict`` use.

A task predicts when it has the members of ``Predictor``; the web layer knows only this protocol,
never a task's class. ``feature_schema()`` lists the features a prediction takes, each a dict:

- ``name``: the key of the feature in a row.
- ``kind``: ``"number"`` or ``"category"``.
- a number: ``min``, ``max`` and ``mean`` of the training data (a hint to the person filling the form,
  and the value a missing one is imputed with); a value outside [min, max] is still predicted from.
- a category: ``values``, those the model knows; any other value is taken as "other".

and optionally ``description`` (one line), and for a number ``unit``, ``integer`` (only whole numbers)
and ``limits`` ([low, high]: what the feature can be at all, e.g. 0 to 1 for a ratio; a value outside
is refused, not predicted from), and ``required`` (a missing value is refused rather than imputed).

``predict_rows(weights, rows)`` answers rows of feature name → value: class probabilities (rows ×
``classes``) or, for a task whose ``classes`` is empty (regression), predicted values (rows). The web
layer checks each row against the schema first (names, types, finite numbers, limits); a row that
passes those and that the task still cannot predict from raises ``TaskError`` naming the row and
feature ("row 2: ..."), which the client gets as a 422.

A task may also have ``target_name``, what it predicts (e.g. ``"era"``), for the page to say so.

A task that agrees a plan from the sites' descriptions (``tasks.base.has_plan``) predicts only with the
plan: ``feature_schema`` raises ``TaskError`` on the task as loaded, and works on the one
``with_plan`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import numpy as np

from fedfleet.types import Weights

PREDICTOR_MEMBERS = ("feature_schema", "predict_rows")


class Predictor(Protocol):
    """A task that predicts from rows of named features (see the module's docstring)."""

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes, in the order of ``predict_rows``' columns; empty for a regression."""
        ...

    def feature_schema(self) -> list[dict[str, Any]]:
        """The features a prediction takes, in the model's order."""
        ...

    def predict_rows(self, weights: Weights, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Class probabilities (n × classes) or predicted values (n) for ``rows``."""
        ...


def predictor(task: object) -> Predictor | None:
    """``task`` seen as a ``Predictor``, or None if it offers no prediction."""
    if all(callable(getattr(task, m, None)) for m in PREDICTOR_MEMBERS) and isinstance(
            getattr(task, "classes", None), tuple):
        return cast(Predictor, task)
    return None


def is_regression(task: Predictor) -> bool:
    """Whether ``task`` predicts a value rather than a class."""
    return not task.classes


def target_name(task: Predictor) -> str | None:
    """What ``task`` predicts (its optional ``target_name``), if it says."""
    name = getattr(task, "target_name", None)
    return name if isinstance(name, str) and name else None


class SongSearch(Protocol):
    """The songs preset's extra: the data set's songs searched by title and artist (``GET /v1/songs``)."""

    def search_songs(self, query: str, limit: int) -> dict[str, Any]:
        """``{"query", "total", "songs": [{"uri", "title", "artist", "era", "held_out", "features"}]}``:
        the songs whose title or artist holds every word of ``query``, at most ``limit``, best first."""
        ...


def song_search(task: object) -> SongSearch | None:
    """``task`` seen as a ``SongSearch``, or None if it offers none."""
    return cast(SongSearch, task) if callable(getattr(task, "search_songs", None)) else None


__all__ = ["Predictor", "SongSearch", "is_regression", "predictor", "song_search", "target_name"]
