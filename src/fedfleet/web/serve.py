"""``fedfleet serve --run DIR``: the dashboard and the predict page of a finished run, from its files."""

from __future__ import annotations

from pathlib import Path

import uvicorn
from fastapi import FastAPI

from fedfleet.coordinator.app import BodyLimit
from fedfleet.coordinator.limits import JSON_BODY_LIMIT
from fedfleet.coordinator.server import bind
from fedfleet.protocol.messages import API, Status
from fedfleet.web.routes import create_router
from fedfleet.web.sources import FinishedRun


def create_app(run: FinishedRun) -> FastAPI:
    # No Swagger UI or ReDoc: they load their scripts from a CDN, which offline hosts cannot reach.
    app = FastAPI(title="fedfleet run", version="1", docs_url=None, redoc_url=None,
                  description=f"The finished run in {run.directory}: its dashboard and its final model's "
                              "predictions.")
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT)

    @app.get(f"{API}/status", response_model=Status, tags=["run"])
    async def status() -> Status:
        return run.status

    app.include_router(create_router(run))
    return app


def serve_run(directory: Path, host: str = "127.0.0.1", port: int = 8080) -> int:
    """Serve until interrupted; the first line on stdout gives the URL (with port 0, the port picked)."""
    run = FinishedRun.load(directory)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    s = run.status
    print(f"serving run {s.run_id} ({s.state}, {s.round} rounds, task {s.task}) from {directory} at {url} "
          f"(prediction page: {url}/predict); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(run), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
    return 0
