"""Scores summed over chunks of rows, so that a file larger than memory is scored in one pass.

Classification: ``loss`` (mean cross-entropy), ``accuracy`` and ``recall_<k>`` for each class index k
the data has rows of. A row whose class no site had counts as wrong, and is left out of the loss (it
has no probability). Regression: ``loss`` (mean squared error of the standardised label), ``r2``,
``rmse`` (in the label's units) and ``accuracy``, R² again, the name the coordinator reads a score by.
"""

from __future__ import annotations

import math

import numpy as np

from fedfleet.storage.records import MAX_CONFUSION_CLASSES
from fedfleet.tasks.base import confusion_counts


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


class ClassScores:
    def __init__(self, classes: int) -> None:
        self.rows = 0
        self.known = 0  # rows of a class the plan has
        self.loss = 0.0
        self.correct = 0
        self.per_class = np.zeros(classes, dtype=np.int64)
        self.hits = np.zeros(classes, dtype=np.int64)
        # True × predicted counts of the rows of a class the plan has (a row of an unknown class has no row
        # here, so the diagonal's share is the accuracy of the known rows); none past the matrix's cap.
        self.confusion = np.zeros((classes, classes), dtype=np.int64) if classes <= MAX_CONFUSION_CLASSES else None

    def add(self, logits: np.ndarray, y: np.ndarray) -> None:
        known = y >= 0
        logp = log_softmax(logits.astype(np.float64))
        predicted = logp.argmax(axis=1)
        right = known & (predicted == y)
        self.rows += len(y)
        self.known += int(known.sum())
        self.loss -= float(logp[np.flatnonzero(known), y[known]].sum())
        self.correct += int(right.sum())
        self.per_class += np.bincount(y[known], minlength=len(self.per_class))
        self.hits += np.bincount(y[right], minlength=len(self.hits))
        if self.confusion is not None:
            self.confusion += confusion_counts(y[known], predicted[known], len(self.confusion))

    def result(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss / max(self.known, 1), f"{prefix}accuracy": self.correct / max(self.rows, 1)}
        if not prefix:
            out |= {f"recall_{k}": float(self.hits[k] / n) for k, n in enumerate(self.per_class) if n}
        return out


class RegressionScores:
    def __init__(self, scale: float) -> None:
        self.scale = scale  # of the label: predictions and targets arrive standardised
        self.rows = 0
        self.sse = 0.0
        self.sum = 0.0
        self.sumsq = 0.0

    def add(self, predicted: np.ndarray, y: np.ndarray) -> None:
        y64 = y.astype(np.float64)
        self.rows += len(y)
        self.sse += float(np.square(predicted.reshape(-1).astype(np.float64) - y64).sum())
        self.sum += float(y64.sum())
        self.sumsq += float(np.square(y64).sum())

    def r2(self) -> float:
        if not self.rows:
            return 0.0
        sst = self.sumsq - self.sum * self.sum / self.rows
        return 1.0 - self.sse / sst if sst > 0 else 0.0

    def result(self, prefix: str = "") -> dict[str, float]:
        mse = self.sse / max(self.rows, 1)
        r2 = self.r2()
        if prefix:
            return {f"{prefix}loss": mse, f"{prefix}r2": r2}
        return {"loss": mse, "accuracy": r2, "r2": r2, "rmse": math.sqrt(mse) * self.scale}


Scores = ClassScores | RegressionScores
