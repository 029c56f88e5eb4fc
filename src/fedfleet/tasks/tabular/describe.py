"""Descriptions (what one site reports of its data) and the plan the run agrees from them.

A site describes the columns it trains on, counting only its rows that have a label: for a number
column its count, sum, sum of squares, min and max; for a category column each value's count; for the
label whichever of the two its type gives (a number label also its values' counts, when there are at
most ``MAX_VALUES`` of them). Never rows. The plan is what a central pipeline would compute from all
the rows: the label's classes (sorted), each category column's vocabulary (values counted at least
``min_count`` times over all sites, sorted; the rest become "other"), and each number column's mean,
scale (standard deviation), min and max. Sums of the sites' aggregates are the union's aggregates, so
the plan is the one the union of the files would give.

A description comes from a worker over the network: ``Description`` checks it with pydantic (types,
bounds on every count, string and list) and for consistency (count + missing = rows; a sum within
count·[min, max]; Cauchy–Schwarz, n·Σx² ≥ (Σx)², against a negative variance; value counts that add
up), so a bad one gets a message instead of becoming part of the plan.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from fedfleet.errors import TaskError
from fedfleet.tasks.tabular.read import EMPTY, NUMBER, STRING, SiteData, check_types, present, read_chunks
from fedfleet.tasks.tabular.settings import MAX_NAME, Settings

FORMAT = 1  # of descriptions and plans: a site and a coordinator of different versions refuse each other
MAX_VALUES = 10_000  # distinct values of one column a site reports
MAX_TOTAL_VALUES = 100_000  # distinct values over all of a site's columns
MAX_COLUMNS = 1_000  # feature columns
MAX_COUNT = 10**12  # rows of one site, and of all sites together
MAX_ABS = 1e15  # |value| of a number column: far beyond money in cents or timestamps in ms
CLASS_LIMIT = 50  # a whole-number label with at most this many distinct values is a class label by default
RELATIVE = 1e-9  # rounding allowed in the consistency checks of sums

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Positive = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Real = Annotated[float, Field(allow_inf_nan=False)]
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


def number_text(value: float) -> str:
    """A number label value as a class name: ``3`` for 3.0, the shortest round-trip text otherwise."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _stats_problem(n: int, total: float, squares: float, low: float, high: float, integer: bool) -> str | None:
    """Why count ``n``, sum, sum of squares, min and max cannot come from ``n`` real numbers, or None."""
    if not low <= high:
        return f"min {low:g} is above max {high:g}"
    if max(abs(low), abs(high)) > MAX_ABS:
        return f"min {low:g} or max {high:g} is beyond ±{MAX_ABS:g}"
    if integer and not (low.is_integer() and high.is_integer()):
        return f"integer is true, but min {low:g} or max {high:g} is not a whole number"
    slack = RELATIVE * n * max(abs(low), abs(high), 1.0)
    if not n * low - slack <= total <= n * high + slack:
        return f"sum {total:g} is outside count·[min, max] = [{n * low:g}, {n * high:g}]"
    if not 0 <= squares <= n * max(low * low, high * high) * (1 + RELATIVE) + slack:
        return f"sumsq {squares:g} is outside [0, count·max(min², max²)]"
    if not squares * n >= total * total * (1 - RELATIVE) - slack:
        return f"sumsq·count ({squares * n:g}) is below sum² ({total * total:g}), a negative variance"
    return None


