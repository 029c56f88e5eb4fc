"""Fixtures that start real fedfleet processes (coordinator, workers) on 127.0.0.1 and always stop them.

Use the factory fixtures in a test::

    def test_something(coordinator, worker):
        coord = coordinator("--task", "songs", "--workers", "2", "--rounds", "3")
        proc, url = coord                        # a Coordinator unpacks as (proc, url)
        w = worker(coord.url, clients=2)         # a Worker: proc, state_dir, log_path
        ...
        w.kill()                                 # SIGKILL its whole process group (e.g. a crash test)
        print(coord.log_text())

``coordinator`` and ``worker`` are function-scoped; ``module_fleet`` gives the same ``.coordinator``
and ``.worker`` factories for a module-scoped fixture of your own. Every process is started in its
own session (process group), logs to a file under the test's tmp dir, and is stopped at teardown:
SIGTERM to the group, then SIGKILL if it has not exited after a grace period. When a test fails, the
tails of its processes' logs are printed in the teardown section of the report.

``start_coordinator(directory, *args)`` and ``start_worker(directory, url, *args)`` are the plain
functions underneath, for code that manages the processes itself (then call ``stop_process``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest

# Helper modules the tests import: rewrite their asserts as pytest does the tests' own, so that they
# check under ``python -O`` too (which strips plain asserts).
pytest.register_assert_rewrite("hostile", "metrics_support", "tcp_proxy", "helm_binary")

HOST = "127.0.0.1"
MNIST_ENV = "FEDFLEET_MNIST_DIR"
FASHION_MNIST_ENV = "FEDFLEET_FASHION_MNIST_DIR"


def image_data_dir(env: str) -> Path:
    """The folder of a real image data set (the IDX files) that ``$env`` names; the calling test is
    skipped, with the reason, when the variable is not set (a fresh clone), and fails when it names no
    folder. .ci/run sets both from the copies it has."""
    value = os.environ.get(env)
    if not value:
        pytest.skip(f"${env} is not set: point it at the IDX files (`fedfleet data download` fetches them)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"${env} is {value!r}, which is not a folder")
    return path
START_TIMEOUT = 60.0  # seconds for a coordinator to load its task and write coordinator.json
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL at teardown
ADDRESS_FILE = "coordinator.json"


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m fedfleet ARGV`` in a new session, stdout and stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FEDFLEET_LOG_LEVEL", None)
    with log_path.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> int:
    """Stop ``proc`` and everything in its process group: SIGTERM, then SIGKILL after ``grace`` s."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    # Whatever it left behind in its group goes too, even if the leader already exited.
    _signal_group(proc, signal.SIGKILL)
    return proc.wait(timeout=grace)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # start_new_session=True made the child the leader of a process group whose id is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class Coordinator:
    """A running coordinator process. Unpacks as ``proc, url = coordinator``."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    def __iter__(self) -> Iterator[object]:
        return iter((self.proc, self.url))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the coordinator's process group (SIGKILL: a crash)."""
        _signal_group(self.proc, sig)


@dataclass
class Worker:
    """A running ``fedfleet worker`` process (one or more logical workers)."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker's process group (SIGKILL: a crash; SIGTERM: a clean stop)."""
        _signal_group(self.proc, sig)


def start_coordinator(directory: Path, *args: str, log_level: str = "INFO", data_dir: Path | None = None,
                      timeout: float = START_TIMEOUT) -> Coordinator:
    """Start ``fedfleet coordinator ARGS`` on 127.0.0.1 and a free port; return once it answers /v1/health.

    ``directory`` gets the log (``coordinator.log``, appended to across restarts) and, unless
    ``data_dir`` is given, the data dir (``directory/data``). Pass the same ``data_dir`` again to
    restart (resume) a run. Fails the test with the log's tail if the process exits or does not
    come up within ``timeout`` seconds. The caller must stop it (``stop_process``); the fixtures do.
    """
    data_dir = data_dir or directory / "data"
    log_path = directory / "coordinator.log"
    argv = ["--log-level", log_level, "coordinator", "--data-dir", str(data_dir), "--host", HOST,
            "--port", "0", *args]
    proc = _spawn(argv, log_path)
    try:
        url = _wait_listening(proc, data_dir / ADDRESS_FILE, log_path, timeout)
    except BaseException:
        stop_process(proc)
        raise
    return Coordinator(proc, url, data_dir, log_path)


