"""Byzantine-robust aggregation of the workers' deltas: what a few hostile updates cannot drag far.

These need every delta of a round at once (memory O(model × workers)), unlike the running mean.
All are pure functions of the list of deltas; the example counts are ignored on purpose, since a
malicious worker would simply claim a large one.

- coordinate-wise median (Yin et al., 2018);
- coordinate-wise trimmed mean, dropping the ``k`` largest and ``k`` smallest values of each
  coordinate (Yin et al., 2018);
- Krum and multi-Krum (Blanchard et al., 2017): score each delta by the summed squared distances
  to its n − f − 2 nearest others, and average the ``m`` best scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedfleet.types import Weights


def _stack(deltas: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([d[name] for d in deltas])


def coordinate_median(deltas: Sequence[Weights]) -> Weights:
    """Per coordinate, the median of the deltas.

    >>> d = [{"w": np.array([1.0])}, {"w": np.array([2.0])}, {"w": np.array([100.0])}]
    >>> coordinate_median(d)["w"]
    array([2.])
    """
    if not deltas:
        raise ValueError("median of no deltas")
    return {k: np.median(_stack(deltas, k), axis=0).astype(v.dtype) for k, v in deltas[0].items()}


def trimmed_mean(deltas: Sequence[Weights], trim: int) -> Weights:
    """Per coordinate, the mean after dropping the ``trim`` largest and ``trim`` smallest values.

    >>> d = [{"w": np.array([x])} for x in (-50.0, 1.0, 2.0, 3.0, 90.0)]
    >>> trimmed_mean(d, 1)["w"]
    array([2.])
    """
    n = len(deltas)
    if trim < 0 or n <= 2 * trim:
        raise ValueError(f"cannot trim {trim} from each end of {n} deltas: need more than {2 * trim}")
    out = {}
    for k, v in deltas[0].items():
        s = np.sort(_stack(deltas, k), axis=0)
        out[k] = s[trim:n - trim].mean(axis=0).astype(v.dtype)
    return out


def krum_scores(deltas: Sequence[Weights], byzantine: int) -> np.ndarray:
    """Krum score of each delta: sum of squared distances to its n − f − 2 nearest other deltas."""
    n = len(deltas)
    if n < 2 * byzantine + 3:
        raise ValueError(f"Krum with f={byzantine} needs at least {2 * byzantine + 3} deltas, got {n}")
    flat = np.stack([np.concatenate([np.ravel(d[k]).astype(np.float64) for k in d]) for d in deltas])
    sq = np.sum(flat * flat, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    nearest = n - byzantine - 2
    # Column 0 of each sorted row is the delta's zero distance to itself.
    scores: np.ndarray = np.sort(dist, axis=1)[:, 1:nearest + 1].sum(axis=1)
    return scores


def krum(deltas: Sequence[Weights], byzantine: int, select: int = 1) -> Weights:
    """Multi-Krum: the mean of the ``select`` deltas with the lowest Krum scores (1: plain Krum)."""
    if not 1 <= select <= len(deltas):
        raise ValueError(f"Krum can select 1..{len(deltas)} deltas, not {select}")
    best = np.argsort(krum_scores(deltas, byzantine), kind="stable")[:select]
    return {k: np.mean([deltas[i][k] for i in best], axis=0).astype(v.dtype) for k, v in deltas[0].items()}
