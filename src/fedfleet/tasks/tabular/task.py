"""``TabularTask``: the ``tabular`` task, trained on each site's own CSV or Parquet files.

Before the first round every site describes its files (``describe``: aggregates, never rows), the
coordinator checks each description (``check_description``) and makes the plan from them all
(``make_plan``), and every site and the coordinator go on with ``with_plan(plan)``: the task the model's
shape, the encoding of rows and the scores follow from. An unplanned task loads and describes data;
the planned one also trains, evaluates and predicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec
from fedfleet.tasks import torch_common
from fedfleet.tasks.base import Dataset, FitResult, NoStats, TrainParams
from fedfleet.tasks.tabular import describe as desc
from fedfleet.tasks.tabular.encode import Encoder
from fedfleet.tasks.tabular.metrics import ClassScores, RegressionScores, log_softmax
from fedfleet.tasks.tabular.models import LogReg, Mlp, Model, Trees, train
from fedfleet.tasks.tabular.read import SiteData, check_types, load, read_chunks
from fedfleet.tasks.tabular.settings import OPTIONS, Settings
from fedfleet.tasks.tabular.split import split_file
from fedfleet.tasks.trees import Gbdt, run_problem
from fedfleet.tasks.trees import params as gbdt_params
from fedfleet.types import Weights

SHUFFLE_BYTES = 128 * 2**20  # encoded training rows held at once, and shuffled together, per site


def _joined(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (xs[0], ys[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ys))


@dataclass(frozen=True)
class _Planned:
    plan: desc.Plan
    encoder: Encoder
    model: Model


class TabularTask(NoStats):
    """A classifier or regressor of one column of a site's CSV or Parquet files from the others."""

    name = "tabular"
    OPTIONS: ClassVar[tuple[Option, ...]] = OPTIONS
    data_at_sites = True  # no shared data set to partition: a run's workers bring their files (--data)
    score_name: str = "accuracy"  # "r2" once planned for a regression label
    score_low: float = 0.0  # the lowest honest score: an R² may be negative
    classes: tuple[str, ...] = ()  # the plan's classes, once planned for a class label

    def __init__(self, label: str | None = None, features: str | None = None, ignore: str | None = None,
                 categorical: str | None = None, problem: str | None = None, model: str = "logreg",
                 hidden: str = "64,64", min_count: int = 5, chunk_rows: int = 65_536, *,
                 plan: Mapping[str, Any] | None = None, **gbdt: Any) -> None:
        # The label is required, but checked where it is used (loading and describing data, planning):
        # fedfleet builds every built-in task with its defaults to check it (tests/test_task_loading.py).
        self.settings = Settings.parse({
            "label": label, "features": features, "ignore": ignore, "categorical": categorical, "problem": problem,
            "model": model, "hidden": hidden, "min_count": min_count, "chunk_rows": chunk_rows, **gbdt})
        if self.settings.model == "mlp":
            torch_common.require_torch(self.name)
        self._planned: _Planned | None = None
        if plan is not None:
            self._planned = self._set_up(desc.parse_plan(plan))

    def _set_up(self, plan: desc.Plan) -> _Planned:
        if plan.label != desc.required_label(self.settings):
            raise TaskError(f"the run's plan predicts {plan.label!r}, but this task's label is "
                            f"{self.settings.label!r}")
        encoder = Encoder(plan)
        regression = plan.problem == "regression"
        model: Model
        if self.settings.model == "gbdt":
            trees = Gbdt(gbdt_params(dict(self.settings.gbdt), encoder.width, encoder.outputs, regression))
            model = Trees(trees, plan, encoder.width)
        elif self.settings.model == "mlp":
            model = Mlp(encoder.width, self.settings.hidden, encoder.outputs, regression)
        else:
            model = LogReg(encoder.width, encoder.outputs, regression)
        self.classes = tuple(plan.classes or ())
        if regression:
            self.score_name = "r2"
            # An R² below 0 (worse than predicting the mean: a first round, a skewed site) is an honest score
            # that federated evaluation must count; far below, it is a worker's nonsense.
            self.score_low = -1e6
        return _Planned(plan, encoder, model)

    def __repr__(self) -> str:
        planned = f", {self._planned.plan.problem} plan" if self._planned else ""
        return f"TabularTask(label={self.settings.label!r}, model={self.settings.model!r}{planned})"

    def _ready(self) -> _Planned:
        if self._planned is None:
            raise TaskError("the tabular task's model is shaped by the run's plan, made from every site's "
                            "description: use the task with_plan returns")
        return self._planned

    def check_run(self, config: Any) -> str | None:
        """Why the run's settings cannot train this model (``fedfleet.tasks.check_run``), or None."""
        if self.settings.model != "gbdt":
            return None
        return run_problem(config, gbdt_params(dict(self.settings.gbdt), 1, 1))

    def check_ready(self) -> None:
        """TaskError unless the options can make a run: the coordinator asks before it starts one."""
        desc.required_label(self.settings)

    @staticmethod
    def _site(data: object) -> SiteData:
        if not isinstance(data, SiteData):
            raise TaskError(f"the tabular task reads data its load_site returned, not {type(data).__name__}")
        return data

    # --- data -----------------------------------------------------------------------------------------

    def load_site(self, paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[SiteData, SiteData | None]:
        """The site's files as (training rows, validation rows or None); every file is read once here, so
        that a bad file, a missing column or a type the task cannot use is an error now, not mid-run."""
        train_part, val_part = load(paths, val_fraction, seed)
        if self._planned is not None:
            check_types(train_part, self._planned.encoder.columns)
        else:
            desc.site_columns(train_part, self.settings)
        return train_part, val_part

    def load_partition(self, spec: PartitionSpec, index: int, count: int, seed: int) -> Dataset:
        raise TaskError("the tabular task trains on each site's own files: start workers with --data FILE")

    def load_test(self) -> Dataset:
        raise TaskError("the tabular task has no test set of its own: no --test-data was given (pass the "
                        "coordinator --test-data FILE to score the global model on held-out rows)")

    def split_data(self, source: Path, out_dir: Path, count: int, spec: PartitionSpec, seed: int) -> list[Path]:
        """``source`` cut into ``count`` site files in ``out_dir`` as ``spec`` says, for ``fedfleet run
        --data-split`` (``natural:COLUMN`` keeps each value of COLUMN at one site): see ``split.split_file``."""
        return split_file(source, out_dir, count, spec, desc.required_label(self.settings), seed,
                          group_column=spec.column)

    # --- the plan -------------------------------------------------------------------------------------

    def describe(self, data: Any) -> dict[str, Any]:
        return desc.describe_site(self._site(data), self.settings)

    def check_description(self, description: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str | None:
        return desc.check_description(description, reference, self.settings)

    def make_plan(self, descriptions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return desc.make_plan(descriptions, self.settings)

    def with_plan(self, plan: Mapping[str, Any]) -> TabularTask:
        return TabularTask(**self.settings.options(), plan=plan)

    @property
    def target_name(self) -> str | None:
        """What the task predicts: the label column (for the predict page)."""
        return self.settings.label

    @property
    def plan(self) -> dict[str, Any]:
        """The run's plan, as JSON (see ``describe.Plan``)."""
        return self._ready().plan.model_dump(mode="json")

    # --- the model ------------------------------------------------------------------------------------

    def init_weights(self, seed: int) -> Weights:
        return self._ready().model.init_weights(seed)

    def _chunks(self, data: SiteData) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The site's training rows, encoded, in pieces of up to ``SHUFFLE_BYTES`` that training shuffles
        whole: all the rows of a site under it (a file sorted by label or date trains as well as a shuffled
        one; shuffling read chunks alone cost 16 points on songs sorted by era), and bounded memory beyond."""
        planned = self._ready()
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        for _, table in read_chunks(data, planned.encoder.columns, self.settings.chunk_rows):
            x, y = planned.encoder.labelled(table)
            if planned.plan.problem == "classification":
                known = y >= 0  # a class no site described cannot be trained on (the plan has no output for it)
                x, y = x[known], y[known]
            xs.append(x)
            ys.append(y)
            held += x.nbytes + y.nbytes
            if held >= SHUFFLE_BYTES:
                yield _joined(xs, ys)
                xs, ys, held = [], [], 0
        if xs:
            yield _joined(xs, ys)

    def _scores(self) -> ClassScores | RegressionScores:
        plan = self._ready().plan
        return ClassScores(len(plan.classes)) if plan.classes is not None else RegressionScores(
            plan.target.scale if plan.target else 1.0)

    def label_counts(self, data: object) -> list[int] | None:
        """The site's training rows per class of the plan (one pass over its files); None for a regression."""
        classes = self._ready().plan.classes
        if classes is None:
            return None
        counts = np.zeros(len(classes), dtype=np.int64)
        for _, y in self._chunks(self._site(data)):
            counts += np.bincount(y, minlength=len(classes))
        return [int(n) for n in counts]

    def fit(self, weights: Weights, data: object, params: TrainParams) -> FitResult:
        site = self._site(data)
        model = self._ready().model
        if isinstance(model, Trees):
            return model.fit(weights, lambda: self._chunks(site), self._scores())
        return train(model, weights, lambda: self._chunks(site), params, self._scores)

    def evaluate(self, weights: Weights, data: object) -> dict[str, float]:
        """``loss`` and ``accuracy`` (R² for a regression label, also as ``r2``, with ``rmse``), and for a
        class label ``recall_<k>`` of each class index k with rows in ``data`` (see ``metrics``)."""
        return self.evaluate_confusion(weights, data)[0]

    def evaluate_confusion(self, weights: Weights, data: object) -> tuple[dict[str, float], np.ndarray | None]:
        """``evaluate``'s scores and, for a class label, the true × predicted class counts of the same pass."""
        planned = self._ready()
        scores = self._scores()
        for _, table in read_chunks(self._site(data), planned.encoder.columns, self.settings.chunk_rows):
            x, y = planned.encoder.labelled(table)
            scores.add(planned.model.outputs(weights, x), y)
        return scores.result(), scores.confusion if isinstance(scores, ClassScores) else None

    def fit_central(self, paths: Sequence[Path], epochs: int, lr: float, batch_size: int,
                    seed: int = 0) -> tuple[TabularTask, Weights]:
        """The reference a federated run is measured against: the same plan and model trained on the union
        of ``paths`` in one place, one epoch per federated round. Returns the planned task and its weights."""
        data, _ = self.load_site(paths, 0.0, seed)
        planned = self.with_plan(self.make_plan([self.describe(data)]))
        weights = planned.init_weights(seed)
        for epoch in range(epochs):
            weights = planned.fit(weights, data, TrainParams(1, batch_size, lr, seed=epoch)).weights
        return planned, weights

    # --- for the predict page -------------------------------------------------------------------------

    def feature_schema(self) -> list[dict[str, Any]]:
        """The features a prediction takes, in the plan's order: ``name``, ``kind`` (number or category), and
        ``min``, ``max``, ``mean`` and ``integer`` (whole numbers only, at every site) of a number, or the
        ``values`` of a category (any other is "other"). See ``fedfleet.tasks.predict``."""
        out: list[dict[str, Any]] = []
        for f in self._ready().plan.features:
            if isinstance(f, desc.NumberFeature):
                out.append({"name": f.name, "kind": "number", "min": f.min, "max": f.max, "mean": f.mean,
                            "integer": f.integer})
            else:
                out.append({"name": f.name, "kind": "category", "values": list(f.values)})
        return out

    def predict_rows(self, weights: Weights, rows: Sequence[Mapping[str, object]]) -> np.ndarray:
        """Class probabilities (rows × classes, in the order of ``classes``) or predicted values (rows) for
        ``rows`` of feature name → value; a feature left out, None or "" is missing (see ``Encoder.table_of``)."""
        planned = self._ready()
        target = planned.plan.target
        if not rows:
            return np.zeros((0, planned.encoder.outputs) if target is None else 0)
        x = planned.encoder.features(planned.encoder.table_of(rows))
        out = planned.model.outputs(weights, x).astype(np.float64)
        if target is None:
            probabilities: np.ndarray = np.exp(log_softmax(out))
            return probabilities
        values: np.ndarray = out[:, 0] * target.scale + target.mean
        return values
