"""The coordinator's HTTP API (/v1), served by FastAPI on uvicorn; its OpenAPI document is /openapi.json.

JSON for control messages, safetensors bodies for tensors. Every error a client causes is a 4xx
whose ``detail`` says what was wrong; the engine's state is untouched by a rejected request. The
handlers are thin: updates go through ``engine.intake`` (coordinator.intake), everything else through
the engine's commands and views.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from fedfleet.asgi import BodyLimit
from fedfleet.coordinator.engine import Engine
from fedfleet.coordinator.limits import Limits, RateLimit
from fedfleet.coordinator.live import LiveRun
from fedfleet.coordinator.ranges import model_response
from fedfleet.coordinator.security import (
    Access,
    AuthMiddleware,
    check_heartbeat,
    check_reclaim,
    require_worker,
)
from fedfleet.coordinator.uploads import UPLOAD_DIR, UploadSessions, create_upload_router
from fedfleet.errors import AuthError, FedfleetError, ProtocolError, RequestRejected
from fedfleet.protocol.messages import (
    API,
    INLINE_MODEL_BYTES,
    INSTRUCTION_BYTES_HEADER,
    MODEL_VERSION_HEADER,
    Decline,
    DeclineAck,
    DescriptionAck,
    DescriptionBody,
    EvalResult,
    Instruction,
    PlanResponse,
    RegisterRequest,
    RegisterResponse,
    SecAggAck,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    Status,
    TrainInstruction,
    UpdateAck,
    WorkerId,
    WorkerView,
)
from fedfleet.storage.records import RoundRecord
from fedfleet.web import create_router

MODEL_MEDIA_TYPE = "application/octet-stream"
MAX_WORKERS_PAGE = 10_000
METRICS_PATH = "/metrics"


class Heartbeat(BaseModel):
    worker_ids: list[WorkerId] = Field(max_length=100_000)
    tokens: list[str] = Field(default_factory=list, max_length=100_000,
                              description="each worker's token, in the order of worker_ids, when the "
                                          "coordinator has a join token")


class HeartbeatAck(BaseModel):
    known: int


class Health(BaseModel):
    ok: bool
    state: str


def _status_of(exc: FedfleetError) -> int:
    return exc.status if isinstance(exc, ProtocolError) else 500


def create_app(engine: Engine, on_done: Callable[[], None] | None = None, access: Access | None = None,
               limits: Limits | None = None, secure_cookie: bool = False) -> FastAPI:
    """The API of ``engine``; ``access`` says which tokens it needs (None: open), ``limits`` how much it takes."""
    access = access or Access()
    limits = limits or Limits()
    registrations = RateLimit(limits.registration_rate, limits.registration_burst)
    uploads = UploadSessions(engine.intake, engine.progress_event, engine.run_dir.path / UPLOAD_DIR)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_task = asyncio.create_task(engine.run())

        async def watch() -> None:
            await engine.done.wait()
            if on_done is not None:
                on_done()

        watcher = asyncio.create_task(watch())
        sweeper = asyncio.create_task(uploads.watch())
        yield
        for t in (loop_task, watcher, sweeper):
            t.cancel()

    # Swagger UI and ReDoc pull their scripts from a CDN, which offline hosts cannot reach.
    app = FastAPI(title="fedfleet coordinator", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Federated learning coordinator: workers register, long-poll for tasks, "
                              "download the model and upload updates as safetensors.")
    # /metrics takes no body; exempt, so that a scrape never depends on the JSON body logic.
    # Upload chunks (PUT /v1/uploads/ID) are bounded by their upload's declared size instead.
    app.add_middleware(BodyLimit, limit=limits.json_body_bytes, exempt=(f"{API}/updates", METRICS_PATH),
                       exempt_prefix=f"{API}/uploads/")
    # Added last, so it runs first: a request without the right token is turned away before its body is read.
    app.add_middleware(AuthMiddleware, access=access, secure_cookie=secure_cookie,
                       on_refused=engine.metrics.request_refused)

    @app.exception_handler(FedfleetError)
    async def fedfleet_error(request: Request, exc: FedfleetError) -> JSONResponse:
        if isinstance(exc, AuthError):
            engine.metrics.request_refused(exc.reason or "unauthorized")
            headers = {"WWW-Authenticate": 'Bearer realm="fedfleet"'} if exc.status == 401 else None
            return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
        return JSONResponse({"detail": str(exc)}, status_code=_status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {detail}"}, status_code=422)

    @app.get(f"{API}/health", response_model=Health, tags=["run"])
    async def health() -> Health:
        return Health(ok=engine.state != "failed", state=engine.state)

    @app.get(f"{API}/status", response_model=Status, tags=["run"])
    async def status() -> Status:
        return engine.status()

    @app.get(f"{API}/rounds", response_model=list[RoundRecord], tags=["run"])
    async def rounds() -> list[RoundRecord]:
        return engine.rounds()

    @app.post(f"{API}/evaluate", response_model=EvalResult, tags=["run"],
              summary="Test the current global model on the coordinator's held-out set")
    async def evaluate() -> EvalResult:
        return await engine.evaluate()

    @app.post(f"{API}/workers", response_model=RegisterResponse, tags=["workers"],
              responses={429: {"description": "too many registrations at once; retry after Retry-After s"}})
    async def register(req: RegisterRequest,
                       x_fedfleet_worker_token: str | None = Header(None, max_length=200)) -> RegisterResponse:
        wait = registrations.take()
        if wait > 0:
            engine.metrics.request_refused("rate_limited")
            raise HTTPException(429, f"too many registrations: over {limits.registration_rate:g} per second; "
                                     f"retry in {wait:.1f} s", headers={"Retry-After": str(max(1, round(wait)))})
        if req.worker_id is not None and engine.is_registered(req.worker_id):
            check_reclaim(access, req.worker_id, x_fedfleet_worker_token)
        reply = engine.register(req.worker_id, req.name, req.data_source)
        return reply.model_copy(update={"token": access.worker_token(reply.worker_id)})

    @app.get(f"{API}/workers", response_model=list[WorkerView], tags=["workers"],
             summary="The registered workers by partition; `offset` and `limit` page them, and the "
                     "X-Total-Count header says how many there are")
    async def workers(response: Response, offset: int = Query(0, ge=0),
                      limit: int | None = Query(None, ge=1, le=MAX_WORKERS_PAGE,
                                                description="at most this many [default: all]")) -> list[WorkerView]:
        response.headers["X-Total-Count"] = str(engine.workers_registered())
        return engine.workers_view(offset, limit)

    @app.post(f"{API}/heartbeat", response_model=HeartbeatAck, tags=["workers"])
    async def heartbeat(req: Heartbeat) -> HeartbeatAck:
        check_heartbeat(access, req.worker_ids, req.tokens)
        return HeartbeatAck(known=engine.heartbeat(req.worker_ids))

    # The path keeps its /task name so that workers already deployed keep working; what it answers is
    # an Instruction (train / stats / wait / stop), not an ML task.
    @app.get(f"{API}/workers/{{worker_id}}/task", response_model=Instruction, tags=["workers"],
             summary="Long-poll for the next instruction: held open until there is work or `wait` seconds pass")
    async def next_instruction(worker_id: WorkerId, wait: float = Query(20.0, ge=0, le=300),
                               have: int | None = Query(None, ge=-1, description=(
                                   "the model version this worker holds (-1: none): a training instruction for a "
                                   f"newer one of at most {INLINE_MODEL_BYTES} bytes then comes with the model, the "
                                   f"JSON followed by the safetensors bytes, split by the {INSTRUCTION_BYTES_HEADER} "
                                   "header"))) -> Instruction | Response:
        msg = await engine.next_instruction(worker_id, wait)
        if have is None or not isinstance(msg, TrainInstruction) or msg.model_version <= have:
            return msg
        version, body = engine.model_download()
        if version != msg.model_version or len(body) > INLINE_MODEL_BYTES:
            return msg
        head = msg.model_dump_json().encode()
        engine.model_sent(len(body))
        return Response(b"".join((head, body)), media_type=MODEL_MEDIA_TYPE, headers={
            INSTRUCTION_BYTES_HEADER: str(len(head)), MODEL_VERSION_HEADER: str(version)})

    @app.post(f"{API}/workers/{{worker_id}}/description", response_model=DescriptionAck, tags=["workers"],
              summary="Describe this worker's data (aggregates the task's plan is agreed from; never rows)")
    async def describe(worker_id: WorkerId, body: DescriptionBody, request: Request) -> DescriptionAck:
        require_worker(request.scope, worker_id)
        return DescriptionAck(accepted=True, described=engine.describe(worker_id, body.description))

    @app.delete(f"{API}/workers/{{worker_id}}", status_code=204, tags=["workers"],
                summary="Leave the run before taking part (e.g. this worker's data could not be read): its "
                        "partition is free at once")
    async def leave(worker_id: WorkerId, request: Request) -> Response:
        require_worker(request.scope, worker_id)
        engine.leave(worker_id)
        return Response(status_code=204)

    @app.post(f"{API}/workers/{{worker_id}}/decline", response_model=DeclineAck, tags=["workers"],
              summary="Say this worker will not answer the open round attempt (its fit diverged or failed)")
    async def decline(worker_id: WorkerId, body: Decline, request: Request) -> DeclineAck:
        require_worker(request.scope, worker_id)
        if not engine.is_registered(worker_id):
            raise RequestRejected(f"unknown worker {worker_id!r}: register first", status=404)
        return DeclineAck(declined=engine.decline(worker_id, body.round, body.attempt, body.reason))

    def _size(request: Request) -> int:
        length = request.headers.get("content-length", "")
        return int(length) if length.isdigit() else 0

    @app.post(f"{API}/secagg/keys", response_model=SecAggAck, tags=["secure aggregation"],
              summary="Secure aggregation: this worker's public keys for the open round attempt")
    async def secagg_keys(body: SecAggKeys, request: Request) -> SecAggAck:
        require_worker(request.scope, body.worker_id)
        return SecAggAck(accepted=True, phase=engine.secagg_keys(body, _size(request)))

    @app.post(f"{API}/secagg/shares", response_model=SecAggAck, tags=["secure aggregation"],
              summary="Secure aggregation: the key shares this worker dealt, each encrypted for its holder")
    async def secagg_shares(body: SecAggShares, request: Request) -> SecAggAck:
        require_worker(request.scope, body.worker_id)
        return SecAggAck(accepted=True, phase=engine.secagg_shares(body, _size(request)))

    @app.post(f"{API}/secagg/reveal", response_model=SecAggAck, tags=["secure aggregation"],
              summary="Secure aggregation: the shares this worker reveals to unmask the round")
    async def secagg_reveal(body: SecAggReveal, request: Request) -> SecAggAck:
        require_worker(request.scope, body.worker_id)
        return SecAggAck(accepted=True, phase=engine.secagg_reveal(body, _size(request)))

    @app.get(f"{API}/plan", response_model=PlanResponse, tags=["run"],
             summary="The plan the run agreed from the sites' descriptions (null until it has one, or if its "
                     "task agrees none)")
    async def plan() -> PlanResponse:
        return PlanResponse(plan=engine.plan_view())

    @app.get(f"{API}/model", tags=["tensors"], response_class=Response,
             responses={200: {"content": {MODEL_MEDIA_TYPE: {}},
                              "description": "the global model as safetensors"}, 304: {},
                        206: {"content": {MODEL_MEDIA_TYPE: {}},
                              "description": "the part of it asked with Range (resuming a download)"},
                        416: {"description": "the Range starts past the end of the model"}})
    async def model(request: Request) -> Response:
        version, body = engine.model_download()
        etag = f'"v{version}"'
        headers = {"ETag": etag, MODEL_VERSION_HEADER: str(version), "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        response, sent = model_response(body, headers, request.headers.get("range"), request.headers.get("if-range"),
                                        MODEL_MEDIA_TYPE)
        engine.model_sent(sent)
        return response

    @app.post(f"{API}/updates", response_model=UpdateAck, tags=["tensors"],
              summary="Upload an update: a safetensors body whose __metadata__['fedfleet'] is UpdateMeta JSON",
              openapi_extra={"requestBody": {"required": True, "content": {
                  MODEL_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload(request: Request) -> UpdateAck:
        return await engine.intake.receive(request.stream(), request.headers.get("content-length"),
                                           lambda worker_id: require_worker(request.scope, worker_id))

    @app.get(METRICS_PATH, tags=["monitoring"], response_class=Response,
             summary="Prometheus metrics of the coordinator (text format, or OpenMetrics if Accept asks for it)",
             responses={200: {"content": {"text/plain": {}, "application/openmetrics-text": {}},
                              "description": "metrics in the Prometheus exposition format"}})
    async def metrics(request: Request) -> Response:
        # An async handler runs on the event loop, like the engine: one scrape reads one consistent state.
        body, content_type = engine.metrics.render(request.headers.get("accept"))
        return Response(content=body, media_type=content_type)

    app.include_router(create_upload_router(uploads, lambda request, worker_id: require_worker(request.scope,
                                                                                             worker_id)))
    app.include_router(create_router(LiveRun(engine)))  # the dashboard (/) and the predict page (/predict)
    return app
