"""The coordinator's engine seen as a ``RunSource``: what the dashboard and predict page read live."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fedfleet.coordinator.engine import Engine
from fedfleet.tasks import Task
from fedfleet.web.sources import Model


class LiveRun:
    """A run in progress, read from the engine's snapshot and records (same event loop, no copies of the model)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def task(self) -> Task | None:
        return self.engine.task

    def snapshot(self) -> dict[str, Any]:
        e = self.engine
        open_round = e.snapshot().open_round
        return {"status": e.status().model_dump(), "open_round": asdict(open_round) if open_round else None,
                "live": True, "workers": [w.model_dump() for w in e.workers_view()], "config": e.config.to_dict()}

    def rounds(self) -> list[dict[str, Any]]:
        return [r.model_dump() for r in self.engine.rounds()]

    def model(self) -> Model:
        m = self.engine.model()
        return Model(m.weights, m.version, m.round)

    def changed(self) -> asyncio.Event:
        return self.engine.progress_event()
