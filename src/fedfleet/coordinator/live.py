"""The coordinator's engine seen as a ``RunSource``: what the dashboard and predict page read live."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.strategies.privacy import default_delta
from fedfleet.tasks import Task
from fedfleet.tasks.base import class_names
from fedfleet.web.sources import Model, PrivacyView, history_page, read_updates


class LiveRun:
    """A run in progress, read from the engine's snapshot and records (same event loop, no copies of the model)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def task(self) -> Task | None:
        return self.engine.task

    def snapshot(self) -> dict[str, Any]:
        e = self.engine
        snap = e.snapshot()
        open_round = snap.open_round
        privacy = privacy_view(e.config, snap.dp_epsilon, snap.round)
        return {"status": e.status().model_dump(), "open_round": asdict(open_round) if open_round else None,
                "live": True, "workers": [w.model_dump() for w in e.workers_view()], "config": e.config.to_dict(),
                "dp": None if privacy is None else privacy.to_dict()}

    def rounds(self) -> list[dict[str, Any]]:
        return [r.model_dump() for r in self.engine.rounds()]

    def model(self) -> Model:
        m = self.engine.model()
        return Model(m.weights, m.version, m.round)

    def changed(self) -> asyncio.Event:
        return self.engine.progress_event()

    async def worker_history(self, offset: int, limit: int) -> dict[str, Any]:
        e = self.engine
        # The page and the rounds are read on the event loop (the engine's own state); the updates from a
        # read-only connection in a thread, so that a page of 10,000 workers does not hold up the run.
        page = [{"worker_id": w.worker_id, "name": w.name, "partition": w.partition}
                for w in e.workers_view(offset, limit)]
        rounds = [r.round for r in e.rounds()]
        total = e.snapshot().workers_registered
        rows = await asyncio.to_thread(read_updates, e.run_dir, [w["worker_id"] for w in page])
        return history_page(rows, rounds, page, total, offset, limit, class_names(e.task))


def privacy_view(config: RunConfig, epsilon: float | None, rounds: int) -> PrivacyView | None:
    """The dashboard's ``dp`` block of a live run: the epsilon spent (the engine's snapshot has it, None
    without --dp) with the mechanism's settings as ``coordinator.privacy.plan_privacy`` derives them from
    the config. sigma only when --dp-noise-multiplier gave it (see ``PrivacyView.noise_multiplier``).

    >>> cfg = RunConfig.from_mapping({"workers": 4, "dp": "central", "dp_clip": 0.5, "dp_noise_multiplier": 1.0})
    >>> view = privacy_view(cfg, 2.5, 3)
    >>> (view.epsilon, view.delta, view.clip, view.noise_multiplier, view.sample_rate, view.max_epsilon)
    (2.5, 1e-05, 0.5, 1.0, 1.0, None)
    >>> privacy_view(RunConfig.from_mapping({}), None, 3) is None
    True
    """
    if epsilon is None or config.dp_clip is None:
        return None
    delta = config.dp_delta if config.dp_delta is not None else default_delta(config.workers)
    return PrivacyView(mechanism=config.dp, epsilon=epsilon, delta=delta, max_epsilon=config.dp_max_epsilon,
                       target_epsilon=config.dp_target_epsilon, clip=config.dp_clip,
                       noise_multiplier=config.dp_noise_multiplier, sample_rate=config.fraction, rounds=rounds)
