"""Running weighted sums of updates, folded in as they arrive: memory O(model), not O(model × workers).

Updates are folded as ``weight · (update − base)``: for training rounds ``base`` is the global model,
so the sum is of deltas (unchanged tensors stay exactly unchanged, and the mean delta is the pseudo-
gradient that server optimisers need); for a statistics round ``base`` is None and plain values are
summed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import numpy as np

from fedfleet.types import Schema, Weights

BLOCK = 1 << 16  # elements per float64 step of a fold or a norm: 512 KiB, which stays in cache


def delta_norm(update: Weights, base: Weights | None) -> tuple[float, str | None]:
    """(L2 norm of ``update − base`` over every floating tensor, in float64; the first tensor holding
    NaN or Inf, or None). With ``base`` None, the norm of the update itself.

    One pass checks both: a block's sum of squares is non-finite exactly when the block holds a
    non-finite value (squares of finite float32 values, ≤ 1.2e77, cannot overflow float64 in any
    block of ``BLOCK`` elements).

    >>> import numpy as np
    >>> delta_norm({"w": np.array([3.0, 4.0], dtype=np.float32)}, {"w": np.zeros(2, np.float32)})
    (5.0, None)
    >>> delta_norm({"w": np.array([np.inf], dtype=np.float32)}, None)[1]
    'w'
    """
    total = 0.0
    block = np.empty(0, dtype=np.float64)
    for name, array in update.items():
        values = np.asarray(array)
        if values.dtype.kind != "f":
            continue
        flat = values.reshape(-1)
        ref = None if base is None else np.asarray(base[name]).reshape(-1)
        if block.size == 0:
            block = np.empty(min(BLOCK, max(flat.size, 1)), dtype=np.float64)
        for pos in range(0, flat.size, BLOCK):
            end = min(pos + BLOCK, flat.size)
            if end - pos > block.size:
                block = np.empty(BLOCK, dtype=np.float64)
            b = block[: end - pos]
            b[...] = flat[pos:end]
            if ref is not None:
                b -= ref[pos:end]
            sq = sum_of_squares(b)
            if not np.isfinite(sq):
                return float("nan"), name
            total += sq
    return float(np.sqrt(total)), None


def sum_of_squares(block: np.ndarray) -> float:
    """Σ x² of a float64 block. einsum, not a BLAS dot: OpenBLAS's threads spin while the workers and
    transfers need the cores (a 10M × 10 round took 0.15 s longer with vdot)."""
    return float(np.einsum("i,i->", block, block))


class WeightedSum:
    """Σ weightᵢ · (updateᵢ − base) over the updates added so far.

    Each term and the sum are computed in float64 for floating tensors: a float32 running sum would
    depend on the order in which updates arrive (and lose digits with many workers), and a float32
    term overflows for large finite updates, while float64 makes a run repeat with the same seed,
    whatever the arrival order, in all but vanishingly rare cases, and keeps every sum of finite
    updates finite. The mean of such a sum is a convex combination of float32 values, so it is finite
    in float32 too.
    """

    def __init__(self, schema: Schema, base: Weights | None = None, wide_deltas: bool = False) -> None:
        self.schema = schema
        self.base = base
        # With ``wide_deltas`` each difference is taken in float64, exactly as ``delta_norm`` takes it, so a
        # norm measured with ``delta_norm`` before folding is the norm of what is folded: central DP scales
        # each update by C/norm and needs the folded term to be within C, not within C and a float32 rounding.
        self.wide_deltas = wide_deltas
        self._dtype = {s.name: np.dtype(s.dtype) for s in schema}
        self._sum = {s.name: np.zeros(s.shape, dtype=np.float64 if np.dtype(s.dtype).kind == "f" else s.dtype)
                     for s in schema}
        self._block = np.empty(0, dtype=np.float64)  # allocated on first use
        self._block32 = np.empty(0, dtype=np.float32)
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Weights, weight: float) -> float:
        """Fold one update in (it is only read); returns the L2 norm of its delta, computed on the way.
        The caller has checked its schema and values already."""
        sumsq = 0.0
        for name, acc in self._sum.items():
            sumsq += self._fold(acc.reshape(-1), np.asarray(update[name]).reshape(-1),
                                None if self.base is None else self.base[name].reshape(-1), weight)
        self.total_weight += weight
        self.count += 1
        return float(np.sqrt(sumsq))

    def add_part(self, name: str, start: int, values: np.ndarray, weight: float) -> float:
        """Fold elements ``start .. start + len(values)`` of tensor ``name`` (flat order) of one update;
        returns the sum of squares of that part of its delta. Element by element this is exactly ``add``,
        so an update folded part by part (streamed from a file, in bounded memory) gives the same sum;
        ``end_add`` counts it."""
        stop = start + values.size
        acc = self._sum[name].reshape(-1)[start:stop]
        base = None if self.base is None else self.base[name].reshape(-1)[start:stop]
        return self._fold(acc, values.reshape(-1), base, weight)

    def end_add(self, weight: float) -> None:
        """Count an update folded in with ``add_part``."""
        self.total_weight += weight
        self.count += 1

    def _fold(self, acc: np.ndarray, values: np.ndarray, base: np.ndarray | None, weight: float) -> float:
        """acc += weight · (values − base) a cache-sized block at a time, the product and the sum in float64;
        returns Σ (values − base)² of a floating tensor (0 for others), Inf where that overflows, taken
        from the block while it is in cache (it only has to tell a huge update from the others).

        In float32, ``weight · delta`` overflows to Inf for a finite delta of 1e35 and a few thousand
        examples; in float64 no finite float32 delta times any allowed weight (≤ 1e12) comes near the
        limit. The difference of two float32 values is taken in float32 (as fast as it gets, and exact
        enough), unless it overflows: then that block is taken in float64. Blocks keep the temporaries
        small (not a second model-sized buffer)."""
        if acc.dtype.kind != "f":
            tmp = values if base is None else values - base
            acc += tmp * acc.dtype.type(weight) if weight != 1 else tmp
            return 0.0
        if self._block.size == 0:
            self._block = np.empty(BLOCK, dtype=np.float64)
            self._block32 = np.empty(BLOCK, dtype=np.float32)
        sumsq = 0.0
        single = not self.wide_deltas and values.dtype == np.float32 and (base is None or base.dtype == np.float32)
        for pos in range(0, values.size, BLOCK):
            end = min(pos + BLOCK, values.size)
            wide = self._block[: end - pos]
            delta: np.ndarray | None = None
            if single:
                delta = values[pos:end] if base is None else self._difference32(values[pos:end], base[pos:end])
            if delta is not None:
                wide[...] = delta
            else:
                wide[...] = values[pos:end]
                if base is not None:
                    wide -= base[pos:end]
                delta = wide
            with np.errstate(over="ignore"):
                sumsq += float(np.einsum("i,i->", delta, delta))
            wide *= weight
            acc[pos:end] += wide
        return sumsq

    def _difference32(self, values: np.ndarray, base: np.ndarray) -> np.ndarray | None:
        """values − base in float32, or None if that overflows (the caller takes it in float64)."""
        out = self._block32[: values.size]
        try:
            with np.errstate(over="raise"):
                np.subtract(values, base, out=out)
        except FloatingPointError:
            return None
        return out

    def release(self) -> None:
        """Drop the sum, the scratch space and the base once the round is aggregated (frees 2-3× the model)."""
        self._sum = {}
        self._block = np.empty(0, dtype=np.float64)
        self._block32 = np.empty(0, dtype=np.float32)
        self.base = None

    def noised_mean(self, std: float, denominator: float, rng: np.random.Generator,
                    frozen: Collection[str] = ()) -> Weights:
        """(Σ + N(0, std² I)) / ``denominator`` for each floating tensor, in its dtype; zero for the tensors
        named in ``frozen`` and for integer ones (which cannot carry noise), so those are not trained and
        whatever workers sent for them is left out. Central DP's aggregate (``strategies.privacy``).

        The noise is drawn tensor by tensor in schema order, each in flat order ``BLOCK`` values at a time
        (the same values as one ``rng.standard_normal(size)`` per tensor), and added to the float64 sum in
        place: no model-sized temporary, and the sum is spent, so call this once."""
        noise = np.empty(BLOCK, dtype=np.float64)
        out: Weights = {}
        for name, acc in self._sum.items():
            dtype = self._dtype[name]
            if acc.dtype.kind != "f" or name in frozen:
                out[name] = np.zeros(acc.shape, dtype=dtype)
                continue
            flat = acc.reshape(-1)
            for pos in range(0, flat.size, BLOCK):
                block = noise[: min(BLOCK, flat.size - pos)]
                rng.standard_normal(out=block)
                block *= std
                flat[pos:pos + block.size] += block
            out[name] = np.divide(acc, acc.dtype.type(denominator), out=np.empty(acc.shape, dtype), casting="unsafe")
        return out

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

    def add(self, update: Weights, weight: float) -> float:
        """Keep the update's delta; returns its L2 norm (float64)."""
        # Always a fresh array: the update may sit in a buffer that is reused for the next upload.
        self.deltas.append({s.name: np.subtract(update[s.name], self.base[s.name]).astype(s.dtype)
                            for s in self.schema})
        self.weights.append(weight)
        return delta_norm(update, self.base)[0]

    def release(self) -> None:
        """Drop the deltas once the round is aggregated."""
        self.deltas = []

    def mean(self) -> Weights:
        """The example-weighted mean of the deltas, as WeightedSum would give."""
        return {s.name: np.average(np.stack([d[s.name] for d in self.deltas]), axis=0,
                                   weights=self.weights).astype(s.dtype) for s in self.schema}
