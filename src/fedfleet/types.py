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
