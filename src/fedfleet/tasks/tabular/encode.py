"""Rows to model inputs and targets, as the plan says.

Each number feature becomes its standardised value ((x − mean) / scale, over all sites), a missing
value (empty, NaN or ±Inf) the mean, i.e. 0, plus a 0/1 missing indicator when the plan saw missing
values. Each category feature becomes one-hot over its vocabulary and "other" (a value below
``min_count``, or one no site had); a missing category is all zeros. A class label becomes the index
of its class in the plan's sorted ``classes`` (-1 for a class no site had); a regression label is
standardised with the plan's target mean and scale, so that one learning rate suits any label's units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from fedfleet.errors import TaskError
from fedfleet.tasks.tabular.describe import CategoryFeature, NumberFeature, Plan, number_text
from fedfleet.tasks.tabular.read import NUMBER, STRING, present


class Encoder:
    """The plan's map from a table of rows to a float32 feature matrix and a label vector."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.offsets: list[int] = []
        width = 0
        for f in plan.features:
            self.offsets.append(width)
            width += (1 + f.missing) if isinstance(f, NumberFeature) else len(f.values) + 1
        self.width = width
        self.outputs = len(plan.classes) if plan.classes is not None else 1
        self._vocab = {f.name: pa.array(f.values, pa.string()) for f in plan.features
                       if isinstance(f, CategoryFeature)}
        classes = plan.classes or []
        self._classes = pa.array([float(c) for c in classes] if plan.label_type == NUMBER else classes,
                                 pa.float64() if plan.label_type == NUMBER else pa.string())

    @property
    def feature_columns(self) -> dict[str, str]:
        """Each feature column and how it is read (NUMBER or STRING)."""
        return {f.name: NUMBER if isinstance(f, NumberFeature) else STRING for f in self.plan.features}

    @property
    def columns(self) -> dict[str, str]:
        """The columns a labelled table needs: the label, then the features."""
        return {self.plan.label: NUMBER if self.plan.label_type == NUMBER else STRING, **self.feature_columns}

    def features(self, table: pa.Table) -> np.ndarray:
        out = np.zeros((table.num_rows, self.width), dtype=np.float32)
        for f, at in zip(self.plan.features, self.offsets, strict=True):
            column = table.column(f.name)
            if isinstance(f, NumberFeature):
                x = column.to_numpy(zero_copy_only=False).astype(np.float64)
                missing = ~np.isfinite(x)
                with np.errstate(invalid="ignore", over="ignore"):
                    out[:, at] = np.where(missing, 0.0, (x - f.mean) / f.scale)
                if f.missing:
                    out[:, at + 1] = missing
            else:
                other = len(f.values)
                index = pc.fill_null(pc.index_in(column, value_set=self._vocab[f.name]), other)
                rows = np.flatnonzero(pc.is_valid(column).to_numpy(zero_copy_only=False))
                out[rows, at + index.to_numpy(zero_copy_only=False)[rows]] = 1.0
        return out

    def labelled(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(features, targets) of the rows of ``table`` that have a label: class indices (int64, -1 for a class
        the plan lacks) or standardised values (float32)."""
        y = table.column(self.plan.label)
        keep = present(y, self.plan.label_type)
        if not keep.all():
            table = table.filter(pa.array(keep))
            y = table.column(self.plan.label)
        x = self.features(table)
        target = self.plan.target
        if target is None:
            index = pc.fill_null(pc.index_in(y, value_set=self._classes), -1)
            return x, index.to_numpy(zero_copy_only=False).astype(np.int64)
        values = y.to_numpy(zero_copy_only=False).astype(np.float64)
        return x, ((values - target.mean) / target.scale).astype(np.float32)

    def table_of(self, rows: Sequence[Mapping[str, object]]) -> pa.Table:
        """``rows`` (feature name → value, as a form sends them) as a table of the feature columns; TaskError
        names a row and feature whose value is not one the feature takes. A feature left out, None or "" is
        missing; a key that is neither a feature nor the label is refused, to catch a misspelt name."""
        known = {*self.feature_columns, self.plan.label}
        columns: dict[str, list[float | str | None]] = {name: [] for name in self.feature_columns}
        for i, row in enumerate(rows):
            unknown = sorted(k for k in row if k not in known)
            if unknown:
                raise TaskError(f"row {i}: {unknown[0]!r} is not a feature: the features are "
                                f"{', '.join(self.feature_columns)}"[:1000])
            for name, kind in self.feature_columns.items():
                columns[name].append(_value(row.get(name), kind, i, name))
        return pa.table({name: pa.array(values, pa.float64() if self.feature_columns[name] == NUMBER else pa.string())
                         for name, values in columns.items()})


def _value(value: object, kind: str, row: int, name: str) -> float | str | None:
    if value is None or value == "":
        return None
    if kind == NUMBER:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TaskError(f"row {row}: feature {name!r} takes a number, not {type(value).__name__}")
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise TaskError(f"row {row}: feature {name!r} takes a number, not {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TaskError(f"row {row}: feature {name!r} takes a category (text), not {type(value).__name__}")
    return number_text(float(value)) if isinstance(value, float) else str(value)
