"""``fedfleet serve --run DIR``: the dashboard and the predict page of a finished run, from its files.

A run folder may come from someone else, and its config.toml may name any ``module:attr`` as the
task (``os:system``): loading a task imports and calls it. So only built-in tasks and those given
with ``--allow-task`` are loaded. Without its task a run still has its dashboard; the prediction
routes answer 409 saying why the task is not loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.routing import APIRoute
from pydantic import BaseModel

from fedfleet.asgi import JSON_BODY_LIMIT, BodyLimit, listen
from fedfleet.protocol.messages import API, Status
from fedfleet.web.routes import create_router
from fedfleet.web.sources import FinishedRun


class Health(BaseModel):
    """/v1/health, as a coordinator answers it: ``ok`` while this server serves; ``state`` is the run's."""

    ok: bool
    state: str


def create_app(run: FinishedRun, task_problem: str | None = None) -> FastAPI:
    """The app serving ``run``; with ``task_problem`` (why its task is not loaded) prediction answers 409."""
    # No Swagger UI or ReDoc: they load their scripts from a CDN, which offline hosts cannot reach.
    app = FastAPI(title="fedfleet run", version="1", docs_url=None, redoc_url=None,
                  description=f"The finished run in {run.directory}: its dashboard and its final model's "
                              "predictions.")
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT)

    @app.get(f"{API}/health", response_model=Health, tags=["run"])
    async def health() -> Health:
        return Health(ok=True, state=run.status.state)

    @app.get(f"{API}/status", response_model=Status, tags=["run"])
    async def status() -> Status:
        return run.status

    router = create_router(run)
    if task_problem is not None:
        _refuse_prediction(app, router, task_problem)
    app.include_router(router)
    return app


def _refuse_prediction(app: FastAPI, router: APIRouter, why: str) -> None:
    """Answer each prediction route of ``router`` (tagged "predict") with 409 ``why``: the routes added
    here come first, so they are the ones matched."""
    async def refuse() -> None:
        raise HTTPException(409, why)

    for route in router.routes:
        if isinstance(route, APIRoute) and "predict" in route.tags and route.methods:
            app.add_api_route(route.path, refuse, methods=sorted(route.methods), include_in_schema=False)


def serve_run(directory: Path, host: str = "127.0.0.1", port: int = 8080,
              allowed_tasks: Collection[str] = ()) -> int:
    """Serve until interrupted; the first line on stdout gives the URL (with port 0, the port picked)."""
    sock = listen(host, port)
    run = FinishedRun.load(directory, allowed_tasks)
    problem = run.task_problem
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    s = run.status
    print(f"serving run {s.run_id} ({s.state}, {s.round} rounds, task {s.task}) from {directory} at {url} "
          f"(prediction page: {url}/predict); Ctrl-C stops", flush=True)
    if problem is not None:
        print(f"fedfleet serve: the dashboard works, prediction does not: {problem}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(run, problem), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
    return 0
