"""The web side of a run: a live dashboard (``/``), a song-era prediction page (``/predict``) and their API.

``create_router(run)`` is included by the coordinator's app (with ``coordinator.live.LiveRun``), so
every coordinator serves both pages while it runs; ``fedfleet serve --run DIR`` serves the same pages
for a finished run from its files. The pages are plain HTML, CSS and JavaScript shipped in this
package (``static/``): no CDN, no build step, they work offline. Nothing here imports the coordinator.
"""

from __future__ import annotations

from fedfleet.web.routes import create_router
from fedfleet.web.sources import FinishedRun, RunSource

__all__ = ["FinishedRun", "RunSource", "create_router"]
