"""A run's differential-privacy plan (``--dp central``): the mechanism, the accountant's parameters and
the budget, fixed before the run starts (σ solved for ``--dp-target-epsilon`` here), and what a task
must offer to be trained under it.

ε covers what leaves the trusted coordinator as a function of the workers' data: the sequence of global
models. So everything in the model must come through the noised rounds: a task that computes part of it
from the workers' data another way (a statistics round, a plan agreed from the sites' descriptions of
their data) is refused, unless it offers ``public_stats``, statistics from public knowledge alone that
stand in for the workers' reports (the song task's: its features' documented ranges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedfleet.config import RunConfig
from fedfleet.errors import ConfigError
from fedfleet.storage.records import PrivacySummary, RoundRecord
from fedfleet.strategies.privacy import (
    ACCOUNTANT,
    AdaptiveClip,
    CentralDP,
    adaptive_clip,
    default_delta,
    epsilon,
    noise_multiplier_for,
)
from fedfleet.tasks import Task
from fedfleet.tasks.base import has_plan
from fedfleet.types import Weights


@dataclass(frozen=True)
class PrivacyPlan:
    mechanism: CentralDP
    sample_rate: float
    delta: float
    target_epsilon: float | None
    max_epsilon: float | None
    seed: int | None
    distributed: bool = False  # --dp distributed: the workers clip and add the noise, under secure aggregation
    # Adaptive clipping: the clip norm moves each round; ``mechanism`` holds its start and the deltas' σ_Δ, and
    # ``sigma`` is the σ the accountant counts (the deltas' and the count's noise together).
    adaptive: AdaptiveClip | None = None
    sigma: float = 0.0

    @property
    def accounted_sigma(self) -> float:
        return self.sigma if self.adaptive is not None else self.mechanism.noise_multiplier

    def clip_for(self, history: list[RoundRecord]) -> float:
        """The clip norm of the next round: fixed, or with adaptive clipping moved by every recorded round
        (from the last one's clip and noised unclipped share, so that a resumed run goes on alike)."""
        if self.adaptive is None:
            return self.mechanism.clip
        last = history[-1] if history else None
        if last is None or last.dp_clip is None or last.dp_unclipped_fraction is None:
            return self.adaptive.initial
        return self.adaptive.next_clip(last.dp_clip, last.dp_unclipped_fraction)

    def epsilon(self, rounds: int) -> float:
        """ε spent after ``rounds`` noised rounds."""
        return epsilon(self.sample_rate, self.accounted_sigma, rounds, self.delta)

    def budget_message(self, done: int) -> str | None:
        """Why the run must end before round ``done + 1`` (it would spend more than ``--dp-max-epsilon``),
        or None."""
        if self.max_epsilon is None:
            return None
        after = self.epsilon(done + 1)
        if after <= self.max_epsilon:
            return None
        return (f"privacy budget reached: epsilon {self.epsilon(done):.4g} spent after {done} rounds (delta "
                f"{self.delta:g}); round {done + 1} would take it to {after:.4g}, over --dp-max-epsilon "
                f"{self.max_epsilon:g}")

    def summary(self, rounds: int, history: list[RoundRecord] | None = None) -> PrivacySummary:
        m = self.mechanism
        mechanism: Literal["central", "distributed"] = "distributed" if self.distributed else "central"
        last = history[-1].dp_clip if history else None
        return PrivacySummary(mechanism=mechanism, clip=m.clip, noise_multiplier=self.accounted_sigma,
                              clip_quantile=self.adaptive.quantile if self.adaptive is not None else None,
                              last_clip=last if self.adaptive is not None else None,
                              target_epsilon=self.target_epsilon, delta=self.delta, epsilon=self.epsilon(rounds),
                              max_epsilon=self.max_epsilon, sample_rate=self.sample_rate, denominator=m.denominator,
                              rounds=rounds, seeded=self.seed is not None,
                              accountant=f"{ACCOUNTANT}: dp-accounting's RdpAccountant, Poisson-subsampled Gaussian "
                                         "mechanism, add-or-remove-one-worker adjacency")


def plan_privacy(config: RunConfig, task: Task) -> PrivacyPlan | None:
    """The run's plan, None without ``--dp``; ConfigError (one line) when the task cannot be trained with
    it, the accountant library is missing, ``--dp-target-epsilon`` cannot be met, or one round alone
    would spend more than ``--dp-max-epsilon``."""
    if config.dp == "none" or config.dp_clip is None:  # RunConfig requires dp_clip exactly with --dp central
        return None
    problem = task_problem(task)
    if problem is not None:
        raise ConfigError(f"task {config.task!r} cannot be trained with --dp {config.dp}: {problem}", option="dp")
    rate = config.fraction
    delta = config.dp_delta if config.dp_delta is not None else default_delta(config.workers)
    if config.dp_noise_multiplier is not None:
        sigma = config.dp_noise_multiplier
    elif config.dp_target_epsilon is not None:
        sigma = noise_multiplier_for(config.dp_target_epsilon, rate, config.rounds, delta)
    else:  # RunConfig.from_mapping lets no such config through
        raise ConfigError("--dp central needs --dp-noise-multiplier or --dp-target-epsilon", option="dp")
    adaptive = None
    delta_sigma = sigma
    if config.dp_clip_quantile is not None:
        adaptive = adaptive_clip(config.dp_clip, config.dp_clip_quantile, sigma, rate * config.workers)
        delta_sigma = adaptive.delta_noise_multiplier(sigma)
    plan = PrivacyPlan(mechanism=CentralDP(clip=config.dp_clip, noise_multiplier=delta_sigma,
                                           denominator=rate * config.workers, frozen=frozen_tensors(task)),
                       sample_rate=rate, delta=delta, target_epsilon=config.dp_target_epsilon,
                       max_epsilon=config.dp_max_epsilon, seed=config.dp_seed, distributed=config.dp == "distributed",
                       adaptive=adaptive, sigma=sigma)
    first = plan.epsilon(1)
    if config.dp_max_epsilon is not None and first > config.dp_max_epsilon:
        raise ConfigError(f"The 'dp_max_epsilon' option {config.dp_max_epsilon:g} is below what one round spends "
                          f"(epsilon {first:.4g} at noise multiplier {sigma:.4g}, sampling rate {rate:g}, delta "
                          f"{delta:g}): no round could run.", option="dp_max_epsilon")
    return plan


def task_problem(task: Task) -> str | None:
    """Why ``task`` puts data-dependent values into the model outside the noised (or securely aggregated)
    rounds, or None."""
    if has_plan(task):
        return ("it agrees a plan from the sites' descriptions of their data (columns, classes, categories), "
                "which would reach the model without noise")
    if task.stats_schema() is not None and public_stats(task) is None:
        return ("it computes part of the model from the workers' data in a statistics round, which would reach "
                "the model without noise, and offers no public_stats to stand in for it")
    return None


def frozen_tensors(task: Task) -> frozenset[str]:
    """The tensors the task's ``frozen_tensors`` names: its workers never change them (e.g. a standardisation
    layer set from statistics), so under central DP they take no noise and keep their value."""
    return frozenset(getattr(task, "frozen_tensors", ()))


def public_stats(task: Task) -> Weights | None:
    """The task's ``public_stats()``: statistics in its stats schema derived from public knowledge only, which
    a run with central DP applies instead of a statistics round; None if it has none."""
    offer: Any = getattr(task, "public_stats", None)
    if not callable(offer):
        return None
    stats: Weights = offer()
    return stats


def initial_model(task: Task, seed: int, public: bool) -> Weights:
    """The model before the first round: the task's, with its public statistics applied when ``public`` (under
    central DP or secure aggregation, where the statistics round that would compute them from the workers'
    data, in the clear, does not run)."""
    weights = task.init_weights(seed)
    stats = public_stats(task) if public and task.stats_schema() is not None else None
    return task.apply_stats(weights, stats) if stats is not None else weights
