"""``fedfleet serve PATH``: the dashboard and the predict page of finished runs, from their files.

PATH is a run folder (as ``--run DIR``), served at ``/`` as before; or a folder of runs (``runs/``), served
as a run list at ``/``, each run's dashboard and predict page under ``/runs/NAME/`` (the pages use
relative URLs, so a run's router works under any prefix) and a compare view at ``/compare``. See
``web.runs`` for which folders are runs and how names are checked.

A run folder may come from someone else, and its config.toml may name any ``module:attr`` as the
task (``os:system``): loading a task imports and calls it. So only built-in tasks and those given
with ``--allow-task`` are loaded. Without its task a run still has its dashboard; the prediction
routes answer 409 saying why the task is not loaded.

Access is the coordinator's own (``coordinator.security``, ``coordinator.http_limits``): an admin token
(bearer or the /login cookie) for everything but /v1/health, TLS done by the same protocol class, the
same Host check against DNS rebinding, and the same refusal to serve beyond loopback without a token.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from fedfleet import log
from fedfleet.asgi import JSON_BODY_LIMIT, ASGIApp, BodyLimit, listen, respond
from fedfleet.coordinator.http_limits import Wire, connection_cap, open_fds, protocol_class, raise_fd_limit
from fedfleet.coordinator.limits import HEADER_LIMIT, HEADER_TIMEOUT, IDLE_TIMEOUT
from fedfleet.coordinator.security import Access, AuthMiddleware, HostCheck
from fedfleet.coordinator.server import check_tls, is_loopback
from fedfleet.errors import ConfigError, FedfleetError
from fedfleet.protocol.messages import API, Status
from fedfleet.web.routes import add_pages, create_router
from fedfleet.web.runs import Catalog, is_run, run_stamp
from fedfleet.web.sources import FinishedRun

RUNS_PREFIX = "/runs/"
LOADED_RUNS = 8  # runs kept loaded (model, task, records) for their dashboards; the least recently used goes


class Health(BaseModel):
    """/v1/health, as a coordinator answers it: ``ok`` while this server serves; ``state`` is the run's
    ("serving" for a folder of runs)."""

    ok: bool
    state: str


def create_app(run: FinishedRun, task_problem: str | None = None, run_list: str | None = None) -> FastAPI:
    """The app serving ``run``; with ``task_problem`` (why its task is not loaded) prediction answers 409;
    with ``run_list`` (a run of a folder served) its pages link back to that list."""
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

    router = create_router(run, run_list=run_list)
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


def create_runs_app(catalog: Catalog, allowed_tasks: Collection[str] = ()) -> ASGIApp:
    """The app serving every run under ``catalog.root``: the list, the compare view and each run's pages."""
    return RunsDispatcher(_listing_app(catalog), catalog, allowed_tasks)


def _listing_app(catalog: Catalog) -> FastAPI:
    app = FastAPI(title="fedfleet runs", version="1", docs_url=None, redoc_url=None,
                  description=f"The runs under {catalog.root}: the list, their rounds, and each run's dashboard "
                              f"under {RUNS_PREFIX}NAME/.")
    app.add_middleware(BodyLimit, limit=JSON_BODY_LIMIT)
    # The same files as every run's pages: one stylesheet and chart code for the list and the runs.
    add_pages(app, {"/": "runs.html", "/compare": "compare.html"})

    @app.get(f"{API}/health", response_model=Health, tags=["runs"])
    async def health() -> Health:
        return Health(ok=True, state="serving")

    @app.get(f"{API}/runs", tags=["runs"],
             summary="The runs under the folder served, scanned now: each one's state, scores and options, the "
                     "options that differ between them, and the folders skipped as not runs")
    async def runs() -> Response:
        scan = await asyncio.to_thread(catalog.scan)
        body = {"root": catalog.root.name or str(catalog.root), **scan.to_dict()}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @app.get(f"{API}/runs/{{name:path}}", tags=["runs"],
             summary="One run of the list and its rounds' score and loss (what the compare view draws)")
    async def one_run(name: str) -> Response:
        entry = await asyncio.to_thread(catalog.entry, name)
        if entry is None:
            raise HTTPException(404, _unknown(name))
        try:
            rounds = await asyncio.to_thread(catalog.rounds, name)
        except FedfleetError as exc:
            raise HTTPException(409, f"run {name!r} cannot be read: {exc}") from exc
        body = {"run": entry.to_dict(), "rounds": rounds}
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    return app


