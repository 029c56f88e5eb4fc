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
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from fedfleet.errors import TaskError
from fedfleet.storage.history import SERIES
from fedfleet.tasks.base import has_plan
from fedfleet.tasks.predict import Predictor, predictor, song_search
from fedfleet.web.predict import (
    Checked,
    PredictInfo,
    PredictRequest,
    PredictResponse,
    RowProblem,
    RowsRejected,
    Schema,
    SongSearch,
    explain,
    schema_problem,
)
from fedfleet.web.sources import Model, RunSource

API = "/v1"
REFRESH_S = 5.0  # longest silence on the stream: refreshes "dead" workers and keeps proxies from closing it
COALESCE_S = 0.1  # a round's N answers arrive in a burst: one event for the burst, not N
RETRY_MS = 2000  # how soon the browser reconnects a dropped stream
# Workers the dashboard's state carries at once: a page of its table, not all 10,000 on every event.
WORKERS_PAGE = 100
MAX_WORKERS_PAGE = 10_000
# Every file of static/ with one of these endings is served (a new page or script needs no list kept here).
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml",
                 ".png": "image/png", ".txt": "text/plain"}
ASSETS = {f.name: CONTENT_TYPES[Path(f.name).suffix] for f in (resources.files("fedfleet.web") / "static").iterdir()
          if Path(f.name).suffix in CONTENT_TYPES}


