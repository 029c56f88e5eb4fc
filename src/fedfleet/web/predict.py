"""Prediction for any task that offers it (``fedfleet.tasks.predict``): ``/v1/predict``'s request and answer.

A row is an object of feature name → value, checked here against the task's feature schema before the
task sees it, so that every task's client gets the same messages, each naming the row and feature:
a name that is no feature, a value of the wrong type, a number that is not finite, not whole where the
feature takes whole numbers, or outside the feature's ``limits`` (where the task declares them; other
numbers are predicted from as they are, however far from the training data's range, since a model's
answer there is the client's to judge). A feature left out, null or "" is missing: imputed with the
mean (a number) or none of its values (a category), and reported, unless the feature is ``required``.
A category value the model does not know is taken as "other", and reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from fedfleet.tasks.predict import Predictor, is_regression, target_name

MAX_BATCH = 1000
MOST = 10  # problems named in one message; past it they are counted
MOST_LISTED = 100  # problems listed one by one in a 422's body
NAME_SHOWN = 40  # characters of a name or value sent by a client that a message repeats


class NumberFeature(BaseModel):
    """A number feature: its range and mean in the training data, and what it can be at all (``limits``)."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    kind: Literal["number"]
    min: float = Field(description="the smallest value in the training data")
    max: float = Field(description="the largest value in the training data")
    mean: float = Field(description="the training data's mean: what a missing value is imputed with")
    integer: bool = Field(False, description="only whole numbers")
    unit: str = ""
    description: str = ""
    limits: tuple[float, float] | None = Field(None, description="[low, high]: a value outside is refused")
    required: bool = Field(False, description="a missing value is refused rather than imputed")


class CategoryFeature(BaseModel):
    """A category feature: the values the model knows; any other is taken as "other"."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    kind: Literal["category"]
    values: list[str]
    description: str = ""
    required: bool = Field(False, description="a missing value is refused rather than taken as none of the values")


Feature = Annotated[NumberFeature | CategoryFeature, Field(discriminator="kind")]
FEATURES = TypeAdapter(list[Feature])
Problem = Literal["classification", "regression"]


class PredictInfo(BaseModel):
    """What the prediction page needs to draw its form."""

    task: str
    problem: Problem
    target: str | None = Field(description="what the model predicts, if the task says")
    classes: list[str] = Field(description="the classes, in the order of the model's outputs; [] for a regression")
    model_version: int
    round: int = Field(description="training rounds the model has been through (0: not trained yet)")
    features: list[Feature]
    max_rows: int = Field(description="the most rows one POST /v1/predict takes")
    song_search: bool = Field(description="whether GET /v1/songs searches the run's data set (the songs task)")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # "songs" is the name this list had when only the songs task predicted; clients written then still work.
    rows: list[dict[str, Any]] = Field(
        min_length=1, max_length=MAX_BATCH, validation_alias=AliasChoices("rows", "songs"),
        description=f"1 to {MAX_BATCH} rows, each an object of feature name → value (a number, or a category's "
                    "value as text); a feature left out, null or \"\" is missing")


class Prediction(BaseModel):
    predicted_class: str | None = Field(default=None, serialization_alias="class",
                                        description="the most probable class (classification)")
    probabilities: dict[str, float] | None = Field(default=None, description="each class's probability; they sum to 1")
    value: float | None = Field(default=None, description="the predicted value (regression)")
    missing: list[str] = Field(description="features not given: a number's is the mean, a category's none of its "
                                           "values")
    other: dict[str, str] = Field(description="category features whose value the model does not know, with the "
                                              "value: taken as \"other\"")


class PredictResponse(BaseModel):
    task: str
    problem: Problem
    model_version: int
    round: int
    classes: list[str]
    predictions: list[Prediction]


class SongMatch(BaseModel):
    uri: str
    title: str
    artist: str
    era: str = Field(description="the song's true era in the data set")
    held_out: bool = Field(description="in the coordinator's test set, so no worker trained on it")
    features: dict[str, float]


class SongSearch(BaseModel):
    query: str
    total: int = Field(description="songs that match; at most `limit` are listed")
    songs: list[SongMatch]


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row: ``message`` names the features but not the row (the page shows one row)."""

    row: int
    features: list[str]
    message: str

    def line(self) -> str:
        return f"row {self.row}: {self.message}"


