"""Bin edges for the booster, agreed before the first tree from what the workers may share: sums.

- ``grid_counts`` / ``quantile_edges``: each worker counts its values on a fine fixed grid over bounds
  everyone knows beforehand (the song features' documented limits); the counts are summed like any
  statistics (and would compose with secure aggregation), and the edges are the global quantiles read off
  the summed grid, to the grid's resolution. Quantile bins put the splits where the data is: uniform bins
  over a feature's range waste most of them on a long tail (song length, chorus time).
- ``uniform_edges``: equal-width bins between known minima and maxima, for data whose range was agreed
  already (the tabular task's plan) and no further round is wanted.
"""

from __future__ import annotations

import numpy as np


def grid_counts(x: np.ndarray, low: np.ndarray, high: np.ndarray, cells: int) -> np.ndarray:
    """features × cells counts of ``x``'s values on ``cells`` equal cells over [low, high] per feature;
    values outside fall in the end cells.

    >>> grid_counts(np.array([[0.0], [0.4], [0.6], [9.0]]), np.array([0.0]), np.array([1.0]), 2).tolist()
    [[2.0, 2.0]]
    """
    width = (high - low) / cells
    cell = np.floor((x - low) / np.where(width > 0, width, 1.0)).astype(np.int64)
    cell = np.clip(cell, 0, cells - 1)
    return np.stack([np.bincount(cell[:, j], minlength=cells).astype(np.float64) for j in range(x.shape[1])])


def quantile_edges(counts: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """features × (bins − 1) edges at the j/bins quantiles of the summed grid ``counts``: each edge is the upper
    boundary of the cell where the cumulative count first reaches the quantile, so a cell never straddles
    two bins. Repeated edges (a feature with few distinct values) leave empty bins, which never split.

    >>> quantile_edges(np.array([[1.0, 1.0, 1.0, 1.0]]), np.array([0.0]), np.array([4.0]), 2).tolist()
    [[2.0]]
    """
    cells = counts.shape[1]
    width = (high - low) / cells
    out = np.empty((counts.shape[0], bins - 1))
    for j in range(counts.shape[0]):
        cum = np.cumsum(counts[j])
        total = cum[-1] if cum[-1] > 0 else 1.0
        at = np.searchsorted(cum, total * np.arange(1, bins) / bins, side="left")
        out[j] = low[j] + (np.minimum(at, cells - 1) + 1) * width[j]
    return out


def uniform_edges(low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """features × (bins − 1) equally spaced edges strictly inside [low, high] per feature.

    >>> uniform_edges(np.array([0.0]), np.array([1.0]), 4).tolist()
    [[0.25, 0.5, 0.75]]
    """
    steps = np.arange(1, bins) / bins
    out: np.ndarray = low[:, None] + (high - low)[:, None] * steps[None, :]
    return out