class Column(BaseModel):
    """One column as a site describes it. ``type`` is what the site's files hold; ``kind`` how the run uses it."""

    model_config = STRICT
    name: Name
    type: Literal["number", "string"]
    kind: Literal["label", "number", "category"]
    count: Positive  # rows with a value
    missing: Count
    sum: Real | None = None
    sumsq: Real | None = None
    min: Real | None = None
    max: Real | None = None
    integer: bool | None = None  # every value a whole number
    values: Annotated[dict[Name, Positive] | None, Field(max_length=MAX_VALUES)] = None

    @property
    def has_stats(self) -> bool:
        return self.kind == "number" or (self.kind == "label" and self.type == "number")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        stats = (self.sum, self.sumsq, self.min, self.max, self.integer)
        if self.kind == "number" and self.type != "number":
            raise ValueError("a number column must have type number")
        if self.has_stats:
            total, squares, low, high, integer = stats
            if total is None or squares is None or low is None or high is None or integer is None:
                raise ValueError(f"a {self.type} {self.kind} column needs sum, sumsq, min, max and integer")
            problem = _stats_problem(self.count, total, squares, low, high, integer)
            if problem:
                raise ValueError(problem)
        elif any(s is not None for s in stats):
            raise ValueError(f"a {self.kind} column has no sum, sumsq, min, max or integer")
        needs_values = self.kind == "category" or (self.kind == "label" and self.type == "string")
        if needs_values and self.values is None:
            raise ValueError(f"a {self.kind} column of type {self.type} needs values")
        if self.kind == "number" and self.values is not None:
            raise ValueError("a number column has no values")
        if self.values is not None:
            if sum(self.values.values()) != self.count:
                raise ValueError(f"the values' counts add up to {sum(self.values.values())}, not count {self.count}")
            if self.kind == "label" and self.type == "number":
                self._check_number_values()
        return self

    def _check_number_values(self) -> None:
        for text in self.values or {}:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"value {text[:40]!r} of a number label is not a number") from None
            if not (math.isfinite(value) and number_text(value) == text):
                raise ValueError(f"value {text[:40]!r} of a number label is not a number written as number_text")
            if not (self.min is not None and self.max is not None and self.min <= value <= self.max):
                raise ValueError(f"value {text!r} is outside [min, max]")
            if self.integer and not value.is_integer():
                raise ValueError(f"value {text!r} is not a whole number, but integer is true")


class Description(BaseModel):
    """What one site reports of its data: its labelled rows, and the label and feature columns."""

    model_config = STRICT
    format: Literal[1]
    label: Name
    rows: Positive  # rows with a label: the rows every column's count and missing add up to
    unlabelled: Count  # rows skipped for a missing label
    columns: Annotated[list[Column], Field(min_length=2, max_length=MAX_COLUMNS + 1)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [c.name for c in self.columns]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"column {twice!r} is described twice")
        labels = [c.name for c in self.columns if c.kind == "label"]
        if labels != [self.label]:
            raise ValueError(f"the label {self.label!r} must be the one column of kind label (found {labels})")
        for c in self.columns:
            if c.count + c.missing != self.rows:
                raise ValueError(f"column {c.name!r}: count + missing is {c.count + c.missing}, not rows {self.rows}")
        label = self.column(self.label)
        if label.missing:
            raise ValueError("the label column has missing values: rows without a label are not described")
        total = sum(len(c.values or ()) for c in self.columns)
        if total > MAX_TOTAL_VALUES:
            raise ValueError(f"{total} values over all columns, more than {MAX_TOTAL_VALUES}")
        return self

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


class NumberFeature(BaseModel):
    model_config = STRICT
    name: Name
    kind: Literal["number"]
    mean: Real
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    min: Real
    max: Real
    missing: bool  # some rows miss it: the model gets a missing-indicator input besides the (imputed) value
    integer: bool  # every value at every site a whole number (a hint for a form)


class CategoryFeature(BaseModel):
    model_config = STRICT
    name: Name
    kind: Literal["category"]
    values: Annotated[list[Name], Field(max_length=MAX_VALUES)]  # sorted; any other value is "other"


class Target(BaseModel):
    """A regression label's mean and scale (the model predicts it standardised), min and max."""

    model_config = STRICT
    mean: Real
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    min: Real
    max: Real