class RowsRejected(Exception):
    """Rows that cannot be predicted from; the client gets a 422 listing ``problems``."""

    def __init__(self, problems: list[RowProblem]) -> None:
        super().__init__(problems[0].line())
        self.problems = problems

    def body(self) -> dict[str, Any]:
        more = f"; and {len(self.problems) - MOST} more problems" if len(self.problems) > MOST else ""
        return {"detail": "invalid request: " + "; ".join(p.line() for p in self.problems[:MOST]) + more,
                "problems": [{"row": p.row, "features": p.features, "message": p.message}
                             for p in self.problems[:MOST_LISTED]]}


@dataclass(frozen=True)
class Checked:
    """Rows that passed the checks, with what each lacked (``missing``) and its unknown categories (``other``)."""

    rows: list[dict[str, object]]
    missing: list[list[str]]
    other: list[dict[str, str]]


class Schema:
    """A task's features, parsed once, and the checks of rows against them."""

    def __init__(self, task: Predictor, raw: object) -> None:
        self.task = task
        self.features: list[NumberFeature | CategoryFeature] = FEATURES.validate_python(raw)
        self.by_name = {f.name: f for f in self.features}
        if len(self.by_name) < len(self.features):
            raise ValueError("feature names repeat")
        self._known = {f.name: frozenset(f.values) for f in self.features if isinstance(f, CategoryFeature)}

    @property
    def problem(self) -> Problem:
        return "regression" if is_regression(self.task) else "classification"

    def info(self, task_name: str, model_version: int, round: int, song_search: bool) -> PredictInfo:
        return PredictInfo(task=task_name, problem=self.problem, target=target_name(self.task),
                           classes=list(self.task.classes), model_version=model_version, round=round,
                           features=self.features, max_rows=MAX_BATCH, song_search=song_search)

    def check(self, rows: Sequence[Mapping[str, Any]]) -> Checked:
        """``rows`` without their missing values; RowsRejected lists every problem of every row."""
        problems: list[RowProblem] = []
        checked = Checked([], [], [])
        for i, row in enumerate(rows):
            unknown = [k for k in row if k not in self.by_name]
            if unknown:
                problems.append(RowProblem(i, unknown, self._unknown(unknown)))
            clean: dict[str, object] = {}
            missing: list[str] = []
            other: dict[str, str] = {}
            for f in self.features:
                value = row.get(f.name)
                if value is None or value == "":
                    missing.append(f.name)
                    continue
                problem = _number_problem(f, value) if isinstance(f, NumberFeature) else _category_problem(f, value)
                if problem:
                    problems.append(RowProblem(i, [f.name], problem))
                    continue
                clean[f.name] = value
                if isinstance(f, CategoryFeature) and value not in self._known[f.name]:
                    other[f.name] = str(value)
            required = [name for name in missing if self.by_name[name].required]
            if required:
                names = ", ".join(f"'{_shown(n)}'" for n in required)
                problems.append(RowProblem(i, required, f"feature {names} is missing" if len(required) == 1
                                           else f"features {names} are missing"))
            checked.rows.append(clean)
            checked.missing.append(missing)
            checked.other.append(other)
        if problems:
            raise RowsRejected(problems)
        return checked

    def _unknown(self, names: list[str]) -> str:
        listed = ", ".join(f"'{_shown(n)}'" for n in names[:MOST])
        verb = "is not a feature" if len(names) == 1 else "are not features"
        features = ", ".join(self.by_name)
        if len(features) > 300:  # a table of many columns: the page lists them; a message names a few
            features = features[:300].rsplit(", ", 1)[0] + ", …"
        return f"{listed} {verb}; the features are {features}"

    def answer(self, task_name: str, model_version: int, round: int, checked: Checked,
               output: np.ndarray) -> PredictResponse:
        """The task's ``output`` for ``checked`` rows as the API's answer; RowsRejected for a row whose output
        is not finite, and ValueError if the output is not the shape the task's classes make."""
        n, classes = len(checked.rows), list(self.task.classes)
        out = np.asarray(output, dtype=np.float64)
        expected = (n,) if not classes else (n, len(classes))
        if out.shape != expected:
            raise ValueError(f"predict_rows answered {n} rows with an array of shape {out.shape}, not {expected}")
        bad = [i for i in range(n) if not np.isfinite(out[i]).all()]
        if bad:
            raise RowsRejected([RowProblem(i, [], "the model's answer for this row is not finite: a value is far "
                                                  "outside the training data's range, or the model diverged")
                                for i in bad])
        predictions = []
        for i in range(n):
            if classes:
                # A float32 softmax row sums to 1 within ~1e-7; renormalised in float64 the JSON sums to 1.
                p = np.clip(out[i], 0.0, None)
                p /= p.sum()
                predictions.append(Prediction(predicted_class=classes[int(p.argmax())],
                                              probabilities=dict(zip(classes, p.tolist(), strict=True)),
                                              missing=checked.missing[i], other=checked.other[i]))
            else:
                predictions.append(Prediction(value=float(out[i]), missing=checked.missing[i], other=checked.other[i]))
        return PredictResponse(task=task_name, problem=self.problem, model_version=model_version, round=round,
                               classes=classes, predictions=predictions)


