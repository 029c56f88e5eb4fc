"""The dashboard, the predict page and their JSON API, as one APIRouter any FastAPI app can include.

Live state reaches the page as server-sent events (``GET /v1/events``): the stream waits on the
engine's progress event and sends when something changed (a round opened or closed, an update or a
worker arrived), so a closed round shows up at once and an idle run costs nothing but a refresh every
``REFRESH_S`` seconds, which is how a worker going quiet (dead) shows up without an event of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from fedfleet.tasks.songs import ERAS, SongsTask
from fedfleet.web.predict import (
    PredictInfo,
    PredictRequest,
    PredictResponse,
    SongSearch,
    explain,
    feature_infos,
    predict,
    search_songs,
)
from fedfleet.web.sources import RunSource

API = "/v1"
REFRESH_S = 5.0  # longest silence on the stream: refreshes "dead" workers and keeps proxies from closing it
COALESCE_S = 0.1  # a round's N answers arrive in a burst: one event for the burst, not N
RETRY_MS = 2000  # how soon the browser reconnects a dropped stream
ASSETS = {"dashboard.html": "text/html", "predict.html": "text/html", "style.css": "text/css",
          "charts.js": "text/javascript", "dashboard.js": "text/javascript", "predict.js": "text/javascript",
          "common.js": "text/javascript", "favicon.svg": "image/svg+xml"}


class _ExplainedRoute(APIRoute):
    """Answers a request that fails validation with one line naming the song and feature at fault.

    Done in the route rather than with an app-wide exception handler, so that the message is the same
    in every app that includes the router (the coordinator's and ``fedfleet serve``'s).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def explained(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"detail": explain(exc.errors())}, status_code=422)

        return explained


def create_router(run: RunSource) -> APIRouter:
    """Routes for ``/`` (dashboard), ``/predict`` and their API under ``/v1``, reading ``run``."""
    assets = _load_assets()
    router = APIRouter(route_class=_ExplainedRoute)

    def songs_task() -> SongsTask:
        task = run.task
        if isinstance(task, SongsTask):
            return task
        name = run.snapshot()["status"]["task"]
        why = "could not be loaded here" if task is None else "does not predict song eras"
        raise HTTPException(409, f"prediction needs the songs task; this run's task {name!r} {why}")

    def page(name: str) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def serve(request: Request) -> Response:
            return _asset(assets, name, request)
        return serve

    router.add_api_route("/", page("dashboard.html"), methods=["GET", "HEAD"], include_in_schema=False)
    router.add_api_route("/predict", page("predict.html"), methods=["GET", "HEAD"], include_in_schema=False)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        if name not in assets:
            return JSONResponse({"detail": f"no asset {name!r}"}, status_code=404)
        return _asset(assets, name, request)

    @router.get(f"{API}/dashboard", tags=["dashboard"],
                summary="Everything the dashboard shows: status, open round, workers, config and every round")
    async def dashboard() -> Response:
        return _json_response({**run.snapshot(), "rounds_from": 0, "rounds": run.rounds()})

    @router.get(f"{API}/events", tags=["dashboard"], response_class=StreamingResponse,
                summary="Server-sent events: the dashboard's state each time the run changes",
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`state` events holding /v1/dashboard's JSON; after the first, "
                                                "`rounds` holds only the rounds from index `rounds_from` on"}})
    async def events() -> StreamingResponse:
        return StreamingResponse(_stream(run), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get(f"{API}/predict", response_model=PredictInfo, tags=["predict"],
                summary="What the model predicts (the eras) and from what (the features, with their ranges)",
                responses={409: {"description": "the run's task does not predict song eras"}})
    async def predict_info() -> PredictInfo:
        task = songs_task()
        model = run.model()
        return PredictInfo(task=task.name, model_version=model.version, round=model.round, classes=list(ERAS),
                           features=feature_infos())

    @router.post(f"{API}/predict", response_model=PredictResponse, tags=["predict"],
                 summary="Predict the era of a batch of songs from their audio features with the current model",
                 responses={409: {"description": "the run's task does not predict song eras"},
                            422: {"description": "a feature is missing, not finite or out of its range; the "
                                                 "message names the song (by index) and the feature"}})
    async def predict_batch(req: PredictRequest) -> PredictResponse:
        task = songs_task()
        model = run.model()
        return PredictResponse(model_version=model.version, round=model.round, classes=list(ERAS),
                               predictions=predict(task, model.weights, req.songs))

    @router.get(f"{API}/songs", response_model=SongSearch, tags=["predict"],
                summary="Songs of the data set whose title or artist contains every word of `q`",
                responses={409: {"description": "the run's task is not the songs task"}})
    async def songs(q: str = Query(min_length=1, max_length=200),
                    limit: int = Query(10, ge=1, le=50)) -> SongSearch:
        task = songs_task()
        # A search scans 40,000 titles in Python: off the event loop, so transfers keep flowing.
        return await asyncio.to_thread(search_songs, task, q, limit)

    return router


async def _stream(run: RunSource) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    sent = 0
    while True:
        # The event first, then the state: a change made after this read sets the event we wait on.
        changed = run.changed()
        snap = run.snapshot()
        rounds = run.rounds()
        # rounds only grow while a run lives; a shorter list means a new one began, so send them all.
        start = sent if sent <= len(rounds) else 0
        yield f"event: state\ndata: {_dumps({**snap, 'rounds_from': start, 'rounds': rounds[start:]})}\n\n"
        sent = len(rounds)
        if snap["status"]["state"] in ("finished", "failed", "stopped"):
            return  # nothing more will come; the page stops listening when it sees the state
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), REFRESH_S)
        await asyncio.sleep(COALESCE_S)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or Infinity (browsers refuse them): a diverged loss is sent as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_finite(obj), separators=(",", ":"))


def _json_response(obj: Any) -> Response:
    return Response(_dumps(obj), media_type="application/json")


def _load_assets() -> dict[str, tuple[bytes, str, str]]:
    """Every file the pages use, read once from the package: (body, content type, ETag)."""
    folder = resources.files("fedfleet.web") / "static"
    out = {}
    for name, kind in ASSETS.items():
        body = (folder / name).read_bytes()
        charset = "" if kind.startswith("image/") else "; charset=utf-8"
        out[name] = (body, kind + charset, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return out


def _asset(assets: dict[str, tuple[bytes, str, str]], name: str, request: Request) -> Response:
    body, kind, etag = assets[name]
    # no-cache: the browser revalidates each time (a 304 when unchanged), so an upgrade shows at once.
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=kind, headers=headers)