class Plan(BaseModel):
    """What every site and the coordinator use, agreed from the descriptions."""

    model_config = STRICT
    format: Literal[1]
    label: Name
    label_type: Literal["number", "string"]
    problem: Literal["classification", "regression"]
    classes: Annotated[list[Name], Field(min_length=2, max_length=MAX_VALUES)] | None
    target: Target | None
    rows: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    features: Annotated[list[Annotated[NumberFeature | CategoryFeature, Field(discriminator="kind")]],
                        Field(min_length=1, max_length=MAX_COLUMNS)]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.classes is None) != (self.problem == "regression") or (self.target is None) != (
                self.problem == "classification"):
            raise ValueError("a classification plan has classes and no target; a regression plan the reverse")
        if self.classes is not None and len(set(self.classes)) < len(self.classes):
            raise ValueError("the classes repeat")
        names = [f.name for f in self.features]
        if len(set(names)) < len(names) or self.label in names:
            raise ValueError("feature names must be distinct and not the label")
        for f in self.features:
            if isinstance(f, CategoryFeature) and len(set(f.values)) < len(f.values):
                raise ValueError(f"feature {f.name!r}: the values repeat")
        return self


def problem_of(exc: ValidationError, raw: object) -> str:
    """The first error of a pydantic check, in one line that names the column it is about."""
    err = exc.errors(include_url=False)[0]
    loc = list(err["loc"])
    where: list[str] = []
    if len(loc) > 1 and loc[0] in ("columns", "features") and isinstance(loc[1], int):
        name = _raw_name(raw, str(loc[0]), loc[1])
        where.append(f"column {name!r}" if name else f"{loc[0]}[{loc[1]}]")
        loc = loc[2:]
    where += [str(part) if len(str(part)) <= 40 else f"{str(part)[:40]!r}..." for part in loc]  # a key is any size
    message = str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    if isinstance(got, bool | int | float | str):  # not a list or an object: those can be any size
        message += f" (got {(got[:60] if isinstance(got, str) else got)!r})"
    return f"{', '.join(where)}: {message}" if where else message


def _raw_name(raw: object, key: str, index: int) -> str | None:
    items = raw.get(key) if isinstance(raw, Mapping) else None
    item = items[index] if isinstance(items, list) and 0 <= index < len(items) else None
    name = item.get("name") if isinstance(item, Mapping) else None
    return name if isinstance(name, str) and len(name) <= MAX_NAME else None


def parse_description(raw: Mapping[str, Any]) -> Description:
    """``raw`` checked; TaskError with ``problem_of``'s line if it is malformed."""
    try:
        return Description.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(f"description: {problem_of(exc, raw)}") from exc


def parse_plan(raw: Mapping[str, Any]) -> Plan:
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        raise TaskError(f"the run's plan is malformed: {problem_of(exc, raw)}") from exc


# --- a site's description -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Use:
    """A column a site reads: its type in the site's files and its kind in the run."""

    name: str
    type: str  # NUMBER or STRING
    kind: str  # label, number or category

    @property
    def read_as(self) -> str:
        return NUMBER if self.type == NUMBER and self.kind != "category" else STRING


def site_columns(data: SiteData, settings: Settings) -> list[Use]:
    """The label and the feature columns (sorted by name) ``data`` is read with; TaskError names a file and
    column the task cannot use (missing label or feature, a type it does not read, columns that differ)."""
    label = required_label(settings)
    first = data.files[0]
    for f in data.files:
        if label not in f.types:
            raise TaskError(f"{f.path}: no label column {label!r}: expected it among its columns "
                            f"({', '.join(f.types)})"[:1000])
    if settings.features is not None:
        features = sorted(settings.features)
    else:
        features = sorted(c for c in first.types if c != label and c not in settings.ignore)
        for f in data.files[1:]:
            other = {c for c in f.types if c != label and c not in settings.ignore}
            if other != set(features):
                raise TaskError(f"{f.path}: columns differ from {first.path}'s: {_difference(features, other)}: "
                                "name the columns to use with features=, or leave some out with ignore=")
    if not features:
        raise TaskError(f"{first.path}: no feature columns: expected columns besides the label {label!r}")
    odd = next((n for n in features if not 1 <= len(n) <= MAX_NAME), None)
    if odd is not None:
        raise TaskError(f"{first.path}: a column name of {len(odd)} characters: expected 1 to {MAX_NAME} (name the "
                        "columns to use with features=)")
    if len(features) > MAX_COLUMNS:
        raise TaskError(f"{first.path}: {len(features)} feature columns, more than {MAX_COLUMNS}: name the ones "
                        "to use with features=")
    check_types(data, dict.fromkeys([label, *features], STRING))
    categorical = settings.categorical
    unknown = sorted(set(categorical or ()) - set(features))
    if unknown:
        raise TaskError(f"{first.path}: categorical= names {unknown[0]!r}, which is not a feature column")
    uses = []
    for name in [label, *features]:
        found = {f.types[name] for f in data.files} - {EMPTY}
        kind = STRING if STRING in found else NUMBER
        if name == label:
            role = "label"
        elif categorical is None:
            role = "category" if kind == STRING else "number"
        elif name in categorical:
            role = "category"
        elif kind == STRING:
            raise TaskError(f"{data.where}: column {name!r} holds text, but categorical= does not name it: "
                            f"add it there, or leave it out with ignore={name}")
        else:
            role = "number"
        uses.append(Use(name, kind, role))
    return uses