def _unknown(name: str) -> str:
    return f"no run named {name!r} in the folder served; the runs are listed at /"


class RunsDispatcher:
    """``/runs/NAME/...`` to NAME's own app (its dashboard and predict page), everything else to ``listing``.

    NAME is matched against the names the catalog's scan found, never turned into a path; the app is
    loaded when first asked for (reading the model and loading the task, off the event loop) and kept
    for the ``LOADED_RUNS`` runs most recently asked for, or until the run's files change.
    """

    def __init__(self, listing: ASGIApp, catalog: Catalog, allowed_tasks: Collection[str]) -> None:
        self.listing = listing
        self.catalog = catalog
        self.allowed_tasks = tuple(allowed_tasks)
        self.apps: OrderedDict[str, tuple[Any, ASGIApp]] = OrderedDict()
        self.loading = asyncio.Lock()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not path.startswith(RUNS_PREFIX):
            await self.listing(scope, receive, send)
            return
        rest = path[len(RUNS_PREFIX):]
        name = self.match(rest) or await asyncio.to_thread(self.rescan_match, rest)
        if name is None:
            await _error(scope, send, 404, _unknown(rest.rstrip("/")))
            return
        prefix = RUNS_PREFIX + name
        if rest == name:  # the pages' relative URLs need the slash
            location = quote(prefix + "/") + (f"?{scope['query_string'].decode('latin-1')}"
                                              if scope.get("query_string") else "")
            await respond(send, 308, b"", b"text/plain", [(b"location", location.encode("latin-1"))])
            return
        try:
            app = await self.app(name)
        except FedfleetError as exc:
            await _error(scope, send, 409, f"run {name!r} has no dashboard: {exc}")
            return
        await app({**scope, "root_path": scope.get("root_path", "") + prefix}, receive, send)

    def match(self, rest: str) -> str | None:
        """The longest scanned name that ``rest`` (the path after /runs/) is, or starts with as a folder."""
        names = [n for n in self.catalog.names() if rest == n or rest.startswith(n + "/")]
        return max(names, key=len) if names else None

    def rescan_match(self, rest: str) -> str | None:
        """A run made since the last scan: scan once more before saying no."""
        self.catalog.scan()
        return self.match(rest)

    async def app(self, name: str) -> ASGIApp:
        async with self.loading:
            folder = self.catalog.path(name)
            if folder is None:
                raise ConfigError(_unknown(name))
            stamp = await asyncio.to_thread(run_stamp, folder)
            cached = self.apps.get(name)
            if cached is not None and cached[0] == stamp:
                self.apps.move_to_end(name)
                return cached[1]
            run = await asyncio.to_thread(FinishedRun.load, folder, self.allowed_tasks)
            app = create_app(run, run.task_problem, run_list="/")
            self.apps[name] = (stamp, app)
            self.apps.move_to_end(name)
            while len(self.apps) > LOADED_RUNS:
                self.apps.popitem(last=False)
            return app


async def _error(scope: MutableMapping[str, Any], send: Callable[[Any], Awaitable[None]], status: int,
                 detail: str) -> None:
    """An error answered before any app: a small page for a browser (with the way back to the list), else JSON."""
    accept = dict(scope.get("headers", [])).get(b"accept", b"").decode("latin-1")
    if scope["type"] == "http" and "text/html" in accept:
        body = ERROR_PAGE.format(message=html.escape(detail)).encode()
        await respond(send, status, body, b"text/html; charset=utf-8")
        return
    await respond(send, status, json.dumps({"detail": detail}).encode(), b"application/json")