class _ExplainedRoute(APIRoute):
    """Answers a request that fails validation with one line naming the row (or parameter) at fault.

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


def create_router(run: RunSource, *, run_list: str | None = None) -> APIRouter:
    """Routes for ``/`` (dashboard), ``/predict`` and their API under ``/v1``, reading ``run``. ``run_list``:
    the URL of the list of runs this run's pages are served from (``fedfleet serve RUNS/``), which they link
    back to; None (a coordinator's own pages, a single run served) for no link."""
    router = APIRouter(route_class=_ExplainedRoute)

    @router.get(f"{API}/links", tags=["dashboard"],
                summary="Where the run's pages link to beyond themselves: `run_list`, the list of runs they are "
                        "served from (`fedfleet serve RUNS/`), or null")
    async def links() -> dict[str, str | None]:
        return {"run_list": run_list}

    def run_task_name() -> str:
        return str(run.snapshot()["status"]["task"])

    def loaded() -> object:
        task = run.task
        if task is None:
            raise HTTPException(409, f"prediction needs this run's task {run_task_name()!r}, which could not be "
                                     "loaded here")
        return task

    # The parsed schema of the task last asked, kept while the run's task is that object (a live run's
    # task changes once, when its plan is agreed).
    parsed: list[Schema] = []

    def prediction() -> tuple[Schema, Model]:
        """The run's task as a predictor, its schema, and the model, read together (a live run's task and
        model change together, between two awaits)."""
        task = loaded()
        offered = predictor(task)
        if offered is None:
            raise HTTPException(409, f"this run's task {run_task_name()!r} offers no prediction (a task predicts "
                                     "when it has feature_schema and predict_rows: see fedfleet.tasks.predict)")
        model = run.model()
        if has_plan(task) and not model.weights:
            raise HTTPException(409, f"this run's task {run_task_name()!r} predicts with the plan the run agrees "
                                     "from the sites' descriptions of their data, and the run has no plan yet: it "
                                     "is agreed once enough sites have described theirs")
        if not parsed or parsed[0].task is not offered:
            parsed[:] = [_schema(offered, run_task_name)]
        return parsed[0], model

    add_pages(router, {"/": "dashboard.html", "/predict": "predict.html"})

    @router.get(f"{API}/dashboard", tags=["dashboard"],
                summary="Everything the dashboard shows: status, open round, a page of the workers (by partition; "
                        "`workers_page` says which and how many there are), config and every round")
    async def dashboard(workers_offset: int = Query(0, ge=0),
                        workers_limit: int = Query(WORKERS_PAGE, ge=1, le=MAX_WORKERS_PAGE)) -> Response:
        snap = _paged(run.snapshot(), workers_offset, workers_limit)
        return _json_response({**snap, "rounds_from": 0, "rounds": run.rounds()})

    @router.get(f"{API}/dashboard/workers", tags=["dashboard"],
                summary="Each worker's own numbers by completed round (its validation score of the model it was "
                        "sent, local training loss and accuracy, training seconds), its example count and label "
                        "counts by class index: a page of the registered workers by partition. With "
                        "`rounds_from=N`, `rounds` and every series hold only the rounds from index N on (a page "
                        "that holds the first N appends them)")
    async def dashboard_workers(offset: int = Query(0, ge=0),
                                limit: int = Query(WORKERS_PAGE, ge=1, le=MAX_WORKERS_PAGE),
                                rounds_from: int = Query(0, ge=0)) -> Response:
        return _json_response(_rounds_from(await run.worker_history(offset, limit), rounds_from))

    @router.get(f"{API}/events", tags=["dashboard"], response_class=StreamingResponse,
                summary="Server-sent events: the dashboard's state each time the run changes",
                responses={200: {"content": {"text/event-stream": {}},
                                 "description": "`state` events holding /v1/dashboard's JSON; after the first, "
                                                "`rounds` holds only the rounds from index `rounds_from` on"}})
    async def events(workers_offset: int = Query(0, ge=0),
                     workers_limit: int = Query(WORKERS_PAGE, ge=1, le=MAX_WORKERS_PAGE)) -> StreamingResponse:
        return StreamingResponse(_stream(run, workers_offset, workers_limit), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get(f"{API}/predict", response_model=PredictInfo, tags=["predict"],
                summary="What the model predicts (the classes, or a value) and from what (the features: ranges, "
                        "means, categories' values)",
                responses={409: {"description": "the run's task offers no prediction, or has no plan yet"}})
    async def predict_info() -> PredictInfo:
        schema, model = prediction()
        return schema.info(_name(schema.task), model.version, model.round, song_search(schema.task) is not None)

    @router.post(f"{API}/predict", response_model=PredictResponse, tags=["predict"],
                 summary="Predict a batch of rows (feature name → value) with the current model: each class's "
                         "probability and the most probable class, or the predicted value",
                 responses={409: {"description": "the run's task offers no prediction, or has no plan yet"},
                            422: {"description": "a row has a feature that is not one, a value of the wrong type, "
                                                 "not finite or outside the feature's limits: `detail` names the "
                                                 "row (by index) and the feature; `problems` lists them"}})
    async def predict_batch(req: PredictRequest) -> Response | PredictResponse:
        schema, model = prediction()

        def checked_and_predicted() -> tuple[Checked, np.ndarray]:
            checked = schema.check(req.rows)
            return checked, schema.task.predict_rows(model.weights, checked.rows)

        try:
            # Off the event loop: a thousand rows of many features must not hold up the run's transfers. The
            # model's arrays are read-only views the engine replaces, never changes, so the thread reads one model.
            checked, output = await asyncio.to_thread(checked_and_predicted)
            return schema.answer(_name(schema.task), model.version, model.round, checked, output)
        except RowsRejected as exc:
            return JSONResponse(exc.body(), status_code=422)
        except TaskError as exc:
            refused = _refused(exc)
            if refused is None:  # not about a row the client sent: the run's task or model is at fault
                raise HTTPException(500, f"task {_name(schema.task)!r} cannot predict: {exc}") from exc
            return JSONResponse(refused.body(), status_code=422)
        except ValueError as exc:
            raise HTTPException(500, f"task {_name(schema.task)!r} cannot predict: {exc}") from exc

    @router.get(f"{API}/songs", response_model=SongSearch, tags=["predict"],
                summary="Songs of the data set whose title or artist contains every word of `q` (the songs task)",
                responses={409: {"description": "the run's task offers no song search"}})
    async def songs(q: str = Query(min_length=1, max_length=200),
                    limit: int = Query(10, ge=1, le=50)) -> SongSearch:
        search = song_search(loaded())
        if search is None:
            raise HTTPException(409, f"this run's task {run_task_name()!r} offers no song search (the songs "
                                     "task does)")
        # A search scans 40,000 titles in Python: off the event loop, so transfers keep flowing.
        return SongSearch.model_validate(await asyncio.to_thread(search.search_songs, q, limit))

    return router


def _name(task: object) -> str:
    return str(getattr(task, "name", ""))


def _refused(exc: TaskError) -> RowsRejected | None:
    """The task's refusal of a row (its message starts "row 2: ", by the protocol) as the checks' own
    refusals are sent; None if the message names no row."""
    head, _, message = str(exc).partition(": ")
    index = head.removeprefix("row ")
    if head.startswith("row ") and index.isdecimal() and message:
        return RowsRejected([RowProblem(int(index), [], message)])
    return None


def _schema(task: Predictor, run_task_name: Callable[[], str]) -> Schema:
    """``task``'s feature schema, parsed; 409 if the task cannot say it now, 500 if it is malformed."""
    try:
        raw = task.feature_schema()
    except TaskError as exc:
        raise HTTPException(409, f"this run's task {run_task_name()!r} cannot predict yet: {exc}") from exc
    try:
        return Schema(task, raw)
    except (ValidationError, ValueError) as exc:
        raise HTTPException(500, f"this run's task {run_task_name()!r} gave a feature schema that cannot be "
                                 f"used: {schema_problem(exc)}") from exc


def _rounds_from(history: dict[str, Any], start: int) -> dict[str, Any]:
    """A worker-history page with only the rounds from index ``start`` on, in ``rounds`` and in every
    worker's series (so they stay aligned), and ``rounds_from``: ``start``. Examples and label counts are
    each worker's latest, whatever ``start`` is."""
    workers = [{k: v[start:] if k in SERIES else v for k, v in w.items()} for w in history["workers"]]
    return {**history, "rounds_from": start, "rounds": history["rounds"][start:], "workers": workers}


def _paged(snap: dict[str, Any], offset: int, limit: int) -> dict[str, Any]:
    """``snap`` with one page of its workers, and ``workers_page``: that page's offset and limit, and the total."""
    workers = snap.get("workers", [])
    return {**snap, "workers": workers[offset:offset + limit],
            "workers_page": {"offset": offset, "limit": limit, "total": len(workers)}}


async def _stream(run: RunSource, workers_offset: int = 0, workers_limit: int = WORKERS_PAGE) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    sent = 0
    while True:
        # The event first, then the state: a change made after this read sets the event we wait on.
        changed = run.changed()
        snap = _paged(run.snapshot(), workers_offset, workers_limit)
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


def add_pages(router: APIRouter | FastAPI, pages: dict[str, str]) -> None:
    """Serve each page of ``pages`` (URL path: file in static/) and every static file at ``/static/NAME``, read
    once from the package, with ETags."""
    assets = _load_assets()

    def page(name: str) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        async def serve(request: Request) -> Response:
            return _asset(assets, name, request)
        return serve

    for path, name in pages.items():
        router.add_api_route(path, page(name), methods=["GET", "HEAD"], include_in_schema=False)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        if name not in assets:
            return JSONResponse({"detail": f"no asset {name!r}"}, status_code=404)
        return _asset(assets, name, request)


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