def required_label(settings: Settings) -> str:
    if settings.label is None:
        raise TaskError("the tabular task needs to know the column to predict: --task-option label=COLUMN")
    return settings.label


def _difference(expected: Sequence[str], found: set[str]) -> str:
    missing = [n for n in expected if n not in found]
    extra = sorted(found - set(expected))
    parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
        [f"extra {', '.join(map(repr, extra))}"] if extra else [])
    return "; ".join(parts)


@dataclass
class _Tally:
    """One column's aggregates so far."""

    use: Use
    count: int = 0
    missing: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    integer: bool = True
    values: Counter[str] = field(default_factory=Counter)  # of a category or label column
    too_many: bool = False  # a number label with more than MAX_VALUES distinct values: they are not reported

    def add_numbers(self, x: np.ndarray, where: str) -> None:
        finite = x[np.isfinite(x)]  # NaN and ±Inf count as missing, as they are read at training time
        self.missing += len(x) - len(finite)
        if not len(finite):
            return
        low, high = float(finite.min()), float(finite.max())
        if max(abs(low), abs(high)) > MAX_ABS:
            raise TaskError(f"{where}: column {self.use.name!r} holds {high if abs(high) > MAX_ABS else low:g}, "
                            f"beyond ±{MAX_ABS:g}: expected numbers within it (rescale it, or "
                            f"ignore={self.use.name})")
        self.count += len(finite)
        self.sum += float(finite.sum())
        self.sumsq += float(np.square(finite).sum())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self.integer = self.integer and bool(np.all(finite == np.floor(finite)))
        if self.use.kind == "label" and not self.too_many:
            # A number label's values, in case the plan makes it a class label; past MAX_VALUES it cannot be.
            distinct, counts = np.unique(finite, return_counts=True)
            self.values.update({number_text(float(v)): int(c) for v, c in zip(distinct, counts, strict=True)})
            if len(self.values) > MAX_VALUES:
                self.too_many = True
                self.values.clear()

    def add_strings(self, column: pa.ChunkedArray, where: str) -> None:
        self.missing += column.null_count
        present = column.drop_null()
        self.count += len(present)
        if not len(present):
            return
        longest = pc.max(pc.utf8_length(present)).as_py()
        name = self.use.name
        if longest > MAX_NAME:
            raise TaskError(f"{where}: column {name!r} has a value of {longest} characters: expected categories of "
                            f"at most {MAX_NAME} (leave free text out with ignore={name})")
        counts = pc.value_counts(present)
        self.values.update(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(),
                                    strict=True)))
        if len(self.values) > MAX_VALUES:
            what = "label" if self.use.kind == "label" else "column"
            raise TaskError(f"{where}: {what} {name!r} has more than {MAX_VALUES} distinct values: too many "
                            f"categories to share; leave it out with ignore={name}, or make it numeric")

    @property
    def reports_values(self) -> bool:
        return self.use.kind != "number" and not self.too_many

    def as_json(self, where: str, rows: int) -> dict[str, Any]:
        name = self.use.name
        if not self.count:
            expected = "numbers" if self.use.read_as == NUMBER else "text"
            raise TaskError(f"{where}: column {name!r} has no values (all {rows} labelled rows miss it): expected "
                            f"{expected}; leave it out with ignore={name}")
        out: dict[str, Any] = {"name": name, "type": self.use.type, "kind": self.use.kind, "count": self.count,
                               "missing": self.missing}
        if self.use.read_as == NUMBER:
            out |= {"sum": self.sum, "sumsq": self.sumsq, "min": self.min, "max": self.max, "integer": self.integer}
        if self.reports_values:
            out["values"] = dict(sorted(self.values.items()))
        return out


