"""Shared value types: weights as ordered name → array maps, and the schema updates must match."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Weights = dict[str, np.ndarray]
"""A model's tensors by name, in a fixed order (the order of the safetensors file)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        # Python ints: numpy's int64 product would overflow (or wrap to 0) on a hostile shape.
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)


Schema = tuple[TensorSpec, ...]


def schema_of(weights: Weights) -> Schema:
    """The names, dtypes and shapes of ``weights``, in order."""
    return tuple(TensorSpec(k, v.dtype.name, tuple(int(d) for d in v.shape)) for k, v in weights.items())


def num_parameters(weights: Weights) -> int:
    return int(sum(v.size for v in weights.values()))


FINITE_BLOCK = 1 << 16  # elements checked at a time: the mask stays small and in cache


def is_finite(array: np.ndarray) -> bool:
    """No NaN or Inf in ``array`` (True for integer arrays), checked a block at a time into a small
    buffer: ``np.isfinite(a).all()`` would allocate a mask as large as a model, page faults and all."""
    values = np.asarray(array)
    if values.dtype.kind not in "fc":
        return True
    flat = values.reshape(-1)
    mask = np.empty(min(FINITE_BLOCK, flat.size), dtype=bool)
    for pos in range(0, flat.size, FINITE_BLOCK):
        end = min(pos + FINITE_BLOCK, flat.size)
        if not np.isfinite(flat[pos:end], out=mask[: end - pos]).all():
            return False
    return True


def all_finite(weights: Weights) -> str | None:
    """The first floating tensor of ``weights`` holding NaN or Inf, or None if all are finite."""
    for name, array in weights.items():
        if not is_finite(array):
            return name
    return None
