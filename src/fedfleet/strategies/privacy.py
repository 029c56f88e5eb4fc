"""Central differential privacy for FedAvg: DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018), with a trusted coordinator.

Each round, every live worker is sampled independently with probability q (Poisson sampling); each
sampled worker's delta Δᵢ = wᵢ − w_global is clipped to L2 norm C (scaled by min(1, C/‖Δᵢ‖)) as it is
folded into the running sum, whatever example count the worker claims; the coordinator adds Gaussian
noise N(0, (σ·C)² I) to the sum and divides by the *expected* number of sampled workers q·N, a
constant of the run (McMahan et al.'s fixed-denominator estimator)::

    Δ̃ = ( Σᵢ Δᵢ · min(1, C/‖Δᵢ‖) + N(0, σ²C² I) ) / (q·N)

Adding or removing one worker changes the clipped sum by at most C in L2 norm, so one round is the
Poisson-subsampled Gaussian mechanism with noise multiplier σ. Dividing by the number of workers that
answered, or by the sum of their example counts, would let the sensitivity depend on what workers send
(and on who is in the data set); q·N is known before the run. The price: a round where fewer workers
answer than expected moves the model less.

Rounds compose: ``epsilon`` gives the (ε, δ) of T rounds by Rényi DP (Mironov, "Rényi Differential
Privacy", CSF 2017; the subsampled Gaussian's RDP after Mironov, Talwar and Zhang 2019) with the RDP
accountant of Google's ``dp-accounting`` library, and ``noise_multiplier_for`` solves σ for a target ε.
The library is optional (``pip install 'fedfleet[privacy]'``): it is imported only when asked for.

The unit of privacy is a worker (all of one site's examples), not an example: ε bounds how much the
released models can tell about whether any one worker took part. Pure maths, no I/O; the randomness
comes in as a ``numpy.random.Generator``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedfleet.errors import ConfigError
from fedfleet.strategies.accumulate import WeightedSum
from fedfleet.types import Weights

ACCOUNTANT = "rdp"  # the dp-accounting accountant every ε here comes from
INSTALL_HINT = "pip install 'fedfleet[privacy]'"
# σ is searched in (0, MAX_NOISE_MULTIPLIER]: beyond it no model learns anything, whatever ε asks for.
MAX_NOISE_MULTIPLIER = 1e4
NOISE_TOLERANCE = 1e-6  # how far above the smallest σ that meets a target ε the solved σ may be


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C/‖Δ‖): the scale that brings a delta of L2 norm ``norm`` within ``clip``.

    >>> clip_factor(4.0, 2.0), clip_factor(1.0, 2.0), clip_factor(0.0, 2.0)
    (0.5, 1.0, 1.0)
    """
    return clip / norm if norm > clip else 1.0


