"""Running weighted sums of updates, folded in as they arrive: memory O(model), not O(model × workers).

Updates are folded as ``weight · (update − base)``: for training rounds ``base`` is the global model,
so the sum is of deltas (unchanged tensors stay exactly unchanged, and the mean delta is the pseudo-
gradient that server optimisers need); for a statistics round ``base`` is None and plain values are
summed.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedfleet.types import Schema, Weights


class WeightedSum:
    """Σ weightᵢ · (updateᵢ − base) over the updates added so far.

    Each term is computed in the tensor's own dtype, the sum is kept in float64 for floating tensors:
    a float32 running sum would depend on the order in which updates arrive (and lose digits with
    many workers), while float64 makes a run repeat with the same seed, whatever the arrival order,
    in all but vanishingly rare cases. The model-sized buffers are allocated once and reused: a
    fresh allocation per update costs more in page faults than the arithmetic.
    """

    def __init__(self, schema: Schema, base: Weights | None = None) -> None:
        self.schema = schema
        self.base = base
        self._dtype = {s.name: np.dtype(s.dtype) for s in schema}
        self._sum = {s.name: np.zeros(s.shape, dtype=np.float64 if np.dtype(s.dtype).kind == "f" else s.dtype)
                     for s in schema}
        self._scratch: Weights = {}  # allocated on first use; ``consume`` never needs it
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Weights, weight: float, consume: bool = False) -> None:
        """Fold one update in. The caller has checked its schema and values already.

        With ``consume`` the update's own (writable) arrays serve as scratch space and are overwritten,
        which saves one pass over memory per update.
        """
        for name, acc in self._sum.items():
            if consume:
                tmp = update[name]
            else:
                if name not in self._scratch:
                    self._scratch[name] = np.empty(acc.shape, dtype=self._dtype[name])
                tmp = self._scratch[name]
            if self.base is None:
                np.multiply(update[name], weight, out=tmp, casting="unsafe")
            else:
                np.subtract(update[name], self.base[name], out=tmp, casting="unsafe")
                tmp *= weight
            acc += tmp
        self.total_weight += weight
        self.count += 1

    def add_part(self, name: str, start: int, values: np.ndarray, weight: float) -> None:
        """Fold elements ``start .. start + len(values)`` of tensor ``name`` (flat order) of one update,
        overwriting ``values``. Element by element this is exactly ``add``, so an update folded part by
        part (streamed from a file, in bounded memory) gives the same sum; ``end_add`` counts it."""
        acc = self._sum[name].reshape(-1)[start:start + values.size]
        if self.base is None:
            np.multiply(values, weight, out=values, casting="unsafe")
        else:
            np.subtract(values, self.base[name].reshape(-1)[start:start + values.size], out=values,
                        casting="unsafe")
            values *= weight
        acc += values

    def end_add(self, weight: float) -> None:
        """Count an update folded in with ``add_part``."""
        self.total_weight += weight
        self.count += 1

    def release(self) -> None:
        """Drop the sum, the scratch space and the base once the round is aggregated (frees 2-3× the model)."""
        self._sum = {}
        self._scratch = {}
        self.base = None

    def sum(self) -> Weights:
        return {k: v.astype(self._dtype[k]) for k, v in self._sum.items()}

    def mean(self) -> Weights:
        """Σ wᵢ(xᵢ − base) / Σ wᵢ in each tensor's dtype; ZeroDivisionError when nothing was added."""
        if self.total_weight <= 0:
            raise ZeroDivisionError("mean of an empty weighted sum")
        # Divided straight into the tensor's dtype: the same values as (v / total).astype(dtype), without
        # a float64 temporary the size of the sum.
        return {k: np.divide(v, v.dtype.type(self.total_weight), out=np.empty(v.shape, self._dtype[k]),
                             casting="unsafe") for k, v in self._sum.items()}


def weighted_mean(updates: Iterable[tuple[Weights, float]]) -> Weights:
    """Reference: Σ wᵢ xᵢ / Σ wᵢ computed in float64, all updates in memory. For tests and docs.

    >>> import numpy as np
    >>> weighted_mean([({"w": np.array([0.0])}, 1), ({"w": np.array([3.0])}, 2)])["w"]
    array([2.])
    """
    items = list(updates)
    total = float(sum(w for _, w in items))
    names = list(items[0][0])
    return {n: np.sum([np.asarray(u[n], dtype=np.float64) * w for u, w in items], axis=0) / total for n in names}


class Stack:
    """Every update's ``update − base`` kept apart, for aggregators that need them all (median, Krum)."""

    def __init__(self, schema: Schema, base: Weights) -> None:
        self.schema = schema
        self.base = base
        self.deltas: list[Weights] = []
        self.weights: list[float] = []

    @property
    def count(self) -> int:
        return len(self.deltas)

    @property
    def total_weight(self) -> float:
        return float(sum(self.weights))

    def add(self, update: Weights, weight: float, consume: bool = False) -> None:
        # Always a fresh array: the update may sit in a buffer that is reused for the next upload.
        self.deltas.append({s.name: np.subtract(update[s.name], self.base[s.name]).astype(s.dtype)
                            for s in self.schema})
        self.weights.append(weight)

    def release(self) -> None:
        """Drop the deltas once the round is aggregated."""
        self.deltas = []

    def mean(self) -> Weights:
        """The example-weighted mean of the deltas, as WeightedSum would give."""
        return {s.name: np.average(np.stack([d[s.name] for d in self.deltas]), axis=0,
                                   weights=self.weights).astype(s.dtype) for s in self.schema}
