"""Resumable uploads: an update sent in chunks, so that a broken connection costs only what was in flight.

    POST   /v1/uploads        {worker_id, round, attempt, total_bytes} → UploadStatus (offset 0)
    PUT    /v1/uploads/{id}   Content-Range: bytes START-END/TOTAL, START = the upload's offset → UploadStatus
    GET    /v1/uploads/{id}   → UploadStatus: resume from its ``offset``
    DELETE /v1/uploads/{id}   abort

Chunks are spooled to ``DATA_DIR/uploads/ID.part``, not held in memory, and what a PUT delivered
before its connection broke is kept: the client asks for the offset and sends the rest. The
safetensors header is checked as soon as its bytes are in (schema, round, worker), so a wrong update
is turned away before its tensors are sent. When the last byte arrives the update is checked for
NaN/Inf and folded into the round's sum from the file, a piece at a time, through the same update
intake (checks, messages, accounting) as ``POST /v1/updates``: the coordinator's memory does not grow with the
model for these uploads, however many are in progress. A spool goes when its update is committed or
refused, when the upload is aborted or replaced by a new one of the same worker, when its round
closes, and at start-up (a restarted coordinator runs the round again).

``POST /v1/updates`` stays the fast path for small models: one request, folded from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from fedfleet.coordinator.intake import HEADER_SLACK, Slot, UpdateIntake
from fedfleet.errors import FedfleetError, ProtocolError
from fedfleet.protocol import codec
from fedfleet.protocol.codec import Header
from fedfleet.protocol.messages import API, UpdateAck, UpdateMeta, UploadRequest, UploadStatus

UPLOAD_DIR = "uploads"
SWEEP_SECONDS = 5.0
_CONTENT_RANGE = re.compile(r"^bytes (\d{1,19})-(\d{1,19})/(\d{1,19})$")
_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Upload:
    id: str
    worker_id: str
    round: int
    attempt: int
    total: int
    path: Path
    offset: int = 0
    header: Header | None = None
    meta: UpdateMeta | None = None
    ack: UpdateAck | None = None
    busy: bool = False  # a request is writing or committing it
    gone: bool = False  # removed; the request that holds it busy deletes the spool when done
    touched: float = 0.0

    def status(self) -> UploadStatus:
        return UploadStatus(upload_id=self.id, worker_id=self.worker_id, round=self.round, attempt=self.attempt,
                            offset=self.offset, total_bytes=self.total, ack=self.ack)


class UploadSessions:
    """The coordinator's resumable uploads; at most one per worker, only for the open round."""

    def __init__(self, intake: UpdateIntake, changed: Callable[[], asyncio.Event], directory: Path) -> None:
        self.intake = intake
        self.changed = changed
        self.directory = directory
        # Spools of an earlier process: their round is run again, so they can only take up disk.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self._uploads: dict[str, Upload] = {}
        self._by_worker: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._uploads)

    # --- sessions ------------------------------------------------------------------------------
    def open(self, req: UploadRequest) -> Upload:
        limit = self.intake.max_update_bytes()
        if req.total_bytes > limit:
            exc = ProtocolError(f"update of {req.total_bytes} bytes is over the limit of {limit} bytes for this "
                                "model", status=413)
            self.intake.rejected(exc)
            raise exc
        # The round, the sampling and duplicates are checked now, before any tensor byte is sent.
        self.intake.admit(UpdateMeta(worker_id=req.worker_id, round=req.round, attempt=req.attempt,
                                     num_examples=1), None)
        old = self._by_worker.get(req.worker_id)
        if old is not None:
            self._remove(self._uploads[old])
        uid = secrets.token_hex(16)
        path = self.directory / f"{uid}.part"
        path.touch(exist_ok=False)
        up = Upload(uid, req.worker_id, req.round, req.attempt, req.total_bytes, path, touched=time.monotonic())
        self._uploads[uid] = up
        self._by_worker[req.worker_id] = uid
        return up

    def get(self, upload_id: str) -> Upload:
        up = self._uploads.get(upload_id) if _ID.match(upload_id) else None
        if up is None:
            raise ProtocolError(f"no upload {upload_id!r}: it was never opened, was aborted or refused, or its "
                                "round is over", status=404)
        return up

    def abort(self, up: Upload) -> None:
        self._remove(up)

    def _remove(self, up: Upload) -> None:
        up.gone = True
        self._uploads.pop(up.id, None)
        if self._by_worker.get(up.worker_id) == up.id:
            del self._by_worker[up.worker_id]
        if not up.busy:
            up.path.unlink(missing_ok=True)

    def sweep(self) -> None:
        """Drop the uploads whose round is no longer the open one."""
        rs = self.intake.round
        for up in list(self._uploads.values()):
            if rs is None or rs.closed or (rs.round, rs.attempt) != (up.round, up.attempt):
                self._remove(up)

    async def watch(self) -> None:
        """Sweep whenever the engine moves on (a round closes, the run ends), for the app's lifetime."""
        while True:
            event = self.changed()
            self.sweep()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), SWEEP_SECONDS)

    # --- chunks --------------------------------------------------------------------------------
    async def write(self, up: Upload, request: Request) -> UploadStatus:
        """Append the chunk in ``request`` to ``up``; commit the update when it was the last one."""
        if up.ack is not None:
            raise ProtocolError(f"upload {up.id} is complete: its update was accepted already", status=409)
        start, end = self._chunk_range(up, request.headers.get("content-range"), request.headers.get("content-length"))
        if up.busy:
            raise ProtocolError(f"another request is still writing upload {up.id} (at byte {up.offset}); ask "
                                "GET for its offset and send from there", status=409)
        up.busy = True
        try:
            await self._receive(up, request, start, end)
            if up.offset == up.total:
                await self._commit(up)
        finally:
            up.busy = False
            up.touched = time.monotonic()
            if up.gone:
                up.path.unlink(missing_ok=True)
        if up.offset <= end:
            raise ProtocolError(f"chunk ended at byte {up.offset}, before the end of its Content-Range "
                                f"{start}-{end}; the bytes that came are kept: send from byte {up.offset}")
        return up.status()

    def _chunk_range(self, up: Upload, value: str | None, length: str | None) -> tuple[int, int]:
        if value is None:
            raise ProtocolError("a chunk needs a Content-Range header: bytes START-END/TOTAL")
        m = _CONTENT_RANGE.match(value.strip())
        if m is None:
            raise ProtocolError(f"Content-Range {value!r} is not 'bytes START-END/TOTAL'")
        start, end, total = (int(g) for g in m.groups())
        if total != up.total:
            raise ProtocolError(f"Content-Range total {total} is not the upload's total_bytes {up.total}")
        if end < start:
            raise ProtocolError(f"Content-Range {start}-{end} ends before it starts")
        if end >= up.total:
            raise ProtocolError(f"Content-Range {start}-{end} goes past the end of the upload's {up.total} bytes "
                                f"(its last byte is {up.total - 1})", status=416)
        if start != up.offset:
            raise ProtocolError(f"chunk starts at byte {start}, but upload {up.id} has {up.offset} bytes: send "
                                f"from byte {up.offset}", status=409)
        if length is not None and (not length.isdigit() or int(length) != end - start + 1):
            raise ProtocolError(f"Content-Length {length} does not match Content-Range {start}-{end} "
                                f"({end - start + 1} bytes)")
        return start, end

    async def _receive(self, up: Upload, request: Request, start: int, end: int) -> None:
        fd = os.open(up.path, os.O_RDWR)
        try:
            async for chunk in request.stream():
                if not chunk:
                    continue
                if up.gone:
                    raise ProtocolError(f"upload {up.id} was removed while its chunk arrived (aborted, replaced, or "
                                        "its round is over)", status=409)
                room = end + 1 - up.offset
                data = memoryview(chunk)[:room]
                _pwrite_all(fd, data, up.offset)
                up.offset += len(data)
                if len(chunk) > room:
                    raise ProtocolError(f"chunk is longer than its Content-Range {start}-{end} "
                                        f"({end - start + 1} bytes)", status=413)
                if up.header is None:
                    self._check_header(up, fd)
        except ClientDisconnect:
            pass  # what arrived is kept; the client resumes from up.offset
        finally:
            os.close(fd)

    def _check_header(self, up: Upload, fd: int) -> None:
        """Check the update's header as soon as its bytes are in; refuse (and drop) the upload if wrong."""
        if up.offset < 8:
            return
        try:
            n = codec.header_length(os.pread(fd, 8, 0))
            if n > HEADER_SLACK:
                raise ProtocolError(f"safetensors header of {n} bytes is over the limit of {HEADER_SLACK} bytes",
                                    status=413)
            if 8 + n > up.total:
                raise ProtocolError(f"safetensors header of {n} bytes does not fit in the upload's total_bytes "
                                    f"{up.total}", status=422, reason="bad_body")
            if up.offset < 8 + n:
                return
            header = codec.parse_header(os.pread(fd, 8 + n, 0))
            meta = UpdateMeta.from_metadata(header.metadata)
            if (meta.worker_id, meta.round, meta.attempt) != (up.worker_id, up.round, up.attempt):
                raise ProtocolError(f"update metadata is for worker {meta.worker_id} round {meta.round} attempt "
                                    f"{meta.attempt}, but upload {up.id} was opened for worker {up.worker_id} round "
                                    f"{up.round} attempt {up.attempt}", status=422, reason="bad_metadata")
            if header.total_bytes != up.total:
                raise ProtocolError(f"safetensors header describes {header.total_bytes} bytes, but upload {up.id} "
                                    f"was opened with total_bytes {up.total}", status=422, reason="bad_body")
        except FedfleetError as exc:
            self.intake.rejected(exc)
            self._remove(up)
            raise
        try:
            self.intake.admit(meta, header)  # counts its own refusals
        except FedfleetError:
            self._remove(up)
            raise
        up.header, up.meta = header, meta

    async def _commit(self, up: Upload) -> None:
        """Check and fold the complete update, as ``POST /v1/updates`` would; the spool goes either way."""
        header, meta = up.header, up.meta
        if header is None or meta is None:
            # Every byte is in, yet the header never was whole: its length prefix points past the end.
            exc = ProtocolError(f"upload {up.id} is complete but holds no whole safetensors header: its bytes "
                                "disagree with its header", status=422, reason="bad_body")
            self.intake.rejected(exc)
            self._remove(up)
            raise exc
        try:
            slot: Slot = self.intake.begin(meta, header)
        except FedfleetError:
            self._remove(up)
            raise
        committed = False
        try:
            up.ack = await self.intake.commit_file(slot, up.path)
            committed = True
        except Exception:
            self._remove(up)
            raise
        finally:
            if not committed:
                self.intake.abort(slot)
        up.gone = True  # the spool is deleted; the session stays (without it) to answer GET until the sweep
        if self._by_worker.get(up.worker_id) == up.id:
            del self._by_worker[up.worker_id]


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# --- routes --------------------------------------------------------------------------------------
def create_upload_router(uploads: UploadSessions, authorize: Callable[[Request, str], None]) -> APIRouter:
    """The /v1/uploads routes. ``authorize(request, worker_id)`` raises unless the request may act for
    that worker (its worker token, when the coordinator needs tokens)."""
    router = APIRouter(prefix=f"{API}/uploads", tags=["tensors"])
    binary = {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @router.post("", response_model=UploadStatus, status_code=201,
                 summary="Open a resumable upload of an update; send its bytes with PUT, in chunks")
    async def open_upload(req: UploadRequest, request: Request) -> UploadStatus:
        authorize(request, req.worker_id)
        return uploads.open(req).status()

    @router.put("/{upload_id}", response_model=UploadStatus, openapi_extra=binary,
                summary="Send the bytes START..END (Content-Range: bytes START-END/TOTAL) of an upload, from "
                        "its offset on; the last chunk commits the update and the reply carries its ack")
    async def put_chunk(upload_id: str, request: Request) -> UploadStatus:
        up = uploads.get(upload_id)
        authorize(request, up.worker_id)
        return await uploads.write(up, request)

    @router.get("/{upload_id}", response_model=UploadStatus,
                summary="Where an upload stands: resume it from its offset")
    async def upload_status(upload_id: str, request: Request) -> UploadStatus:
        up = uploads.get(upload_id)
        authorize(request, up.worker_id)
        return up.status()

    @router.delete("/{upload_id}", status_code=204, response_class=Response, summary="Abort an upload")
    async def abort_upload(upload_id: str, request: Request) -> Response:
        up = uploads.get(upload_id)
        authorize(request, up.worker_id)
        uploads.abort(up)
        return Response(status_code=204)

    return router