def describe_site(data: SiteData, settings: Settings) -> dict[str, Any]:
    """``data``'s description (see ``Description``), read in chunks."""
    uses = site_columns(data, settings)
    label, features = uses[0], uses[1:]
    tallies = [_Tally(u) for u in uses]
    rows = unlabelled = 0
    for source, table in read_chunks(data, {u.name: u.read_as for u in uses}, settings.chunk_rows):
        where = str(source.path)
        keep = present(table.column(label.name), label.read_as)
        table = table.filter(pa.array(keep))
        unlabelled += len(keep) - table.num_rows
        rows += table.num_rows
        for tally in tallies:
            column = table.column(tally.use.name)
            if tally.use.read_as == NUMBER:
                tally.add_numbers(column.to_numpy(zero_copy_only=False), where)
            else:
                tally.add_strings(column, where)
    if not rows:
        raise TaskError(f"{data.where}: label column {label.name!r} has no values: expected a label in some rows "
                        "(rows without one are skipped)")
    if sum(len(t.values) for t in tallies if t.reports_values) > MAX_TOTAL_VALUES:
        largest = max(features, key=lambda u: len(tallies[uses.index(u)].values)).name
        raise TaskError(f"{data.where}: the columns have more than {MAX_TOTAL_VALUES} distinct values together: "
                        f"too many categories to share; leave the largest out with ignore={largest}")
    return {"format": FORMAT, "label": label.name, "rows": rows, "unlabelled": unlabelled,
            "columns": [t.as_json(data.where, rows) for t in tallies]}


# --- checking one description; the plan from all ------------------------------------------------------

def check_description(raw: Mapping[str, Any], reference: Mapping[str, Any] | None, settings: Settings) -> str | None:
    """Why ``raw`` cannot be part of the run (malformed, not what the run's options read, or columns that
    differ from the ``reference``'s), or None."""
    try:
        desc = Description.model_validate(raw)
    except ValidationError as exc:
        return f"description: {problem_of(exc, raw)}"
    label = required_label(settings)
    if desc.label != label:
        return f"the description's label is {desc.label!r}; the run's is {label!r}"
    if settings.features is not None:
        differ = _difference(sorted(settings.features), {c.name for c in desc.columns if c.kind != "label"})
        if differ:
            return f"columns differ from the run's features=: {differ}"
    for c in desc.columns:
        if c.kind == "label":
            continue
        cats = settings.categorical
        expected = "category" if (c.name in cats if cats is not None else c.type == STRING) else "number"
        if c.kind != expected:
            return f"column {c.name!r} is described as a {c.kind}; the run's options make it a {expected}"
    if reference is None:
        return None
    ref = parse_description(reference)
    mine = {c.name: c.type for c in desc.columns}
    theirs = {c.name: c.type for c in ref.columns}
    parts = []
    missing = [n for n in theirs if n not in mine]
    extra = [n for n in mine if n not in theirs]
    if missing:
        parts.append(f"missing {', '.join(map(repr, missing))}")
    if extra:
        parts.append(f"extra {', '.join(map(repr, extra))}")
    parts += [f"{n!r} is {mine[n]} here, {theirs[n]} in the run" for n in theirs if n in mine and mine[n] != theirs[n]]
    return f"columns differ from the run's: {'; '.join(parts)}" if parts else None


