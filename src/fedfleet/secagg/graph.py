"""Who masks with whom: SecAgg+'s sparse graph (Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).

With N workers, each pairs with k others instead of all N − 1: the workers are put in a random
order on a ring and each is the neighbour of the k/2 before and the k/2 after it (a Harary graph
H(k, N) under a random permutation). Pairwise masks, key shares and the threshold are all within
a worker's neighbourhood, so the cost per worker grows with k, not N; with k = O(log N) the graph
stays connected among the survivors with overwhelming probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def default_neighbours(n: int) -> int:
    """``--secagg-neighbours`` when not given: every other worker up to 20 workers, else ⌈3 log₂ N⌉
    (rounded up to even, as the ring takes k/2 on each side).

    >>> default_neighbours(10), default_neighbours(50), default_neighbours(100)
    (9, 18, 20)
    """
    if n <= 20:
        return max(n - 1, 0)
    k = math.ceil(3 * math.log2(n))
    return min(n - 1, k + k % 2)


def neighbours(workers: Sequence[str], k: int, seed: int) -> dict[str, tuple[str, ...]]:
    """Each worker's neighbours (sorted), a symmetric relation: all the others if ``k`` ≥ N − 1, else the
    ⌈k/2⌉ on each side in an order drawn from ``seed``.

    >>> neighbours(["a", "b", "c"], 5, seed=0)["a"]
    ('b', 'c')
    """
    ids = sorted(workers)
    n = len(ids)
    if k >= n - 1:
        return {w: tuple(v for v in ids if v != w) for w in ids}
    order = [ids[i] for i in np.random.default_rng([seed, 0x5EC]).permutation(n)]
    half = math.ceil(k / 2)
    out: dict[str, set[str]] = {w: set() for w in ids}
    for i, w in enumerate(order):
        for d in range(1, half + 1):
            v = order[(i + d) % n]
            out[w].add(v)
            out[v].add(w)
    return {w: tuple(sorted(vs)) for w, vs in out.items()}


def threshold_of(holders: int, share: float) -> int:
    """Shares needed to reconstruct a secret dealt to ``holders`` workers: ⌈share · holders⌉, at least 2
    (one share alone would be the secret itself... of a polynomial of degree 0).

    >>> threshold_of(10, 0.6), threshold_of(3, 0.6), threshold_of(2, 0.6)
    (6, 2, 2)
    """
    return min(holders, max(2, math.ceil(share * holders - 1e-9)))
