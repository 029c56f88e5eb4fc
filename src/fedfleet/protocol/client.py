"""The worker's side of the /v1 API.

Control calls (register, long-poll, heartbeat) use httpx. Tensor transfers use the standard
library's ``http.client`` on a kept-alive connection: for bodies of megabytes it costs several
times less CPU than httpx (measured, see shared design notes), and it lets the upload be sent as
the header plus each array's own buffer, with no joined copy.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import math
import ssl
import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np
from pydantic import ValidationError

from fedfleet import log
from fedfleet.errors import AuthError, ConfigError, ProtocolError, RequestRejected, TransportError
from fedfleet.protocol import codec
from fedfleet.protocol.messages import (
    API,
    INSTRUCTION,
    INSTRUCTION_BYTES_HEADER,
    MODEL_VERSION_HEADER,
    UPDATE_META_KEY,
    Decline,
    DeclineAck,
    DescriptionAck,
    DescriptionBody,
    Instruction,
    PlanResponse,
    RegisterRequest,
    RegisterResponse,
    SecAggAck,
    SecAggKeys,
    SecAggReveal,
    SecAggShares,
    Status,
    UpdateAck,
    UpdateMeta,
    UploadRequest,
    UploadStatus,
    one_line,
)
from fedfleet.protocol.transfer import (
    CHUNKED_UPLOAD_BYTES,
    MODEL_RESUMES,
    READ_PIECE,
    UPLOAD_CHUNK_BYTES,
    UPLOAD_RESUMES,
    backoff,
    content_range,
    slice_parts,
)
from fedfleet.types import Weights


def check_url(url: str) -> str:
    """The coordinator URL without a trailing slash; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, like http://127.0.0.1:8080. "
                         f"Got {url!r} instead.")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"has a bad port: {url!r} ({exc})") from None
    return url.rstrip("/")


@functools.cache
def system_tls() -> ssl.SSLContext:
    """The CAs httpx verifies against by default, loaded once per process and shared by its clients.

    ``httpx.Client(verify=True)`` loads its own copy, about 0.8 MiB: a worker process hosting 125 logical
    workers (``--clients``) held 100 MiB of them. A context is safe to share between threads."""
    return httpx.create_ssl_context()


def tls_context(ca: Path | None) -> ssl.SSLContext | bool:
    """What to verify an https coordinator against: the CA in ``ca`` (PEM), or the system's CAs."""
    if ca is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca))
    except FileNotFoundError as exc:
        raise ConfigError(f"--ca file {ca} does not exist", option="ca") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--ca file {ca} is not PEM CA certificates: {exc}", option="ca") from exc


# Busy or briefly away (429, 502, 503, 504): worth a retry with backoff, like a refused connection.
RETRY_STATUSES = (429, 502, 503, 504)
# The coordinator itself answered that it is busy: it is alive, and says when to come back.
BUSY_STATUSES = (429, 503)
DEFAULT_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 60.0


