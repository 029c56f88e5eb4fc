"""The executors that train simulated clients: local processes, or Ray actors.

Both load the task once per executor and take ``client.Job``s one at a time; a client exists only for
the length of its job. The global model is published once per version and shared read-only:

- ``LocalExecutors``: a pool of processes on this host. Each version's safetensors bytes are written to
  one file in shared memory (``/dev/shm`` where there is one) and every process maps it read-only: one
  copy of the model in RAM whatever the number of processes, and no bytes through a pipe per job.
- ``RayExecutors``: actors on a Ray cluster (``--ray-address``; a local Ray instance if none). Each
  version goes once into Ray's object store; actors on one node read it from there, and fetch it once
  per version.

Answers come back as the bytes a worker would upload, which the coordinator checks as it checks any
upload: an executor is trusted to run the task, not to bypass the intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import mmap
import multiprocessing
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedfleet.errors import ConfigError, TaskError
from fedfleet.protocol import codec
from fedfleet.simulate.client import Job, Outcome, run_job
from fedfleet.tasks import Task, load_task, torch_common
from fedfleet.types import Weights

Backend = str  # "local" | "ray"
START_TIMEOUT = 300.0  # seconds an executor may take to load its task (imports, a data set read from disk)
BACKENDS = ("local", "ray")


class Executors(ABC):
    """Where simulated clients are trained."""

    count: int

    @abstractmethod
    def publish(self, version: int, model: bytes | memoryview) -> None:
        """Make model ``version`` (safetensors bytes) the one jobs of that version train from."""

    @abstractmethod
    async def run(self, jobs: list[Job]) -> list[Outcome]:
        """Do ``jobs`` (of one model version), in order, on one executor once one is free. A job that raised
        has an outcome with its ``error``; ``ExecutorFailed`` if the executor itself is gone."""

    @abstractmethod
    def close(self) -> None:
        """Stop the executors and free the published models."""


# --- what runs inside an executor ---------------------------------------------------------------
class _Worker:
    """An executor's own state: the task, loaded once, and the model of the version last used."""

    def __init__(self, task: str, options: dict[str, str], threads: int) -> None:
        torch_common.use_threads(threads)
        self.task: Task = load_task(task, options)
        self.version = -1
        self.model: Weights | None = None
        self._map: mmap.mmap | None = None

    def model_from_file(self, version: int, path: str) -> Weights:
        if version != self.version or self.model is None:
            self.model = None
            if self._map is not None:
                with contextlib.suppress(BufferError):  # arrays of the old version may still be referenced
                    self._map.close()
            with open(path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self.model, _ = codec.decode(memoryview(self._map))  # read-only views of the mapped file
            self.version = version
        return self.model

    def model_from_bytes(self, version: int, body: bytes) -> Weights:
        if version != self.version or self.model is None:
            self.model, _ = codec.decode(body)
            self.version = version
        return self.model

    def run(self, job: Job, model: Weights | None) -> Outcome:
        try:
            return run_job(self.task, job, model)
        except Exception as exc:  # the job's failure, not the executor's: it takes the next one
            return Outcome(job.worker_id, None, "its job failed", error=repr(exc))


def _serve(conn: Connection, task: str, options: dict[str, str], threads: int) -> None:
    """An executor process: take (jobs, model file) from ``conn``, answer with the outcomes' headers and then
    their bodies as raw bytes, until told to stop (None) or the parent goes."""
    try:
        worker = _Worker(task, options, threads)
    except BaseException as exc:  # the task cannot load here: say so, instead of dying with no word
        conn.send(("failed", repr(exc)))
        return
    conn.send(("ready", ""))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        jobs, path = message
        try:
            model = worker.model_from_file(jobs[0].model_version, path) if path is not None else None
        except Exception as exc:  # a model file that cannot be read fails the batch, not the executor
            conn.send([Outcome(j.worker_id, None, "its job failed", error=repr(exc)) for j in jobs])
            continue
        outcomes = [worker.run(job, model) for job in jobs]
        # The headers, then each body as raw bytes: the model-sized part is never pickled.
        conn.send([dataclasses.replace(o, body=b"" if o.body is not None else None) for o in outcomes])
        for o in outcomes:
            if o.body is not None:
                conn.send_bytes(o.body)


# --- local processes ----------------------------------------------------------------------------
def shared_memory_dir() -> Path:
    """A folder whose files live in RAM where the system has one (Linux's /dev/shm), else the temp folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class ExecutorFailed(RuntimeError):
    """An executor process ended, or its task could not load: the job given to it has no answer."""


class _Process:
    """One executor process and the pipe to it; one job at a time."""

    def __init__(self, ctx: multiprocessing.context.SpawnContext, task: str, options: dict[str, str],
                 threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, task, options, threads), daemon=True,
                                name="fedfleet-executor")
        self.proc.start()
        child.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until the process has loaded its task; raise TaskError with its reason if it could not."""
        if not self.conn.poll(timeout):
            raise TaskError(f"executor process {self.proc.pid} did not load the task within {timeout:g} s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise TaskError(f"executor process {self.proc.pid} ended while loading the task (exit code "
                            f"{self.proc.exitcode})") from exc
        if kind != "ready":
            raise TaskError(f"an executor process could not load the task: {value}")

    async def run(self, jobs: list[Job], path: str | None) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        self.conn.send((jobs, path))
        heads: list[Outcome] = await self._read(loop, self.conn.recv)
        out = []
        for head in heads:
            body = await self._read(loop, self.conn.recv_bytes) if head.body is not None else None
            out.append(dataclasses.replace(head, body=body))
        return out

    async def _read(self, loop: asyncio.AbstractEventLoop, read: Callable[[], Any]) -> Any:
        """``read()`` once the pipe has something: in the event loop, no thread per executor."""
        ready: asyncio.Future[None] = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            return read()
        except (EOFError, OSError) as exc:
            raise ExecutorFailed(f"executor process {self.proc.pid} ended (exit code {self.proc.exitcode})") \
                from exc

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class LocalExecutors(Executors):
    """``count`` processes on this host (spawned: never forked from a process that holds threads), each
    taking one job at a time over a pipe; a job goes to whichever is free first."""

    def __init__(self, task: str, options: dict[str, str], count: int, threads: int = 1) -> None:
        self.count = count
        self._dir = Path(tempfile.mkdtemp(prefix="fedfleet-sim-", dir=shared_memory_dir()))
        self._paths: dict[int, Path] = {}
        ctx = multiprocessing.get_context("spawn")
        self._procs = [_Process(ctx, task, options, threads) for _ in range(count)]
        self._idle: asyncio.Queue[_Process] | None = None
        try:
            for p in self._procs:
                p.wait_ready(START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def publish(self, version: int, model: bytes | memoryview) -> None:
        if version in self._paths:
            return
        path = self._dir / f"model-{version}.safetensors"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(model)
        tmp.replace(path)
        self._paths[version] = path
        # Jobs of the previous version may still be running; older ones are done. A process holding an
        # older file mapped keeps its pages until it lets them go.
        for old in [v for v in self._paths if v < version - 1]:
            self._paths.pop(old).unlink(missing_ok=True)

    async def run(self, jobs: list[Job]) -> list[Outcome]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for p in self._procs:
                self._idle.put_nowait(p)
        version = jobs[0].model_version
        path = str(self._paths[version]) if version >= 0 else None
        proc = await self._idle.get()
        if not proc.proc.is_alive():  # every executor has ended: this one was put back to say so
            self._idle.put_nowait(proc)
            raise ExecutorFailed(f"every executor process has ended (the last with exit code {proc.proc.exitcode})")
        try:
            return await proc.run(jobs, path)
        finally:
            # A process that ended takes no more jobs, unless it was the last: then it wakes those waiting.
            if proc.proc.is_alive() or not any(p.proc.is_alive() for p in self._procs):
                self._idle.put_nowait(proc)

    def close(self) -> None:
        for p in self._procs:
            p.close()
        shutil.rmtree(self._dir, ignore_errors=True)


# --- Ray actors ---------------------------------------------------------------------------------
class _Actor:
    """The body of a Ray actor (wrapped with ``ray.remote`` when Ray is loaded)."""

    def __init__(self, task: str, options: dict[str, str], threads: int) -> None:
        self.worker = _Worker(task, options, threads)

    def run(self, jobs: list[Job], model: list[Any]) -> list[Outcome]:
        # ``model`` is [ObjectRef] (a list, so that Ray does not fetch it for every call): fetched only when
        # the version changes.
        import ray

        weights = None
        version = jobs[0].model_version
        if version >= 0:
            if version != self.worker.version:
                self.worker.model_from_bytes(version, ray.get(model[0]))
            weights = self.worker.model
        return [self.worker.run(job, weights) for job in jobs]


def require_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--backend ray needs Ray: pip install 'fedfleet[ray]'", option="backend") from exc
    return ray


class RayExecutors(Executors):
    """``count`` Ray actors, each holding one CPU, on the cluster at ``address`` (None: start a local one)."""

    def __init__(self, task: str, options: dict[str, str], count: int, address: str | None = None,
                 threads: int = 1) -> None:
        ray = require_ray()
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            # The driver's environment (the data folders named by FEDFLEET_*_DIR, say) goes to the actors.
            env = {k: v for k, v in os.environ.items() if k.startswith("FEDFLEET_")}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None,
                     **({"num_cpus": count} if address is None else {}))
        actor = ray.remote(num_cpus=1)(_Actor)
        self._actors = [actor.remote(task, options, threads) for _ in range(count)]
        self.count = count
        self._idle: asyncio.Queue[Any] | None = None
        self._models: dict[int, Any] = {}

    def publish(self, version: int, model: bytes | memoryview) -> None:
        if version not in self._models:
            self._models[version] = self._ray.put(bytes(model))
            for old in [v for v in self._models if v < version - 1]:
                del self._models[old]

    async def run(self, jobs: list[Job]) -> list[Outcome]:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for a in self._actors:
                self._idle.put_nowait(a)
        actor = await self._idle.get()
        try:
            version = jobs[0].model_version
            ref = [self._models[version]] if version >= 0 else []
            outcomes: list[Outcome] = await actor.run.remote(jobs, ref)
            return outcomes
        finally:
            self._idle.put_nowait(actor)

    def close(self) -> None:
        for a in self._actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self._actors = []
        if self._started:
            self._ray.shutdown()


def open_executors(backend: Backend, task: str, options: dict[str, str], count: int,
                   ray_address: str | None = None) -> Executors:
    if backend == "local":
        return LocalExecutors(task, options, count)
    if backend == "ray":
        return RayExecutors(task, options, count, ray_address)
    raise ConfigError(f"The 'backend' option must be one of {', '.join(BACKENDS)}. Got {backend!r} instead.",
                      option="backend")
