"""``fedfleet run``: a coordinator and N workers as real OS processes on this machine.

The coordinator is started as its own process on a free loopback port, the workers are spread over
a few processes (``--processes``), and this process only watches ``/v1/status`` to draw progress,
exactly as a person with a browser could. Logs of every process go to OUT/logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfleet.config import RunConfig
from fedfleet.coordinator.security import new_token
from fedfleet.coordinator.server import ADDRESS_FILE
from fedfleet.errors import ConfigError, FedfleetError
from fedfleet.protocol.messages import API, Status
from fedfleet.storage.files import write_text_atomic
from fedfleet.storage.records import RunSummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import BUILTIN, find_task, score_name

START_TIMEOUT = 120.0


def default_processes(workers: int) -> int:
    return max(1, min(workers, 8))


def spread(workers: int, processes: int) -> list[int]:
    """How many logical workers each process hosts: as even as possible, none empty."""
    processes = max(1, min(processes, workers))
    base, extra = divmod(workers, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def _prepare_out(out: Path, overwrite: bool) -> None:
    run_dir = RunDir(out)
    if run_dir.state_path.exists():
        if run_dir.summary_path.exists() and not overwrite:
            raise ConfigError(f"{out} already holds a finished run; pass --overwrite to replace it or choose "
                              "another --out", option="out")
        if overwrite:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)


def _spawn(args: list[str], log_path: Path, join_token: str) -> subprocess.Popen[bytes]:
    # The token goes by environment, not argv: other users can read a process's argv, not its environment.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDFLEET_JOIN_TOKEN": join_token}
    fh: IO[bytes] = log_path.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", *args], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        fh.close()


def _wait_address(out: Path, coord: subprocess.Popen[bytes]) -> str:
    path = out / ADDRESS_FILE
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if coord.poll() is not None:
            raise FedfleetError(f"the coordinator exited with status {coord.returncode} before serving:\n"
                                + _tail(out / "logs" / "coordinator.log"))
        try:
            return str(json.loads(path.read_text())["url"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise FedfleetError(f"the coordinator did not start within {START_TIMEOUT:g} s; see {out}/logs/coordinator.log")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_local(config: RunConfig, out: Path, processes: int | None = None, overwrite: bool = False,
              quiet: bool = False) -> int:
    """Run a whole federated job on this machine; returns 0 if it finished, 1 if it failed."""
    _prepare_out(out, overwrite)
    console = Console(stderr=False, quiet=quiet)
    request = out / ".run-config.toml"
    write_text_atomic(request, config.to_toml())
    children: list[subprocess.Popen[bytes]] = []
    # Even on loopback, other local users can reach the port: only our workers may join.
    join_token = new_token()
    t0 = time.monotonic()
    try:
        coord = _spawn(["--log-level", "INFO", "coordinator", "--config", str(request), "--data-dir", str(out),
                        "--host", "127.0.0.1", "--port", "0", "--linger", "5"], out / "logs" / "coordinator.log",
                       join_token)
        children.append(coord)
        url = _wait_address(out, coord)
        counts = spread(config.workers, processes or default_processes(config.workers))
        allow = [] if config.task in BUILTIN else ["--allow-task", config.task]  # the user named it: theirs
        for i, k in enumerate(counts):
            children.append(_spawn(
                ["--log-level", "INFO", "worker", "--coordinator", url, "--clients", str(k),
                 "--state-dir", str(out / "workers" / f"proc-{i}"), "--name", f"local-{i}", "--give-up", "30", *allow],
                out / "logs" / f"worker-{i}.log", join_token))
        console.print(f"fedfleet: {config.task} on {config.workers} workers in {len(counts)} processes, "
                      f"{config.rounds} rounds, partition {config.partition}; coordinator {url}")
        _watch(url, config, coord, console, RunDir(out))
        _stop(children, grace=10.0)
    except BaseException:
        for p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        _stop(children, grace=3.0)
        raise
    finally:
        request.unlink(missing_ok=True)
    summary = RunDir(out).read_summary()
    if summary is None:
        console.print(f"[red]the coordinator ended without a summary[/red]:\n{_tail(out / 'logs' / 'coordinator.log')}")
        return 1
    _print_summary(console, summary, out, time.monotonic() - t0)
    # The summary, not the last status polled, is the word on how the run ended: the coordinator
    # may finish and exit between two polls.
    if summary.state == "finished":
        return 0
    console.print(f"[red]run {summary.state}:[/red] {summary.message}")
    return 1


def _watch(url: str, config: RunConfig, coord: subprocess.Popen[bytes], console: Console, run_dir: RunDir) -> None:
    """Draw a progress bar from /v1/status until the run is over or the coordinator is gone."""
    score = score_name(find_task(config.task))  # the status calls any task's score "accuracy"
    columns = (TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
               TextColumn(f"{score} {{task.fields[acc]}}  loss {{task.fields[loss]}}  {{task.fields[phase]}}"),
               TimeElapsedColumn())
    with httpx.Client(base_url=url, timeout=5.0) as http, \
            Progress(*columns, console=console, disable=console.quiet) as progress:
        bar = progress.add_task("run", total=config.rounds, acc="-", loss="-", phase="starting")
        while coord.poll() is None:
            try:
                status = Status.model_validate(http.get(f"{API}/status").json())
            except (httpx.HTTPError, ValueError):
                time.sleep(0.2)
                continue
            progress.update(bar, completed=status.round, phase=status.phase,
                            acc="-" if status.accuracy is None else f"{status.accuracy:.4f}",
                            loss="-" if status.loss is None else f"{status.loss:.4f}")
            if status.state in ("finished", "failed"):
                break
            time.sleep(0.2)
        # The coordinator may end between two polls: the last word is its summary.
        coord.wait(timeout=60)
        final = run_dir.read_summary()
        if final is not None:
            progress.update(bar, completed=final.rounds, phase=final.state,
                            acc=_fmt(final.final_accuracy), loss=_fmt(final.final_loss))


def _print_summary(console: Console, s: RunSummary, out: Path, wall: float) -> None:
    timings = [r.seconds for r in s.round_timings]
    table = Table(title=f"fedfleet run {s.run_id}: {s.state}", show_header=False)
    rows = [
        ("task", s.task), ("partition", s.partition), ("workers", s.workers),
        ("rounds", f"{s.rounds} of {s.rounds_planned}"),
        (f"final {score_name(find_task(s.task))}", _fmt(s.final_accuracy)), ("final loss", _fmt(s.final_loss)),
        ("seconds (coordinator)", _fmt(s.seconds, 1)), ("seconds (wall)", f"{wall:.1f}"),
        ("median round (s)", _fmt(sorted(timings)[len(timings) // 2] if timings else None, 3)),
        ("outputs", str(out)),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
