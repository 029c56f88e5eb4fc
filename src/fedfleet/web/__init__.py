"""The web side of a run: a live dashboard (``/``), a prediction page (``/predict``) and their API.

Prediction is a capability a task offers (``fedfleet.tasks.predict``): the page and ``/v1/predict`` work
for any task that has it (songs, a planned tabular task, one's own) and know no task by name.

``create_router(run)`` is included by the coordinator's app (with ``coordinator.live.LiveRun``), so
every coordinator serves both pages while it runs; ``fedfleet serve --run DIR`` serves the same pages
for a finished run from its files. The pages are plain HTML, CSS and JavaScript shipped in this
package (``static/``): no CDN, no build step, they work offline. Nothing here imports the coordinator.
"""

from __future__ import annotations

from fedfleet.web.routes import create_router
from fedfleet.web.sources import FinishedRun, RunSource

__all__ = ["FinishedRun", "RunSource", "create_router"]