def _wait_listening(proc: subprocess.Popen[bytes], address: Path, log_path: Path, timeout: float) -> str:
    end = time.monotonic() + timeout
    url: str | None = None
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"the coordinator exited with status {proc.returncode} before serving; its log:\n"
                        f"{log_tail(log_path)}", pytrace=False)
        if url is None:
            try:
                info = json.loads(address.read_text())
                # A file left by an earlier (killed) coordinator in this data dir names another pid.
                if info.get("pid") == proc.pid:
                    url = str(info["url"])
            except (OSError, ValueError, KeyError):
                pass
        if url is not None:
            try:
                # Only "is it up?": tests of TLS check the certificate themselves.
                if httpx.get(f"{url}/v1/health", timeout=5.0, verify=False).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
        time.sleep(0.05)
    pytest.fail(f"the coordinator did not serve within {timeout:g} s; its log:\n{log_tail(log_path)}",
                pytrace=False)


def start_worker(directory: Path, url: str, *args: str, clients: int = 1, state_dir: Path | None = None,
                 name: str = "", log_level: str = "INFO") -> Worker:
    """Start ``fedfleet worker --coordinator URL --clients N --state-dir D ARGS``; does not wait for it.

    Logs go to ``directory/<state dir name>.log``. Reuse a ``state_dir`` to restart a worker that
    keeps its ids (and so its partitions). The caller must stop it; the fixtures do.
    """
    if state_dir is None:
        n = 0
        while (directory / f"worker-{n}").exists():
            n += 1
        state_dir = directory / f"worker-{n}"
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{state_dir.name}.log"
    argv = ["--log-level", log_level, "worker", "--coordinator", url, "--clients", str(clients),
            "--state-dir", str(state_dir)]
    if name:
        argv += ["--name", name]
    return Worker(_spawn([*argv, *args], log_path), state_dir, log_path)


def run_fedfleet(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m fedfleet ARGS`` to completion, output captured (``env`` is added to this environment)."""
    return subprocess.run([sys.executable, "-m", "fedfleet", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {})})


def wait_for_train_task(client: httpx.Client, worker_id: str, timeout: float = 60.0) -> dict[str, object]:
    """Long-poll as ``worker_id`` until a training task is handed out (the round is open); fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        task: dict[str, object] = client.get(f"/v1/workers/{worker_id}/task", params={"wait": 1}).json()
        if task["kind"] == "train" or time.monotonic() > end:
            break
    assert task["kind"] == "train", task
    return task


class Fleet:
    """Starts coordinators and workers under one directory and stops all of them at ``close``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.coordinators: list[Coordinator] = []
        self.workers: list[Worker] = []

    def coordinator(self, *args: str, log_level: str = "INFO", data_dir: Path | None = None,
                    timeout: float = START_TIMEOUT) -> Coordinator:
        c = start_coordinator(self.directory, *args, log_level=log_level, data_dir=data_dir, timeout=timeout)
        self.coordinators.append(c)
        return c

    def worker(self, url: str, *args: str, clients: int = 1, state_dir: Path | None = None, name: str = "",
               log_level: str = "INFO") -> Worker:
        w = start_worker(self.directory, url, *args, clients=clients, state_dir=state_dir, name=name,
                         log_level=log_level)
        self.workers.append(w)
        return w

    def logs(self) -> str:
        out = []
        for p in [c.log_path for c in self.coordinators] + [w.log_path for w in self.workers]:
            out.append(f"----- {p.name} -----\n{log_tail(p)}")
        return "\n".join(out)

    def close(self) -> None:
        # Workers first, so that they do not spend the teardown retrying a vanished coordinator.
        for proc in [w.proc for w in self.workers] + [c.proc for c in self.coordinators]:
            stop_process(proc)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _failed(node: pytest.Item) -> bool:
    return any(getattr(getattr(node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        if _failed(request.node):
            print(f.logs())
        f.close()


@pytest.fixture(scope="module")
def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A Fleet shared by a module's tests; its processes are stopped after the module's last test."""
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def coordinator(fleet: Fleet) -> Callable[..., Coordinator]:
    """Factory: ``coordinator(*args) -> Coordinator`` (unpacks as ``proc, url``), stopped at teardown."""
    return fleet.coordinator


@pytest.fixture
def worker(fleet: Fleet) -> Callable[..., Worker]:
    """Factory: ``worker(url, *args, clients=1) -> Worker``, stopped at teardown."""
    return fleet.worker


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py imported as a module (the folder is no package), under its own name in
    sys.modules: its dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