def _number_problem(f: NumberFeature, value: object) -> str | None:
    name = _shown(f.name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"'{name}' must be a number, got {_got(value)}"
    if not math.isfinite(value):
        return f"'{name}' must be a finite number, got {value!r}"
    if f.integer and not float(value).is_integer():
        return f"'{name}' must be a whole number, got {value!r}"
    if f.limits is not None and not f.limits[0] <= value <= f.limits[1]:
        unit = f" {f.unit}" if f.unit else ""
        about = f" ({f.description})" if f.description else ""
        return (f"'{name}' = {value!r} is outside its plausible range "
                f"[{_num(f.limits[0])}, {_num(f.limits[1])}]{unit}{about}")
    return None


def _category_problem(f: CategoryFeature, value: object) -> str | None:
    if not isinstance(value, str):
        return f"'{_shown(f.name)}' takes a value as text (e.g. {_example(f)}), got {_got(value)}"
    return None


def _example(f: CategoryFeature) -> str:
    return json.dumps(_shown(f.values[0])) if f.values else '"a"'


def _got(value: object) -> str:
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, str):
        return repr(_shown(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _shown(text: str) -> str:
    return text if len(text) <= NAME_SHOWN else text[:NAME_SHOWN] + "…"


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def schema_problem(exc: ValidationError | ValueError) -> str:
    """Why a task's feature schema cannot be used, in one line."""
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


def explain(errors: Sequence[Any]) -> str:
    """Errors of a request's shape (not JSON, no rows, too many, a row that is not an object) as one line."""
    parts: list[str] = []
    for err in errors:
        loc = [p for p in err["loc"] if p != "body"]
        ctx = err.get("ctx") or {}
        if err["type"] == "json_invalid":
            parts.append(f"body is not valid JSON ({ctx.get('error', err['msg'])})")
        elif len(loc) >= 2 and loc[0] in ("rows", "songs") and isinstance(loc[1], int):
            text = "must be an object of feature name → value" if err["type"] == "dict_type" else err["msg"]
            parts.append(f"row {loc[1]}: {text}")
        else:
            text = str(ctx.get("error", err["msg"])) if err["type"] == "value_error" else err["msg"]
            parts.append(f"{'.'.join(str(p) for p in loc) or 'body'}: {text}")
    more = f"; and {len(parts) - MOST} more problems" if len(parts) > MOST else ""
    return "invalid request: " + "; ".join(parts[:MOST]) + more