@dataclass(frozen=True)
class CentralDP:
    """The mechanism's settings: clip norm C, noise multiplier σ, the fixed denominator q·N, and the tensors
    the task never trains (``frozen``: set before the run from public knowledge, such as a standardisation
    layer), which keep their value instead of taking noise they have no signal to carry."""

    clip: float
    noise_multiplier: float
    denominator: float
    frozen: frozenset[str] = frozenset()

    @property
    def noise_std(self) -> float:
        """σ·C, the standard deviation of the noise added to each coordinate of the clipped sum."""
        return self.noise_multiplier * self.clip

    def aggregate(self, acc: WeightedSum, rng: np.random.Generator) -> Weights:
        """The round's delta, (Σ clipped deltas + N(0, (σC)² I)) / (q·N), from a sum whose terms were
        folded in with their clip factors as weights. Consumes the sum (the noise is added in place)."""
        return acc.noised_mean(self.noise_std, self.denominator, rng, self.frozen)


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning with
    Adaptive Clipping", NeurIPS 2021): the clip norm follows the ``quantile`` γ of the update norms instead
    of being fixed. Each round, besides the clipped deltas, the coordinator sums the bits bᵢ = 1[‖Δᵢ‖ ≤ C]
    with Gaussian noise N(0, σ_b²), divides by q·N, and moves C geometrically:

        b̃ = (Σ bᵢ + N(0, σ_b²)) / (q·N),    C ← C · exp(−η (b̃ − γ))

    Both sums are Gaussian mechanisms of sensitivity C and 1 on the same sample; the deltas take noise
    multiplier σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2), so that together they are one Gaussian mechanism of multiplier σ
    (the paper's Theorem 1), which the accountant counts as before. σ_b = max(q·N / 20, σ): the paper's
    q·N/20, but never so small that σ_Δ would have to grow past 2/√3 · σ.

    >>> a = AdaptiveClip(initial=0.1, quantile=0.5, lr=0.2, count_noise=2.0)
    >>> round(a.next_clip(0.1, 1.0), 6), round(a.delta_noise_multiplier(1.0), 6)
    (0.090484, 1.032796)
    """

    initial: float
    quantile: float
    lr: float
    count_noise: float

    def delta_noise_multiplier(self, sigma: float) -> float:
        """σ_Δ for the deltas, given the σ the accountant counts."""
        return float((sigma**-2 - (2 * self.count_noise) ** -2) ** -0.5)

    def noised_fraction(self, unclipped: int, expected: float, rng: np.random.Generator) -> float:
        """b̃: the noised share of the sampled updates that were not clipped, over the expected count q·N."""
        return float((unclipped + rng.normal(0.0, self.count_noise)) / expected)

    def next_clip(self, clip: float, fraction: float) -> float:
        return float(clip * np.exp(-self.lr * (fraction - self.quantile)))


ADAPTIVE_INITIAL_CLIP = 0.1  # --dp-clip adaptive starts here (the paper's initial clip)
ADAPTIVE_LR = 0.2  # η: the paper's geometric learning rate


def adaptive_clip(initial: float, quantile: float, sigma: float, expected: float) -> AdaptiveClip:
    return AdaptiveClip(initial=initial, quantile=quantile, lr=ADAPTIVE_LR, count_noise=max(expected / 20, sigma))


def round_rng(seed: int | None, round: int, attempt: int, stream: int) -> np.random.Generator:
    """A generator for one round attempt's sampling (``stream`` 0), noise (``stream`` 1) or, with adaptive
    clipping, the noise on the count of unclipped updates (``stream`` 2).

    Without ``seed``, 128 bits from the OS's CSPRNG (``secrets``) seed numpy's PCG64: nobody, the
    operator included, can predict who is sampled or what the noise is, which both the subsampling
    amplification and the noise itself rely on. With ``seed`` (``--dp-seed``, for tests only) the same
    run draws the same samples and noise, which anyone who knows the seed can subtract.
    """
    entropy = secrets.randbits(128) if seed is None else [seed, round, attempt, stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def poisson_sample(candidates: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each candidate independently with probability ``rate`` (all of them at rate 1), in their order.
    The sample may be empty: that round's release is noise alone, as the accountant assumes.

    >>> poisson_sample(["a", "b", "c"], 1.0, np.random.default_rng(0))
    ['a', 'b', 'c']
    """
    if rate >= 1:
        return list(candidates)
    keep = rng.random(len(candidates)) < rate
    return [c for c, k in zip(candidates, keep, strict=True) if k]


# --- accounting (dp-accounting, imported on first use) -----------------------------------------------
def _library() -> Any:
    """The ``dp_accounting`` module; ConfigError naming the install command when it is missing. Imported
    by name: it ships no type information, and the core of fedfleet must load without it."""
    try:
        module = importlib.import_module("dp_accounting")
    except ImportError as exc:
        raise ConfigError(f"--dp central needs the dp-accounting package for its privacy accountant: "
                          f"{INSTALL_HINT}", option="dp") from exc
    # Its RDP accountant warns, once per order and call, when a fractional order's series does not
    # converge (at sampling rates above ~0.3) and leaves that order out, which can only make ε larger:
    # safe, and not worth hundreds of log lines per round.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return module


def _event(rate: float, noise_multiplier: float, rounds: int) -> Any:
    dp = _library()
    return dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(rate, dp.GaussianDpEvent(noise_multiplier)), rounds)


@functools.lru_cache(maxsize=4096)
def epsilon(rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism (sampling rate ``rate``,
    noise multiplier σ) at ``delta``, by the RDP accountant; 0 before the first round. Cached: one call
    takes up to ~0.1 s at sampling rates below 1, and the round loop asks for each count more than once."""
    if rounds == 0:
        return 0.0
    accountant = _library().rdp.RdpAccountant()
    accountant.compose(_event(rate, noise_multiplier, rounds))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest σ (within ``NOISE_TOLERANCE``) whose ``rounds`` rounds at ``rate`` spend at most
    ``target_epsilon`` at ``delta``; ConfigError if even ``MAX_NOISE_MULTIPLIER`` spends more."""
    dp = _library()
    if epsilon(rate, MAX_NOISE_MULTIPLIER, rounds, delta) > target_epsilon:
        raise ConfigError(f"The 'dp_target_epsilon' option {target_epsilon:g} cannot be met over {rounds} rounds "
                          f"at sampling rate {rate:g} and delta {delta:g}, even with noise multiplier "
                          f"{MAX_NOISE_MULTIPLIER:g}: allow a larger epsilon or fewer rounds.",
                          option="dp_target_epsilon")
    sigma = float(dp.calibrate_dp_mechanism(
        dp.rdp.RdpAccountant, lambda s: _event(rate, s, rounds), target_epsilon, delta,
        dp.ExplicitBracketInterval(NOISE_TOLERANCE, MAX_NOISE_MULTIPLIER), tol=NOISE_TOLERANCE / 2))
    # Brent's method ends within tol of the boundary, on either side of it: step to the safe side.
    return min(MAX_NOISE_MULTIPLIER, sigma + NOISE_TOLERANCE / 2)


def default_delta(workers: int) -> float:
    """1e-5, or 1/N² for fleets of more than ~316 workers: well below 1/N, the δ at which a mechanism
    that publishes one random worker's data whole would already count as private.

    >>> default_delta(8), default_delta(1000)
    (1e-05, 1e-06)
    """
    return min(1e-5, 1.0 / workers**2)


__all__ = ["ACCOUNTANT", "AdaptiveClip", "CentralDP", "adaptive_clip", "clip_factor", "default_delta", "epsilon",
           "noise_multiplier_for", "poisson_sample", "round_rng"]
