"""Typed records of a run: one per completed round (``RoundRecord``) and one per run (``RunSummary``).

These are the coordinator's own records. What a worker reports about its local training lives in
``RoundRecord.worker_metrics`` and nowhere else, so no worker-sent name can stand in for a field the
coordinator writes (its round number, its test accuracy, its timings). Every float is finite: the
records are strict JSON (no ``NaN`` or ``Infinity``), which is what browsers, ``jq`` and other
languages' parsers accept. ``storage.run_dir`` writes and reads them; nothing else parses the files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Names a worker may give its metrics: short snake_case, so that a record stays small and a name can
# be a Prometheus label value, a JSON key and a column header without escaping.
WORKER_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
MAX_WORKER_METRICS = 32
MAX_METRIC_VALUE = 1e15  # larger magnitudes are no loss, accuracy or duration: an overflow waiting to happen
DROP_REASONS = ("name", "too_many", "range")
MAX_CONFUSION_CLASSES = 100  # a larger matrix is no view anyone reads, and every round record would carry it
LABEL_COUNT_PREFIX = "label_count_"
LABEL_COUNT_NAME = re.compile(r"^label_count_(0|[1-9][0-9]?)$")  # k < MAX_CONFUSION_CLASSES
MAX_LABEL_COUNT = 10**12  # as UpdateMeta.num_examples: no worker trains on more


class Record(BaseModel):
    # extra="ignore": a record written by an older version (worker metrics at the top level) still
    # loads, without them; allow_inf_nan=False: a non-finite value is an error, never written.
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class RoundTimings(Record):
    """Seconds of each phase of a round; they add up to ``RoundRecord.seconds``."""

    wait_workers: float = Field(ge=0, description="waiting for enough live workers before the round opened")
    open: float = Field(ge=0, description="the round open: transfers and the workers' local training")
    aggregate: float = Field(ge=0, description="turning the running sum into the new global model")
    evaluate: float = Field(ge=0, description="testing the new model on the coordinator's held-out set")
    checkpoint: float = Field(ge=0, description="writing the round's checkpoint")


class SecAggRecord(Record):
    """How a securely aggregated round went (the attempt that completed): who took part in each phase."""

    neighbours: int = Field(ge=0, description="k: how many others each worker masked with")
    needed: int = Field(ge=0, description="workers every phase needed (ceil(--secagg-threshold x sampled))")
    sampled: int = Field(ge=0)
    keys: int = Field(ge=0, description="workers that sent keys")
    dealt: int = Field(ge=0, description="workers that dealt key shares")
    uploaded: int = Field(ge=0, description="workers whose masked update was folded in")
    revealed: int = Field(ge=0, description="workers that revealed their shares to unmask")
    dropped_unmasked: int = Field(ge=0, description="workers that dealt shares but sent no update, whose "
                                                    "pairwise masks were removed")
    bad_shares: list[str] = Field(default_factory=list, max_length=1000,
                                  description="wrong shares refused, each naming its sender")
    scale: float = Field(gt=0, description="the fixed-point scale of the ring encoding")
    error_bound: float = Field(ge=0, description="most the aggregate may differ, per coordinate, from the exact "
                                                 "mean of the clipped deltas")
    setup_s: float = Field(ge=0, description="seconds of the keys and shares phases (part of timings.open)")
    unmask_s: float = Field(ge=0, description="seconds of the unmask phase, reconstruction included (part of "
                                              "timings.open: the round closes once it is unmasked)")
    control_bytes_in: int = Field(ge=0, description="bytes of keys, shares and revealed shares received")


class Confusion(Record):
    """The new global model's predictions on the held-out set: ``counts[i][j]`` examples of true class
    ``classes[i]`` predicted as ``classes[j]``. Per-class recall is counts[i][i] / sum(counts[i])."""

    classes: list[str] = Field(min_length=1, max_length=MAX_CONFUSION_CLASSES)
    counts: list[list[Annotated[int, Field(ge=0)]]]

    @model_validator(mode="after")
    def _square(self) -> Confusion:
        k = len(self.classes)
        if len(self.counts) != k or any(len(row) != k for row in self.counts):
            raise ValueError(f"confusion counts must be {k} rows of {k} (one per class), not "
                             f"{len(self.counts)} rows of {sorted({len(r) for r in self.counts})}")
        return self


class RoundRecord(Record):
    """One completed training round: a line of metrics.jsonl, a row of ``rounds`` in state.sqlite."""

    round: int = Field(ge=1)
    accuracy: float | None = Field(description="the new global model's accuracy on the held-out set")
    loss: float | None
    participants: int = Field(ge=0, description="updates aggregated")
    sampled: int = Field(ge=0)
    attempts: int = Field(ge=1)
    seconds: float = Field(ge=0)
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)
    model_version: int = Field(ge=0)
    timings: RoundTimings
    # The global model as scored on the workers' own validation splits (federated evaluation).
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    fed_accuracy_std: float | None = None
    fed_accuracy_min: float | None = None
    fed_accuracy_max: float | None = None
    fed_examples: int | None = None
    # With --server-val: the new model on the examples of the training pool the coordinator kept from the workers
    # (what choices are made on; ``accuracy`` stays the test set's). None without it, and in older records.
    val_accuracy: float | None = Field(default=None, description="with --server-val: the new model's accuracy on the "
                                                         "coordinator's validation examples")
    val_loss: float | None = Field(default=None, description="with --server-val: its loss on them")
    worker_metrics: dict[str, float] = Field(
        default_factory=dict, description="example-weighted means of what the workers reported (train_loss, "
                                          "train_s, ...), only names and values that passed validation")
    test_metrics: dict[str, float] = Field(
        default_factory=dict, description="the task's other scores of the new model on the held-out set "
                                          "(per-class recall, RMSE, R², ...)")
    updates_rejected: int = Field(0, ge=0, description="uploads for this round refused with a 4xx")
    metrics_dropped: int = Field(0, ge=0, description="worker-sent metrics dropped as invalid in this round")
    dp_epsilon: float | None = Field(
        default=None, ge=0, description="with --dp central: the epsilon spent by the run up to and including this "
                                        "round, at the run's delta")
    dp_clipped: int | None = Field(
        default=None, ge=0, description="with --dp central: updates of this round whose delta was scaled down to "
                                        "the clip norm")
    dp_clip: float | None = Field(default=None, gt=0, description="with adaptive clipping: the clip norm this round "
                                                                    "used")
    dp_unclipped_fraction: float | None = Field(
        default=None, description="with adaptive clipping: the noised share of this round's updates within the clip "
                                  "norm, which moved it for the next round")
    secagg: SecAggRecord | None = Field(default=None, description="with --secure-aggregation: its phases")
    confusion: Confusion | None = Field(
        default=None, description="true × predicted class counts of the new model on the held-out set, counted "
                                  "in the pass that scored it; None for a task that does not classify, a run "
                                  "without a held-out set, or more than 100 classes")


class RoundTiming(Record):
    round: int
    seconds: float
    wait_workers: float
    open: float
    aggregate: float
    evaluate: float
    checkpoint: float


class PrivacySummary(Record):
    """summary.json's ``dp`` block: the mechanism of a run with --dp central and what it spent."""

    mechanism: Literal["central", "distributed"]
    clip: float = Field(description="L2 norm each update's delta was clipped to (C)")
    noise_multiplier: float = Field(description="sigma: the noise on the sum of clipped deltas had std sigma x C")
    target_epsilon: float | None = Field(description="the epsilon sigma was solved for, if it was")
    delta: float
    epsilon: float = Field(ge=0, description="epsilon spent by the rounds completed, at delta")
    max_epsilon: float | None
    sample_rate: float = Field(description="q: the chance each live worker had of being sampled in a round")
    denominator: float = Field(description="the fixed divisor of the noised sum: the expected number sampled, q x N")
    rounds: int = Field(ge=0, description="noised rounds released (those epsilon counts)")
    accountant: str = Field(description="how epsilon was computed")
    seeded: bool = Field(description="whether --dp-seed made the sampling and noise reproducible (tests only)")
    clip_quantile: float | None = Field(None, description="adaptive clipping: the quantile of the update norms the "
                                                          "clip norm followed (clip is then its start)")
    last_clip: float | None = Field(None, description="adaptive clipping: the clip norm the last round used")


