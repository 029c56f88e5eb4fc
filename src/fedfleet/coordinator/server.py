"""Run the coordinator: the engine and its API on uvicorn, until the run is over or a signal stops it.

Exit status: 0 when the run finished, 1 when it failed, 128 + the signal's number when SIGINT (130) or
SIGTERM (143) stopped it, as shells report a process a signal ended. A stopped run is resumable: start
the coordinator again with the same data dir and config. ``coordinator.json`` in the data dir, the
address a local runner reads, exists only while this process serves: it is removed on every way out.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import ssl
from pathlib import Path
from types import FrameType

import uvicorn

from fedfleet import log
from fedfleet.asgi import ASGIApp, listen
from fedfleet.config import RunConfig
from fedfleet.coordinator.app import create_app
from fedfleet.coordinator.engine import Engine, check_data_source
from fedfleet.coordinator.http_limits import Wire, connection_cap, open_fds, protocol_class, raise_fd_limit
from fedfleet.coordinator.limits import Limits
from fedfleet.coordinator.security import Access, HostCheck, load_secret
from fedfleet.errors import ConfigError, FedfleetError
from fedfleet.parent import follow_parent
from fedfleet.storage.files import write_text_atomic
from fedfleet.tasks import check_ready, check_run, load_task, torch_common

ADDRESS_FILE = "coordinator.json"
SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT and SIGTERM stop the run (resumable) before the server shuts
    down, and are not raised again once it has: the exit status says which signal it was instead."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine
        self.stopped_by: signal.Signals | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = signal.Signals(sig)
        elif sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for open connections
        self.should_exit = True

    async def main_loop(self) -> None:
        await super().main_loop()
        # Before uvicorn's shutdown: the stop wakes the workers' long-polls, so their connections close
        # at once instead of holding the shutdown for its grace period.
        self.stop_run()

    def stop_run(self) -> None:
        if self.stopped_by is None:
            return
        try:
            self.engine.stop(f"stopped by {SIGNAL_NAMES.get(self.stopped_by, self.stopped_by.name)}")
        except FedfleetError as exc:
            log.event("run.stop_failed", logging.ERROR, run=self.engine.run_id, error=str(exc))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context, loaded here so that a bad certificate or key is a clear error, not a traceback."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither", option="tls-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS file {exc.filename} does not exist", option="tls-cert") from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate and its private "
                          f"key: {exc}", option="tls-cert") from exc
    return context


def serve(config: RunConfig, data_dir: Path, host: str = "127.0.0.1", port: int = 8080,
          linger: float = 10.0, *, admin_token: str | None = None, join_token: str | None = None,
          tls_cert: Path | None = None, tls_key: Path | None = None, insecure: bool = False,
          limits: Limits | None = None, allowed_hosts: tuple[str, ...] = ()) -> int:
    """Serve until the run finishes or fails (or SIGINT/SIGTERM); exit status 0 only if it finished.

    Off the loopback interface a join token is required unless ``insecure``: without one, anyone who
    reaches the port could join the run and send it updates. On loopback without an admin token, or
    whenever ``allowed_hosts`` are given, only requests for this coordinator's own names are answered
    (``security.HostCheck``).
    """
    follow_parent()
    tls = check_tls(tls_cert, tls_key)
    fd_limit = raise_fd_limit()
    if not is_loopback(host) and join_token is None and not insecure:
        raise ConfigError(f"refusing to serve on {host} without a join token: anyone who can reach it could join "
                          "the run and send updates. Set FEDFLEET_JOIN_TOKEN or --join-token-file (and "
                          "--admin-token-file), or pass --insecure on a network you trust", option="host")
    # Bound, and the task loaded, before anything is written: a port in use or a task that cannot run is
    # one line, and leaves no half-made data dir.
    sock = listen(host, port)
    task = load_task(config.task, config.task_options_dict)
    check_ready(task)
    check_run(task, config)
    check_data_source(config, task)
    data_dir.mkdir(parents=True, exist_ok=True)
    access = Access(admin_token, join_token, load_secret(data_dir) if join_token is not None else b"")
    if not is_loopback(host) and tls is None and (admin_token or join_token):
        log.event("coordinator.plaintext_tokens", logging.WARNING, host=host,
                  message="tokens will cross the network in clear text; use --tls-cert/--tls-key")
    # Evaluation runs between rounds, while the workers wait: give it every core this process may use.
    torch_common.use_threads(torch_common.usable_cpus())
    engine = Engine.open(config, task, data_dir, linger=linger)
    actual = sock.getsockname()[1]
    server: _Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    limits = limits or Limits()
    app = create_app(engine, on_done=stop, access=access, limits=limits, secure_cookie=tls is not None)
    asgi: ASGIApp = app
    if allowed_hosts or (is_loopback(host) and admin_token is None):
        asgi = HostCheck(app, host, allowed_hosts)
    # Measured now that the task, the database and the socket are open: what is left is for clients.
    wire = Wire(header_bytes=limits.header_bytes, header_timeout=limits.header_timeout,
                idle_timeout=limits.idle_timeout, max_open=connection_cap(fd_limit, open_fds()), tls=tls)
    # No access log: it would be the one place a token in a URL could leak to; events are logged instead.
    # No ssl for uvicorn either: the protocol does the TLS handshake itself (see http_limits).
    server = _Server(uvicorn.Config(
        asgi, http=protocol_class(wire), log_level="warning", access_log=False, timeout_graceful_shutdown=3,
        limit_concurrency=limits.max_connections), engine)
    shown = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{shown}:{actual}"
    address = data_dir / ADDRESS_FILE
    try:
        write_text_atomic(address, json.dumps(
            {"url": url, "host": host, "port": actual, "pid": os.getpid(), "run_id": engine.run_id}) + "\n")
        log.event("coordinator.listening", run=engine.run_id, url=url, task=config.task, rounds=config.rounds,
                  workers=config.workers, admin_token=admin_token is not None, join_token=join_token is not None,
                  max_open_connections=wire.max_open, host_check=asgi is not app)
        server.run(sockets=[sock])
        # A signal during start-up skips uvicorn's main loop (and so the stop in it): stop here then.
        server.stop_run()
    finally:
        _remove_address(address)
    state = engine.snapshot().state
    if state == "stopped" and server.stopped_by is not None:
        return 128 + server.stopped_by.value
    return 0 if state == "finished" else 1


def _remove_address(path: Path) -> None:
    """Remove the address file if this process wrote it (never another coordinator's)."""
    try:
        mine = json.loads(path.read_text()).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return
    if mine:
        path.unlink(missing_ok=True)
