"""Run the coordinator: the engine and its API on uvicorn, until the run is over."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import uvicorn

from fedfleet import log
from fedfleet.config import RunConfig
from fedfleet.coordinator.app import create_app
from fedfleet.coordinator.engine import Engine
from fedfleet.storage.files import write_text_atomic
from fedfleet.tasks import load_task

ADDRESS_FILE = "coordinator.json"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (see ``ADDRESS_FILE`` for which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: RunConfig, data_dir: Path, host: str = "127.0.0.1", port: int = 8080,
          linger: float = 10.0) -> int:
    """Serve until the run finishes or fails (or SIGINT/SIGTERM); exit status 0 only if it finished."""
    data_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(config.task, config.task_options_dict)
    engine = Engine(config, task, data_dir, linger=linger)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(engine, on_done=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=3, timeout_keep_alive=75,
        h11_max_incomplete_event_size=64 * 1024))
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{actual}"
    write_text_atomic(data_dir / ADDRESS_FILE, json.dumps(
        {"url": url, "host": host, "port": actual, "pid": os.getpid(), "run_id": engine.run_id}) + "\n")
    log.event("coordinator.listening", run=engine.run_id, url=url, task=config.task, rounds=config.rounds,
              workers=config.workers)
    server.run(sockets=[sock])
    (data_dir / ADDRESS_FILE).unlink(missing_ok=True)
    return 0 if engine.state == "finished" else 1