class CoordinatorBusy(TransportError):
    """The coordinator answered 429 or 503: alive but busy (e.g. over its registration rate).

    Unlike a request that got no answer, this is no sign that the coordinator is gone, so a worker
    does not count it towards giving up; ``retry_after`` is the wait its ``Retry-After`` asked for."""

    def __init__(self, message: str, retry_after: float = DEFAULT_RETRY_AFTER) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delay-seconds only), bounded; the default if absent or not a number."""
    try:
        seconds = float(value) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        return DEFAULT_RETRY_AFTER
    if not math.isfinite(seconds):
        return DEFAULT_RETRY_AFTER
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _raise_for(status: int, body: bytes, what: str, retry_after_header: str | None = None) -> None:
    if status < 400:
        return
    try:
        detail = json.loads(body).get("detail", body[:300].decode(errors="replace"))
    except (ValueError, AttributeError):
        detail = body[:300].decode(errors="replace")
    if status in (404, 409):
        raise RequestRejected(f"{what}: {detail}", status=status)
    if status in BUSY_STATUSES:
        raise CoordinatorBusy(f"{what}: HTTP {status}: {detail}", retry_after(retry_after_header))
    if status in RETRY_STATUSES:
        raise TransportError(f"{what}: HTTP {status}: {detail}")
    if status in (401, 403):
        raise AuthError(f"{what}: HTTP {status}: {detail}", status=status)
    raise ProtocolError(f"{what}: HTTP {status}: {detail}", status=status)


class CoordinatorClient:
    """One connection's worth of client: use one per thread.

    ``join_token`` is sent to register; the worker token that registration returns (``token``) is
    sent on every later call of this client.
    """

    def __init__(self, url: str, timeout: float = 60.0, verify: ssl.SSLContext | bool = True,
                 join_token: str | None = None, token: str | None = None) -> None:
        self.url = check_url(url)
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path
        self._timeout = timeout
        self._verify = verify
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=10.0),
                                  verify=system_tls() if verify is True else verify)
        self._conn: http.client.HTTPConnection | None = None
        self._upload: tuple[tuple[str, int, int, int], str] | None = None  # the chunked upload under way
        self.join_token = join_token
        self.token = token
        self.last_body_seconds = 0.0  # how long the last long-poll's body took to read, once it was answered

    def close(self) -> None:
        self._http.close()
        if self._conn is not None:
            self._conn.close()

    # --- control (httpx) -------------------------------------------------------------------------
    def _auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _call(self, method: str, path: str, what: str, token: str | None = None,
              headers: dict[str, str] | None = None, **kw: Any) -> Any:
        try:
            # token None: this client's worker token; "" sends none (registering on an open coordinator).
            auth = self._auth(self.token if token is None else token)
            r = self._http.request(method, API + path, headers={**auth, **(headers or {})}, **kw)
        except httpx.TransportError as exc:
            raise TransportError(f"{what}: {exc!r}") from exc
        _raise_for(r.status_code, r.content, what, r.headers.get("retry-after"))
        return r.json()

    def register(self, worker_id: str | None, name: str, worker_token: str | None = None,
                 data_source: Literal["partitions", "sites"] = "partitions") -> RegisterResponse:
        """Join the run (with the join token); a known ``worker_id`` is taken back with its ``worker_token``.

        The worker token in the reply is kept and sent on this client's later calls."""
        req = RegisterRequest(worker_id=worker_id, name=name, data_source=data_source)
        extra = {"X-Fedfleet-Worker-Token": worker_token} if worker_token and worker_id else {}
        reply = RegisterResponse.model_validate(self._call(
            "POST", "/workers", "register", token=self.join_token or "", headers=extra,
            json=req.model_dump(exclude_none=True)))
        self.token = reply.token
        return reply

    def next_instruction(self, worker_id: str, wait: float) -> Instruction:
        """Long-poll for what to do next. On the lean connection: it is on every worker's path every round."""
        return self.next_instruction_and_model(worker_id, wait)[0]

    def next_instruction_and_model(self, worker_id: str, wait: float,
                                   have: int | None = None) -> tuple[Instruction, tuple[int, Weights] | None]:
        """Long-poll for what to do next; with ``have`` (the model version held, -1 for none), a coordinator that
        can sends a newer small model with a training instruction, saving the download request: then the model
        (version, read-only arrays) comes back too."""
        query = f"wait={wait:g}" + ("" if have is None else f"&have={have}")
        status, resp = self._exchange("next instruction", "GET", f"/workers/{worker_id}/task?{query}")
        t0 = time.perf_counter()  # the poll has ended: from here on, the body's bytes are the download
        body = self._read(resp, "next instruction")
        self.last_body_seconds = time.perf_counter() - t0
        _raise_for(status, body, "next instruction", resp.getheader("Retry-After"))
        split = resp.getheader(INSTRUCTION_BYTES_HEADER)
        model = None
        if split is not None:
            head = int(split) if split.isdecimal() and int(split) <= len(body) else -1
            if head < 0:
                raise ProtocolError(f"next instruction: {INSTRUCTION_BYTES_HEADER} {split!r} does not fit a body "
                                    f"of {len(body)} bytes", status=502)
            weights, _ = codec.decode(memoryview(body)[head:])
            for a in weights.values():
                a.flags.writeable = False
            model = (int(resp.getheader(MODEL_VERSION_HEADER) or 0), weights)
            body = body[:head]
        try:
            return INSTRUCTION.validate_json(body), model
        except ValidationError as exc:
            raise ProtocolError(f"next instruction: the coordinator sent an invalid instruction: "
                                f"{one_line(exc)}") from exc

    def heartbeat(self, worker_ids: list[str], tokens: list[str] | None = None) -> int:
        """Say these workers are alive; ``tokens`` (each id's worker token, in order) when the run needs them."""
        body: dict[str, list[str]] = {"worker_ids": worker_ids}
        if tokens:
            body["tokens"] = tokens
        return int(self._call("POST", "/heartbeat", "heartbeat", json=body)["known"])

    def describe(self, worker_id: str, description: dict[str, Any]) -> DescriptionAck:
        """Send this worker's description of its data; a refusal (422) says what did not fit the run."""
        return DescriptionAck.model_validate(self._call(
            "POST", f"/workers/{worker_id}/description", "describe the data",
            json=DescriptionBody(description=description).model_dump()))

    def secagg(self, step: str, body: SecAggKeys | SecAggShares | SecAggReveal) -> SecAggAck:
        """Send one secure-aggregation message (``step``: keys, shares or reveal) for this round attempt."""
        return SecAggAck.model_validate(self._call("POST", f"/secagg/{step}", f"secure aggregation: {step}",
                                                   json=body.model_dump()))

    def decline(self, worker_id: str, round: int, attempt: int, reason: str) -> bool:
        """Say this worker will not answer round ``round`` attempt ``attempt``; True if the round took note."""
        printable = "".join(c if c.isprintable() else " " for c in reason)[:300]
        body = Decline(round=round, attempt=attempt, reason=printable).model_dump()
        return DeclineAck.model_validate(self._call("POST", f"/workers/{worker_id}/decline", "decline a round",
                                                    json=body)).declined

    def leave(self, worker_id: str) -> None:
        """Give this worker's partition back: it cannot take part (its data could not be read)."""
        try:
            r = self._http.request("DELETE", f"{API}/workers/{worker_id}", headers=self._auth(self.token))
        except httpx.TransportError as exc:
            raise TransportError(f"leave the run: {exc!r}") from exc
        _raise_for(r.status_code, r.content, "leave the run")

    def plan(self) -> dict[str, Any] | None:
        """The run's plan, or None while it is still being agreed."""
        return PlanResponse.model_validate(self._call("GET", "/plan", "plan")).plan

    def status(self, admin_token: str | None = None) -> Status:
        return Status.model_validate(self._call("GET", "/status", "status", token=admin_token))

    # --- tensors (http.client) -------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                ctx = self._verify if isinstance(self._verify, ssl.SSLContext) else ssl.create_default_context()
                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                                         context=ctx)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def _exchange(self, what: str, method: str, path: str, parts: list[bytes | memoryview] | None = None,
                  headers: dict[str, str] | None = None,
                  reconnect: bool = True) -> tuple[int, http.client.HTTPResponse]:
        """Send one request on the kept-alive connection; reconnect once if the server had closed it
        (unless ``reconnect`` is False: a resumable upload asks where it stands instead of resending)."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.putrequest(method, self._prefix + API + path, skip_accept_encoding=True)
                if self.token:
                    conn.putheader("Authorization", f"Bearer {self.token}")
                for k, v in (headers or {}).items():
                    conn.putheader(k, v)
                if parts is not None:
                    conn.putheader("Content-Type", "application/octet-stream")
                    conn.putheader("Content-Length", str(sum(len(p) for p in parts)))
                conn.endheaders()
                try:
                    for p in parts or ():
                        conn.send(p)
                except (BrokenPipeError, ConnectionResetError):
                    # The server may have answered (a 4xx) and closed before reading the whole body:
                    # that answer is still in our receive buffer, and it is the one to report.
                    pass
                resp = conn.getresponse()
                return resp.status, resp
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._conn = None
                # A kept-alive connection the server has closed fails at once; a fresh one is the test.
                if attempt == 1 or not reconnect or not isinstance(
                        exc, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError):
                    raise TransportError(f"{what}: {exc!r}") from exc
        raise AssertionError("unreachable")

    def download_model(self) -> tuple[int, Weights]:
        """The current global model and its version. Arrays are read-only views of one buffer.

        If the connection breaks mid-body, the download resumes where it stopped (``Range`` with
        ``If-Range``, so the rest comes from the same model version, or the whole new one if it changed)
        into the same buffer, up to ``MODEL_RESUMES`` times."""
        buf: bytearray | None = None
        got = resumes = version = 0
        etag: str | None = None
        while True:
            headers = {"Range": f"bytes={got}-", "If-Range": etag} if buf is not None and etag else None
            try:
                status, resp = self._exchange("download model", "GET", "/model", headers=headers)
                if status == 206 and buf is not None:
                    span = content_range(resp.getheader("Content-Range"))
                    if span is None or span[0] != got or span[2] != len(buf):
                        raise ProtocolError(f"download model: asked for bytes {got}- of {len(buf)}, got "
                                            f"Content-Range {resp.getheader('Content-Range')!r}", status=502)
                elif status == 200 and int(resp.getheader("Content-Length") or -1) >= 0:
                    length = int(resp.getheader("Content-Length") or 0)
                    if buf is None or len(buf) != length:
                        buf = bytearray(length)
                    got, etag = 0, resp.getheader("ETag")
                    version = int(resp.getheader(MODEL_VERSION_HEADER) or 0)
                else:
                    _raise_for(status if status >= 400 else 502, resp.read(), "download model")
                if buf is None:  # a 206 before any 200: nothing to resume into
                    raise ProtocolError("download model: the coordinator answered a Range it was not asked",
                                        status=502)
                view = memoryview(buf)
                while got < len(buf):
                    n = resp.readinto(view[got:got + READ_PIECE])
                    if n == 0:
                        raise http.client.IncompleteRead(b"", len(buf) - got)
                    got += n
                break
            except (OSError, http.client.HTTPException, TransportError) as exc:
                self._reset()
                if buf is None or resumes >= MODEL_RESUMES:
                    raise TransportError(f"download model: {exc!r}") from exc
                log.event("model.resumed", logging.WARNING, at=got, of=len(buf), error=repr(exc))
                time.sleep(backoff(resumes))
                resumes += 1
        weights, _ = codec.decode(buf)
        for a in weights.values():
            a.flags.writeable = False
        return version, weights

    def upload(self, weights: Weights, meta: UpdateMeta, resumable: bool = False) -> UpdateAck:
        """Send an update as safetensors, its metadata in the header, the arrays' buffers as they are.

        In one request when small; in resumable chunks (``/v1/uploads``) when over
        ``CHUNKED_UPLOAD_BYTES`` or when ``resumable`` (e.g. after a failed single upload)."""
        arrays = {k: np.asarray(v) for k, v in weights.items()}
        parts = codec.encode_parts(arrays, {UPDATE_META_KEY: meta.model_dump_json()})
        if resumable or sum(len(p) for p in parts) > CHUNKED_UPLOAD_BYTES:
            return self._upload_chunked(parts, meta)
        status, resp = self._exchange("upload update", "POST", "/updates", parts)
        body = self._read(resp, "upload update")
        _raise_for(status, body, f"upload update for round {meta.round}")
        return UpdateAck.model_validate_json(body)

    def _upload_chunked(self, parts: list[bytes | memoryview], meta: UpdateMeta) -> UpdateAck:
        """Send ``parts`` through a resumable upload; a broken chunk resumes from the coordinator's offset.

        The upload's id is kept for the next call with the same (worker, round, attempt), so a retry
        after this one gave up resumes too instead of starting again."""
        total = sum(len(p) for p in parts)
        what = f"upload update for round {meta.round}"
        key = (meta.worker_id, meta.round, meta.attempt, total)
        st: UploadStatus | None = None
        if self._upload is not None and self._upload[0] == key:
            try:
                st = self._upload_status(self._upload[1], what)
            except RequestRejected:
                st = None  # gone (round over, or refused): open a new one, which says why if it cannot
        if st is None:
            req = UploadRequest(worker_id=meta.worker_id, round=meta.round, attempt=meta.attempt, total_bytes=total)
            st = UploadStatus.model_validate(self._call("POST", "/uploads", what, json=req.model_dump()))
        self._upload = (key, st.upload_id)
        resumes = 0
        while st.ack is None:
            start = st.offset
            end = min(start + UPLOAD_CHUNK_BYTES, total)
            try:
                status, resp = self._exchange(what, "PUT", f"/uploads/{st.upload_id}", slice_parts(parts, start, end),
                                              headers={"Content-Range": f"bytes {start}-{end - 1}/{total}"},
                                              reconnect=False)
                body = self._read(resp, what)
                if status == 200:
                    st = UploadStatus.model_validate_json(body)
                    continue
                if status != 409:
                    _raise_for(status, body, what)
                reason = f"HTTP 409: {body[:200].decode(errors='replace')}"
            except TransportError as exc:
                reason = str(exc)
            # Broken, or out of step with the coordinator: ask where it stands and go on from there.
            if resumes >= UPLOAD_RESUMES:
                raise TransportError(f"{what}: gave up after {resumes} resumes ({reason})")
            time.sleep(backoff(resumes))
            resumes += 1
            st = self._upload_status(st.upload_id, what)
            log.event("update.resumed", logging.WARNING, worker=meta.worker_id, round=meta.round, at=st.offset,
                      of=total, reason=reason)
        self._upload = None
        return st.ack

    def _upload_status(self, upload_id: str, what: str) -> UploadStatus:
        return UploadStatus.model_validate(self._call("GET", f"/uploads/{upload_id}", what))

    def _read(self, resp: http.client.HTTPResponse, what: str) -> bytes:
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._reset()
            raise TransportError(f"{what}: {exc!r}") from exc

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
