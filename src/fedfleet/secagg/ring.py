"""Fixed-point encoding of an update in the ring Z/2⁶⁴Z, where masks are added and cancel.

A worker encodes ``n · q`` where ``n`` is its example count (not secret: FedAvg weighs by it) and
``q = round(scale · clip(Δ, −c, c))`` coordinate by coordinate, Δ being its delta from the global model
and ``c`` the clipping range (``--secagg-clip``). The coordinator, once the masks are removed, reads the
sum as signed 64-bit integers and divides by ``scale · Σ n``: the example-weighted mean delta.

``scale`` is chosen per round attempt from the workers' total example count, as large as keeps the sum
from wrapping: ``scale = 2⁶² / (Σ n · c)``, so |Σ n q| is 2⁶² plus a few grid steps per example at most,
far below 2⁶³. The error of the mean, coordinate by coordinate, against the same mean taken in float64
from the clipped deltas, is at most ``error_bound(scale, c)`` = 1 / (2 · scale) (rounding to the grid)
+ 4 · c · 2⁻⁵³ (four float64 roundings of a value up to c: the scaled value, the sum read back as float64,
the divisor and the division): about 1e-11 for a million examples and c = 100, far below float32's
resolution. Coordinates beyond ±c are clipped, and counted.

All arithmetic on uint64 arrays wraps modulo 2⁶⁴ (numpy's unsigned overflow), which is the ring.
"""

from __future__ import annotations

import numpy as np

RING_BITS = 64
HEADROOM_BITS = 62  # |Σ n q| stays below 2^62 plus rounding: well inside the signed range


def scale_for(total_examples: int, clip: float) -> float:
    """The largest scale at which ``total_examples`` workers' worth of clipped values cannot wrap.

    >>> scale_for(1000, 10.0) == 2.0**62 / 10_000
    True
    """
    if total_examples < 1 or not clip > 0:
        raise ValueError("need at least one example and a positive clipping range")
    return float(2.0**HEADROOM_BITS / (total_examples * clip))


def error_bound(scale: float, clip: float) -> float:
    """The most the securely aggregated mean may differ from the exact mean of the clipped deltas, per
    coordinate."""
    return 0.5 / scale + 4.0 * clip * 2.0**-53


def encode(delta: np.ndarray, clip: float, scale: float, num_examples: int) -> tuple[np.ndarray, int]:
    """(``num_examples · round(scale · clip(delta))`` as uint64 ring elements, how many coordinates were
    clipped). ``delta`` is read as float64, flat."""
    values = np.asarray(delta, dtype=np.float64).reshape(-1)
    clipped = int(np.count_nonzero(np.abs(values) > clip))
    q = np.rint(np.clip(values, -clip, clip) * scale).astype(np.int64)
    q *= np.int64(num_examples)
    return q.view(np.uint64), clipped


def decode(total: np.ndarray, scale: float, total_examples: int) -> np.ndarray:
    """The mean the unmasked ring sum ``total`` stands for: signed, divided by ``scale · total_examples``."""
    return total.view(np.int64).astype(np.float64) / (scale * total_examples)