@dataclass
class _Merged:
    """A column's aggregates summed over the sites."""

    first: Column
    count: int = 0
    missing: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    integer: bool = True
    values: Counter[str] | None = field(default_factory=Counter)

    def add(self, c: Column) -> None:
        if (c.type, c.kind) != (self.first.type, self.first.kind):
            raise TaskError(f"column {c.name!r} is a {c.type} {c.kind} at one site, a {self.first.type} "
                            f"{self.first.kind} at another: check each description against the first")
        self.count += c.count
        self.missing += c.missing
        if c.has_stats:
            self.sum += c.sum or 0.0
            self.sumsq += c.sumsq or 0.0
            self.min = min(self.min, c.min if c.min is not None else math.inf)
            self.max = max(self.max, c.max if c.max is not None else -math.inf)
            self.integer = self.integer and bool(c.integer)
        if self.values is not None and c.values is not None:
            self.values.update(c.values)
        else:
            self.values = None

    def mean_scale(self) -> tuple[float, float]:
        mean = self.sum / self.count
        std = math.sqrt(max(self.sumsq / self.count - mean * mean, 0.0))
        # A constant column (up to rounding in the sums) is left unscaled rather than divided by ~0.
        return mean, std if std > RELATIVE * max(abs(self.min), abs(self.max)) else 1.0


def make_plan(raws: Sequence[Mapping[str, Any]], settings: Settings) -> dict[str, Any]:
    """The plan (see ``Plan``) from every site's description, each checked already."""
    descs = [parse_description(r) for r in raws]
    if not descs:
        raise TaskError("no site has described its data: the plan needs at least one description")
    label = required_label(settings)
    merged = {c.name: _Merged(c) for c in descs[0].columns}
    for d in descs:
        if set(merged) != {c.name for c in d.columns}:
            raise TaskError(f"columns differ between sites: {_difference(list(merged), {c.name for c in d.columns})}")
        for c in d.columns:
            merged[c.name].add(c)
    rows = sum(d.rows for d in descs)
    if rows > MAX_COUNT:
        raise TaskError(f"the sites describe {rows} rows together, more than {MAX_COUNT}")
    y = merged.pop(label)
    problem = _problem(y, settings.problem)
    classes: list[str] | None = None
    target: dict[str, float] | None = None
    if problem == "classification":
        values = y.values or Counter()
        numeric = y.first.type == NUMBER
        classes = sorted(values, key=float) if numeric else sorted(values)
        if len(classes) < 2:
            only = f" ({classes[0]!r})" if classes else ""
            raise TaskError(f"label {label!r} has one class{only} over all sites: a classifier needs two or more "
                            "(is label= the column to predict?)")
    else:
        mean, scale = y.mean_scale()
        if y.min == y.max:
            raise TaskError(f"label {label!r} is {y.min:g} in every row over all sites: expected values to predict")
        target = {"mean": mean, "scale": scale, "min": y.min, "max": y.max}
    features: list[dict[str, Any]] = []
    for name, m in merged.items():
        if m.first.kind == "category":
            keep = sorted(v for v, n in (m.values or Counter()).items() if n >= settings.min_count)
            features.append({"name": name, "kind": "category", "values": keep})
        else:
            mean, scale = m.mean_scale()
            features.append({"name": name, "kind": "number", "mean": mean, "scale": scale, "min": m.min,
                             "max": m.max, "missing": m.missing > 0, "integer": m.integer})
    plan = {"format": FORMAT, "label": label, "label_type": y.first.type, "problem": problem, "classes": classes,
            "target": target, "rows": rows, "features": features}
    parse_plan(plan)
    return plan


def _problem(y: _Merged, chosen: str | None) -> str:
    name = y.first.name
    if y.first.type == STRING:
        if chosen == "regression":
            raise TaskError(f"label {name!r} holds text: problem=regression needs numbers")
        return "classification"
    if chosen == "classification":
        if y.values is None:
            raise TaskError(f"label {name!r} has more than {MAX_VALUES} distinct values at a site: too many to be "
                            "classes (problem=regression?)")
        return chosen
    if chosen == "regression":
        return chosen
    few = y.values is not None and len(y.values) <= CLASS_LIMIT
    return "classification" if y.integer and few else "regression"
