"""Histogram gradient boosting in numpy, grown one tree level per federated round.

The model is a handful of float64 arrays (``init_weights``), so it travels and is averaged like any
other model:

- ``gbdt.edges`` (features × bins−1): the bin edges, agreed before the first tree; a value's bin is the
  number of edges at or below it.
- ``gbdt.examples`` (1): N, the training examples of the whole run, which turns the workers' per-example
  histograms back into sums where the maths needs them (``l2`` and ``min_child_weight``).
- ``gbdt.cursor`` (3): the boosting step and tree level whose histograms are pending, and whether any are.
- ``gbdt.feature``, ``gbdt.threshold`` (steps × outputs × 2^depth−1 internal nodes, heap order): a node's
  split (go right when the bin is above the threshold); −1 a leaf, −2 a node not grown (yet).
- ``gbdt.value`` (steps × outputs × 2^(depth+1)−1): each node's leaf value, learning rate applied.
- ``gbdt.grad``, ``gbdt.hess`` (outputs × 2^(depth−1) × features × bins): the pending level's gradient
  and hessian histograms, per node of the level, divided by the examples they were summed over.

One round (``grow``, a worker's "fit"): the pending histograms, the example-weighted mean of every
worker's (= the pooled histograms / N), are turned into splits and leaf values, the same on every worker
since the same arrays go in; then the worker sums its own examples' gradients and hessians into the next
level's histograms. FedAvg with server learning rate 1 makes the new global model that mean: the tree
arrays agree on every worker, so their mean is them, and the histograms' is the pooled one / N.
A run of ``n_trees`` steps of depth ``max_depth`` takes ``n_trees × max_depth`` rounds; the last level's
histograms are applied where the model is used (``finalised``). Multiclass: one tree per class per step,
on the softmax's gradients p − y and hessians p(1 − p), as XGBoost and LightGBM do; regression: squared
error (gradient F − y, hessian 1). Splits maximise the gain of Chen & Guestrin (XGBoost, KDD 2016):
G_L²/(H_L+λ) + G_R²/(H_R+λ) − G²/(H+λ), each child's H at least ``min_child_weight``; leaves −G/(H+λ).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from fedfleet.errors import TaskError
from fedfleet.types import Weights

LEAF = -1  # a node that does not split
UNGROWN = -2  # a node no level has reached yet (or below a leaf)
EDGES, EXAMPLES, CURSOR = "gbdt.edges", "gbdt.examples", "gbdt.cursor"
FEATURE, THRESHOLD, VALUE, GRAD, HESS = "gbdt.feature", "gbdt.threshold", "gbdt.value", "gbdt.grad", "gbdt.hess"
STRUCTURE = (CURSOR, FEATURE, THRESHOLD)  # whole numbers: every worker writes the same ones
Chunks = Iterable[tuple[np.ndarray, np.ndarray]]  # (features, targets) pieces of one worker's examples
TIE = 1e-9  # relative difference of two splits' gains that is rounding, not a better split


@dataclass(frozen=True)
class Params:
    """The booster's settings (task options) and the data's shape."""

    n_trees: int
    max_depth: int
    learning_rate: float
    min_child_weight: float
    l2: float
    bins: int
    features: int
    outputs: int  # classes of a softmax, or 1 for a regression
    regression: bool = False

    @property
    def rounds(self) -> int:
        """Rounds a run needs: one per level of every boosting step."""
        return self.n_trees * self.max_depth

    @property
    def internal(self) -> int:
        return int(2**self.max_depth - 1)

    @property
    def nodes(self) -> int:
        return int(2 ** (self.max_depth + 1) - 1)


# --- pure maths on one node ---------------------------------------------------------------------------

def leaf_value(g: float | np.ndarray, h: float | np.ndarray, l2: float, learning_rate: float) -> np.ndarray:
    """The leaf that minimises the second-order loss: −lr · G/(H + λ); 0 where H + λ is 0.

    >>> float(leaf_value(-4.0, 2.0, 2.0, 0.5))
    0.5
    """
    g, h = np.asarray(g, dtype=np.float64), np.asarray(h, dtype=np.float64)
    den = h + l2
    out: np.ndarray = np.where(den > 0, -learning_rate * g / np.where(den > 0, den, 1.0), 0.0)
    return out


def best_split(grad: np.ndarray, hess: np.ndarray, l2: float, min_child_weight: float) -> tuple[int, int, float]:
    """The (feature, threshold bin, gain) of the best split of one node from its features × bins histograms:
    left takes the bins up to the threshold. (−1, −1, 0) when no split has positive gain with each child's
    hessian at least ``min_child_weight``. Ties go to the lowest feature, then the lowest bin, so every
    worker picks the same split from the same histograms.

    >>> best_split(np.array([[-2.0, 0.0, 2.0]]), np.array([[1.0, 1.0, 1.0]]), 0.0, 0.5)
    (0, 0, 6.0)
    """
    gl, hl = np.cumsum(grad, axis=1)[:, :-1], np.cumsum(hess, axis=1)[:, :-1]
    g, h = grad.sum(axis=1, keepdims=True), hess.sum(axis=1, keepdims=True)
    gr, hr = g - gl, h - hl
    ok = (hl >= min_child_weight) & (hr >= min_child_weight) & (hl + l2 > 0) & (hr + l2 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        parent = np.where(h + l2 > 0, g**2 / (h + l2), 0.0)
        gain = np.where(ok, gl**2 / (hl + l2) + gr**2 / (hr + l2) - parent, -np.inf)
    if gain.size == 0:
        return -1, -1, 0.0
    best = float(gain.max())
    if not best > 0:
        return -1, -1, 0.0
    # Gains within rounding of the best are ties: the histograms are sums in whatever order the examples (or
    # the workers' updates) came, so an exact argmax could pick another of two equally good splits.
    at = int(np.argmax(gain >= best * (1 - TIE)))
    return at // gain.shape[1], at % gain.shape[1], float(gain.flat[at])


def gradients(raw: np.ndarray, y: np.ndarray, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per example and output: the loss's gradient and hessian at the raw scores ``raw`` (n × outputs)."""
    if regression:
        return raw - y.reshape(-1, 1), np.ones_like(raw)
    p = softmax(raw)
    g = p.copy()
    g[np.arange(len(y)), y] -= 1.0
    return g, p * (1.0 - p)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def binned(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each value's bin (n × features, int64): how many of its feature's edges are at or below it."""
    out = np.empty(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        out[:, j] = np.searchsorted(edges[j], x[:, j], side="right")
    return out


def histograms(bins: np.ndarray, position: np.ndarray, values: np.ndarray, nodes: int, n_bins: int) -> np.ndarray:
    """nodes × features × bins sums of ``values`` (one per example) by each example's node ``position`` in
    the level (−1: in no node of it) and bin."""
    keep = position >= 0
    b, pos, v = bins[keep], position[keep], values[keep]
    f = bins.shape[1]
    index = (pos[:, None] * f + np.arange(f)[None, :]) * n_bins + b
    sums = np.bincount(index.ravel(), weights=np.repeat(v, f), minlength=nodes * f * n_bins)
    out: np.ndarray = sums.reshape(nodes, f, n_bins)
    return out


# --- the model's arrays --------------------------------------------------------------------------------

def init_weights(p: Params, edges: np.ndarray, examples: float) -> Weights:
    """An empty forest: no tree grown, nothing pending."""
    if edges.shape != (p.features, p.bins - 1):
        raise TaskError(f"bin edges have shape {edges.shape}; the booster needs ({p.features}, {p.bins - 1})")
    level = 2 ** max(p.max_depth - 1, 0)
    return {
        EDGES: np.asarray(edges, dtype=np.float64),
        EXAMPLES: np.array([float(examples)]),
        CURSOR: np.zeros(3),
        FEATURE: np.full((p.n_trees, p.outputs, p.internal), float(UNGROWN)),
        THRESHOLD: np.zeros((p.n_trees, p.outputs, p.internal)),
        VALUE: np.zeros((p.n_trees, p.outputs, p.nodes)),
        GRAD: np.zeros((p.outputs, level, p.features, p.bins)),
        HESS: np.zeros((p.outputs, level, p.features, p.bins)),
    }


@dataclass
class Forest:
    """The model's arrays, read (structure as integers) and checked; ``weights()`` writes them back."""

    p: Params
    edges: np.ndarray
    examples: float
    step: int
    level: int
    pending: bool
    feature: np.ndarray  # int64
    threshold: np.ndarray  # int64
    value: np.ndarray
    grad: np.ndarray
    hess: np.ndarray

    @classmethod
    def of(cls, weights: Weights, p: Params) -> Forest:
        """The forest in ``weights``; TaskError only when the arrays do not fit ``p`` (another run's model).

        Honest workers all write the same structure, so its mean is whole numbers. A worker is untrusted
        input, though: one that writes other numbers bends the mean, and a model that cannot be read would
        stop the coordinator's evaluation and every worker's next round. So the structure is rounded to the
        nearest whole number and clamped into range (every worker reads the same model, so every worker
        rounds it alike and they keep agreeing): such a worker can bend the trees, as any FedAvg update can
        bend a model, never stop the run."""
        expected = init_weights(p, np.zeros((p.features, p.bins - 1)), 1.0)
        for name, want in expected.items():
            got = weights.get(name)
            if got is None or np.shape(got) != want.shape:
                raise TaskError(f"gbdt model tensor {name!r} has shape {None if got is None else np.shape(got)}; "
                                f"the options give {want.shape}")
        whole = {name: _whole(weights[name]) for name in STRUCTURE}
        cursor = whole[CURSOR]
        step = int(np.clip(cursor[0], 0, p.n_trees))
        level = int(np.clip(cursor[1], 0, p.max_depth - 1))
        pending = int(np.clip(cursor[2], 0, 1))
        examples = max(float(weights[EXAMPLES][0]), 1.0)  # N of the run; at least one example
        whole[FEATURE] = np.clip(whole[FEATURE], UNGROWN, p.features - 1)
        whole[THRESHOLD] = np.clip(whole[THRESHOLD], 0, p.bins - 1)
        return cls(p, np.asarray(weights[EDGES], dtype=np.float64), examples, step, level, bool(pending),
                   whole[FEATURE], whole[THRESHOLD], np.array(weights[VALUE], dtype=np.float64),
                   np.array(weights[GRAD], dtype=np.float64), np.array(weights[HESS], dtype=np.float64))

    def weights(self) -> Weights:
        return {EDGES: self.edges, EXAMPLES: np.array([self.examples]),
                CURSOR: np.array([self.step, self.level, int(self.pending)], dtype=np.float64),
                FEATURE: self.feature.astype(np.float64), THRESHOLD: self.threshold.astype(np.float64),
                VALUE: self.value, GRAD: self.grad, HESS: self.hess}

    # --- a level's splits from its histograms ---------------------------------------------------------

    def apply_level(self) -> None:
        """Turn the pending histograms (per example of the run: sums / N) into the level's splits and its
        children's leaf values, then move the cursor on. λ and min_child_weight are sums over examples, so
        they are divided by N here, as the histograms were."""
        p, level = self.p, self.level
        l2, mcw = p.l2 / self.examples, p.min_child_weight / self.examples
        first = 2**level - 1
        for k in range(p.outputs):
            for j in range(2**level):
                node = first + j
                if node > 0 and self.feature[self.step, k, (node - 1) // 2] < 0:
                    continue  # below a leaf: never reached
                g, h = self.grad[k, j], self.hess[k, j]
                self.value[self.step, k, node] = leaf_value(g[0].sum(), h[0].sum(), l2, p.learning_rate)
                f, t, _ = best_split(g, h, l2, mcw)
                self.feature[self.step, k, node] = f if f >= 0 else LEAF
                if f < 0:
                    continue
                self.threshold[self.step, k, node] = t
                gl, hl = g[f, :t + 1].sum(), h[f, :t + 1].sum()
                self.value[self.step, k, 2 * node + 1] = leaf_value(gl, hl, l2, p.learning_rate)
                self.value[self.step, k, 2 * node + 2] = leaf_value(g[f].sum() - gl, h[f].sum() - hl, l2,
                                                                  p.learning_rate)
        self.grad[...] = 0.0
        self.hess[...] = 0.0
        self.pending = False
        self.level += 1
        if self.level == p.max_depth:
            self.step, self.level = self.step + 1, 0

    # --- walking the trees ----------------------------------------------------------------------------

    def _walk(self, bins: np.ndarray, step: int, k: int, depth: int) -> np.ndarray:
        """Each example's node in tree (step, k) after at most ``depth`` splits (stopping at a leaf or an
        ungrown node)."""
        rows = np.arange(len(bins))
        node = np.zeros(len(bins), dtype=np.int64)
        for _ in range(depth):
            feat = self.feature[step, k, node]
            split = feat >= 0
            right = bins[rows, np.maximum(feat, 0)] > self.threshold[step, k, node]
            node = np.where(split, 2 * node + 1 + right, node)
        return node

    def step_raw(self, bins: np.ndarray, t: int) -> np.ndarray:
        """n × outputs: the leaves of boosting step ``t``'s trees."""
        out = np.zeros((len(bins), self.p.outputs))
        for k in range(self.p.outputs):
            out[:, k] = self.value[t, k, self._walk(bins, t, k, self.p.max_depth)]
        return out

    def raw(self, bins: np.ndarray, steps: int) -> np.ndarray:
        """Raw scores (n × outputs): the leaves of the trees of the first ``steps`` boosting steps."""
        out = np.zeros((len(bins), self.p.outputs))
        for t in range(min(steps, self.p.n_trees)):
            out += self.step_raw(bins, t)
        return out

    def positions(self, bins: np.ndarray) -> np.ndarray:
        """n × outputs: each example's node within the level being grown, −1 if it stopped at a leaf above."""
        out = np.full((len(bins), self.p.outputs), -1, dtype=np.int64)
        first = 2**self.level - 1
        for k in range(self.p.outputs):
            node = self._walk(bins, self.step, k, self.level)
            out[:, k] = np.where(node >= first, node - first, -1)
        return out

    def level_sums(self, x: np.ndarray, y: np.ndarray, known: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The gradient and hessian histograms (sums) of the level at the cursor over these examples, and
        their raw scores from the complete steps, on which the gradients are taken (``known``: the bins and
        those raw scores, when the caller keeps them from round to round)."""
        p = self.p
        bins, raw = known if known is not None else (binned(x, self.edges), None)
        if raw is None:
            raw = self.raw(bins, self.step)
        g, h = gradients(raw, y, p.regression)
        pos = self.positions(bins)
        nodes = 2**self.level
        grad, hess = np.zeros_like(self.grad), np.zeros_like(self.hess)
        for k in range(p.outputs):
            grad[k, :nodes] = histograms(bins, pos[:, k], g[:, k], nodes, p.bins)
            hess[k, :nodes] = histograms(bins, pos[:, k], h[:, k], nodes, p.bins)
        return grad, hess, raw


def grow_chunks(weights: Weights, chunks: Chunks, p: Params) -> Generator[tuple[np.ndarray, np.ndarray], None, Weights]:
    """One round on one worker's examples, read in chunks (a data set larger than memory grows trees too):
    the pending level applied, then this worker's histograms of the next, per example (sums / its examples).
    Yields each chunk's raw scores (from the steps complete before this level) with its targets, for
    training metrics; the new weights are the generator's return value. Past the last tree nothing is
    pending and the histograms are zero."""
    forest = Forest.of(weights, p)
    if forest.pending:
        forest.apply_level()
    grad, hess = np.zeros_like(forest.grad), np.zeros_like(forest.hess)
    n = 0
    for x, y in chunks:
        if forest.step >= p.n_trees:
            yield forest.raw(binned(x, forest.edges), p.n_trees), y
            continue
        g, h, raw = forest.level_sums(x, y)
        grad += g
        hess += h
        n += len(y)
        yield raw, y
    if forest.step < p.n_trees:
        forest.grad, forest.hess, forest.pending = grad / max(n, 1), hess / max(n, 1), True
    return forest.weights()


def grow(weights: Weights, x: np.ndarray, y: np.ndarray, p: Params) -> tuple[Weights, np.ndarray]:
    """``grow_chunks`` on examples held in memory: the new weights, and the raw scores they were grown from."""
    rounds = grow_chunks(weights, [(x, y)], p)
    raw = next(rounds)[0]
    try:
        next(rounds)
    except StopIteration as done:
        new: Weights = done.value
        return new, raw
    raise RuntimeError("grow_chunks yielded more than once for one chunk")


def finalised(weights: Weights, p: Params) -> Forest:
    """The forest with the pending level applied: what predicts (the tree being grown counts with the levels
    it has, its frontier nodes as leaves)."""
    forest = Forest.of(weights, p)
    if forest.pending:
        forest.apply_level()
    return forest


def predict_raw(weights: Weights, x: np.ndarray, p: Params) -> np.ndarray:
    """Raw scores (n × outputs: logits, or the standardised prediction) of every tree grown so far."""
    forest = finalised(weights, p)
    return forest.raw(binned(x, forest.edges), forest.step + 1)


def fit_central(x: np.ndarray, y: np.ndarray, p: Params, edges: np.ndarray) -> Weights:
    """The same booster on pooled data in one place: ``p.rounds`` rounds of one worker holding every example
    (the bins and the complete steps' raw scores kept from round to round rather than recomputed, as
    ``grow`` does: the same numbers, in less time)."""
    weights = init_weights(p, edges, float(len(y)))
    bins = binned(x, edges)
    raw = np.zeros((len(y), p.outputs))
    done = 0
    for _ in range(p.rounds):
        forest = Forest.of(weights, p)
        if forest.pending:
            forest.apply_level()
        for t in range(done, min(forest.step, p.n_trees)):
            raw += forest.step_raw(bins, t)
        done = forest.step
        if forest.step >= p.n_trees:
            return forest.weights()
        grad, hess, _ = forest.level_sums(x, y, (bins, raw))
        forest.grad, forest.hess, forest.pending = grad / len(y), hess / len(y), True
        weights = forest.weights()
    return weights


def staged_raw(weights: Weights, x: np.ndarray, p: Params) -> Iterator[np.ndarray]:
    """Raw scores after each complete boosting step, in turn (to choose the number of trees on validation data)."""
    forest = finalised(weights, p)
    bins = binned(x, forest.edges)
    raw = np.zeros((len(x), p.outputs))
    for t in range(min(forest.step, p.n_trees)):
        raw = raw + forest.step_raw(bins, t)
        yield raw


def _whole(a: Weights | np.ndarray) -> np.ndarray:
    """Float64 model values as whole numbers: rounded, and non-finite ones (the intake refuses them; a model
    read from a file is not checked by it) as 0."""
    values = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.rint(np.clip(values, -2**62, 2**62)).astype(np.int64)