ERROR_PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>fedfleet: no such run</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<link rel=stylesheet href="/static/style.css"></head>
<body><main><h1>fedfleet</h1><p class=error>{message}</p><p><a href="/">All runs</a></p></main></body></html>
"""


def secured(app: ASGIApp, host: str, admin_token: str | None, tls: bool,
            allowed_hosts: tuple[str, ...] = ()) -> ASGIApp:
    """``app`` behind the coordinator's checks: the admin token (bearer or the /login cookie) on all but
    /v1/health, and on loopback without a token (or with ``allowed_hosts``) the Host check."""
    asgi: ASGIApp = AuthMiddleware(app, Access(admin_token), secure_cookie=tls)
    if allowed_hosts or (is_loopback(host) and admin_token is None):
        asgi = HostCheck(asgi, host, allowed_hosts)
    return asgi


def check_exposure(host: str, admin_token: str | None, tls: bool, insecure: bool) -> None:
    """Beyond loopback an admin token is needed (unless ``insecure``), as a coordinator needs a join token:
    without one, anyone who reaches the port reads every run's config, scores and model."""
    if is_loopback(host):
        return
    if admin_token is None and not insecure:
        raise ConfigError(f"refusing to serve on {host} without an admin token: anyone who can reach it could read "
                          "the runs' dashboards, configs and models. Set FEDFLEET_ADMIN_TOKEN or "
                          "--admin-token-file, or pass --insecure on a network you trust", option="host")
    if admin_token is not None and not tls:
        log.event("serve.plaintext_tokens", logging.WARNING, host=host,
                  message="the admin token will cross the network in clear text; use --tls-cert/--tls-key")


def serve(path: Path, host: str = "127.0.0.1", port: int = 8080, allowed_tasks: Collection[str] = (), *,
          only_run: bool = False, admin_token: str | None = None, tls_cert: Path | None = None,
          tls_key: Path | None = None, insecure: bool = False, allowed_hosts: tuple[str, ...] = ()) -> int:
    """Serve until interrupted; the first line on stdout gives the URL (with port 0, the port picked).

    ``path`` is a run folder, or (unless ``only_run``: ``--run``) a folder of runs.
    """
    tls = check_tls(tls_cert, tls_key)
    check_exposure(host, admin_token, tls is not None, insecure)
    if not only_run and not path.is_dir():
        raise ConfigError(f"{path} is not a folder: give a run's folder (fedfleet run --out) or a folder of runs",
                          option="path")
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{sock.getsockname()[1]}"
    if only_run or is_run(path):
        app: ASGIApp = _single_run(path, url, allowed_tasks)
    else:
        app = _many_runs(path, url, allowed_tasks)
    wire = Wire(header_bytes=HEADER_LIMIT, header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                max_open=connection_cap(raise_fd_limit(), open_fds()), tls=tls)
    # No ssl for uvicorn: the protocol does the TLS handshake itself (see http_limits), as the coordinator's.
    server = uvicorn.Server(uvicorn.Config(
        secured(app, host, admin_token, tls is not None, allowed_hosts), http=protocol_class(wire),
        log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    server.run(sockets=[sock])
    return 0


def _single_run(directory: Path, url: str, allowed_tasks: Collection[str]) -> ASGIApp:
    run = FinishedRun.load(directory, allowed_tasks)
    s = run.status
    print(f"serving run {s.run_id} ({s.state}, {s.round} rounds, task {s.task}) from {directory} at {url} "
          f"(prediction page: {url}/predict); Ctrl-C stops", flush=True)
    if run.task_problem is not None:
        print(f"fedfleet serve: the dashboard works, prediction does not: {run.task_problem}", file=sys.stderr,
              flush=True)
    return create_app(run, run.task_problem)


def _many_runs(root: Path, url: str, allowed_tasks: Collection[str]) -> ASGIApp:
    catalog = Catalog(root)
    scan = catalog.scan()
    print(f"serving {len(scan.runs)} runs under {root} at {url} (each run's dashboard: {url}{RUNS_PREFIX}NAME/, "
          f"compare: {url}/compare); Ctrl-C stops", flush=True)
    if not scan.runs:
        print(f"fedfleet serve: no run folders under {root} yet (a run folder has a config.toml); runs made there "
              "show up when the list is reloaded", file=sys.stderr, flush=True)
    return create_runs_app(catalog, allowed_tasks)