class RunSummary(Record):
    """summary.json: how a run ended, written once when it finishes, fails or is stopped."""

    run_id: str
    state: Literal["finished", "failed", "stopped"]
    message: str
    task: str
    partition: str
    workers: int
    rounds: int = Field(description="training rounds completed")
    rounds_planned: int
    final_accuracy: float | None = Field(description="the final model's score on the held-out set; None "
                                                     "when the run had none (evaluation 'federated')")
    final_loss: float | None
    evaluation: Literal["test", "federated"] = Field(
        "test", description="test: scored on the coordinator's held-out set; federated: only on the workers' "
                            "own validation splits (a site-data run without --test-data)")
    data_source: Literal["partitions", "sites"] = "partitions"
    final_fed_accuracy: float | None = Field(None, description="the last round's federated evaluation: the "
                                                               "global model on the workers' validation splits")
    final_val_accuracy: float | None = Field(
        default=None, description="with --server-val: the last round's accuracy on the coordinator's validation "
                                  "examples")
    seconds: float
    parameters: int
    model_version: int
    config: dict[str, Any]
    round_timings: list[RoundTiming]
    dp: PrivacySummary | None = Field(None, description="the differential privacy of the run (--dp central), "
                                                        "None without it")


def finite_or_none(value: float | None) -> float | None:
    """A score as a record may hold it: a diverged loss (Inf, NaN) is recorded as unknown."""
    return value if value is not None and math.isfinite(value) else None


def clean_worker_metrics(metrics: Mapping[str, float | None]) -> tuple[dict[str, float], dict[str, int]]:
    """The worker-sent metrics a record may hold, and how many were dropped for each reason.

    A name must match ``WORKER_METRIC_NAME``; at most ``MAX_WORKER_METRICS`` names are kept (the first
    valid ones in sorted order, so the choice does not depend on the sender's ordering); a value must be
    finite and at most ``MAX_METRIC_VALUE`` in magnitude. A worker's label mix (``label_count_<k>``, see
    ``is_label_count``) has a budget of its own, so that 20 classes do not crowd out the other names: k
    below ``MAX_CONFUSION_CLASSES``, a whole count from 0 to ``MAX_LABEL_COUNT``.

    >>> clean_worker_metrics({"train_loss": 0.5, "Accuracy!": 1.0, "x": 1e300})
    ({'train_loss': 0.5}, {'name': 1, 'range': 1})
    >>> clean_worker_metrics({"label_count_0": 7, "label_count_1": -1, "label_count_2": 0.5, "label_count_100": 1})
    ({'label_count_0': 7.0}, {'range': 2, 'name': 1})
    """
    kept: dict[str, float] = {}
    dropped: dict[str, int] = {}
    others = 0
    for name in sorted(metrics):
        value = metrics[name]
        label = isinstance(name, str) and is_label_count(name)
        if not isinstance(name, str) or not WORKER_METRIC_NAME.match(name) \
                or (name.startswith(LABEL_COUNT_PREFIX) and not label):
            reason = "name"
        elif value is None or isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or abs(value) > MAX_METRIC_VALUE \
                or (label and not (0 <= value <= MAX_LABEL_COUNT and float(value).is_integer())):
            reason = "range"
        elif not label and others >= MAX_WORKER_METRICS:
            reason = "too_many"
        else:
            kept[name] = float(value)
            others += not label
            continue
        dropped[reason] = dropped.get(reason, 0) + 1
    return kept, dropped


def is_label_count(name: str) -> bool:
    """Whether ``name`` is ``label_count_<k>``: a worker's count of its training examples of class index k
    (0 <= k < ``MAX_CONFUSION_CLASSES``, no leading zero). Kept with the update (storage.history reads it),
    never averaged into a round's ``worker_metrics``, where a mean of counts would be nonsense.

    >>> [is_label_count(n) for n in ("label_count_0", "label_count_42", "label_count_07", "label_count_100")]
    [True, True, False, False]
    """
    return LABEL_COUNT_NAME.match(name) is not None
