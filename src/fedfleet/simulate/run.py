"""``fedfleet simulate``: a run whose clients are trained by a pool of executors, with no sockets.

For studies with many clients (``--workers 10000 --fraction 0.001``): the round engine, strategies,
tasks, partitions and run folder are those of ``fedfleet run``, so ``fedfleet report``, ``fedfleet serve``
and ``--resume`` work on it alike, and the same seed gives the same model. What differs is who trains:
not a process per worker but ``--executors`` processes (``--backend local``) or Ray actors (``--backend
ray``, ``--ray-address`` for a cluster), each taking sampled clients one at a time. A client's state is
made when it is sampled and dropped after, so memory does not grow with the number of clients.

Refused: secure aggregation (its clients would share a process with the coordinator it hides updates
from) and runs on each site's own files (``--data-split``: a site is a process of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Collection
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine, data_source
from fedfleet.coordinator.server import SIGNAL_NAMES
from fedfleet.errors import ConfigError
from fedfleet.runner import check_out, make_out, print_summary, read_summary, resume_config
from fedfleet.simulate.executors import Backend, open_executors
from fedfleet.simulate.fleet import Fleet
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import Task, check_ready, load_task, score_name, torch_common
from fedfleet.tasks.base import has_plan

LOG_FILE = "simulate.log"


def check_simulated(config: RunConfig, task: Task) -> None:
    """Refuse, naming the option, what a simulation cannot be faithful to."""
    if config.secure_aggregation == "on":
        raise ConfigError("fedfleet simulate does not run --secure-aggregation: its clients share a process with "
                          "the coordinator the masks hide their updates from; use fedfleet run",
                          option="secure_aggregation")
    if data_source(config, task) == "sites" or has_plan(task):
        raise ConfigError(f"task {config.task!r} trains on each site's own files, and a simulation runs on "
                          "partitions of a task's data set; use fedfleet run --data-split", option="task")


def default_executors(config: RunConfig, cpus: int) -> int:
    """One executor per CPU, but no more than a round samples (at least one).

    >>> default_executors(RunConfig(task="null", workers=10000, fraction=0.001), cpus=8)
    8
    >>> default_executors(RunConfig(task="null", workers=10, fraction=0.2), cpus=8)
    2
    """
    sampled = max(config.min_workers or 1, round(config.fraction * config.workers + 0.4999))
    return max(1, min(cpus, sampled, config.workers))


def simulate(config: RunConfig, out: Path, *, backend: Backend = "local", executors: int | None = None,
             ray_address: str | None = None, overwrite: bool = False, resume: bool = False,
             given: Collection[str] = (), quiet: bool = False) -> int:
    """Run ``config`` with simulated clients; returns 0 if it finished, 1 if it failed, 128 + the signal's
    number if SIGINT or SIGTERM stopped it (resumable with ``resume``)."""
    check_out(out, overwrite, resume)
    if resume:
        config = resume_config(out, config, given)
    task = load_task(config.task, config.task_options_dict)
    check_ready(task)
    check_simulated(config, task)
    make_out(out, overwrite)
    cpus = torch_common.usable_cpus()
    count = executors or default_executors(config, cpus)
    handler = logging.FileHandler(out / "logs" / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("fedfleet")
    level = logger.level
    quiet_handlers = [h for h in logger.handlers if h.level == logging.NOTSET]
    for h in quiet_handlers:  # the terminal keeps the level asked for; the log file gets INFO
        h.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    console = Console(quiet=quiet)
    t0 = time.monotonic()
    try:
        stopped_by = asyncio.run(_simulate(config, task, out, backend, count, ray_address, cpus, console))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for h in quiet_handlers:
            h.setLevel(logging.NOTSET)
        handler.close()
    summary = read_summary(RunDir(out))
    if summary is None:
        console.print(f"[red]the simulation ended without a summary[/red]: see {out / 'logs' / LOG_FILE}")
        return 1
    if stopped_by is not None:
        Console().print(f"fedfleet: stopped by {SIGNAL_NAMES.get(stopped_by, stopped_by.name)} after round "
                        f"{summary.rounds} of {summary.rounds_planned}; carry it on with: "
                        f"{escape(f'fedfleet simulate --out {out} --resume')}", soft_wrap=True)
        return 128 + stopped_by.value
    print_summary(console, summary, out, time.monotonic() - t0)
    if summary.state == "finished":
        return 0
    console.print(f"[red]run {summary.state}:[/red] {escape(summary.message)}")
    return 1


async def _simulate(config: RunConfig, task: Task, out: Path, backend: Backend, count: int,
                    ray_address: str | None, cpus: int, console: Console) -> signal.Signals | None:
    # The coordinator's evaluation runs between rounds, while the executors wait: every core for it.
    torch_common.use_threads(cpus)
    engine = Engine.open(config, task, out, linger=0.0)
    pool = None
    stopped_by: list[signal.Signals] = []
    try:
        residents = engine.add_residents(config.workers, "sim")
        pool = await asyncio.to_thread(open_executors, backend, config.task, config.task_options_dict, count,
                                       ray_address)
        fleet = Fleet(engine, pool, residents)
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if not stopped_by:
                stopped_by.append(sig)
                engine.stop(f"stopped by {SIGNAL_NAMES.get(sig, sig.name)}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or Windows
                loop.add_signal_handler(sig, on_signal, sig)
        rounds = asyncio.create_task(engine.run())
        driver = asyncio.create_task(fleet.drive())
        await _show_progress(engine, config, console, count, backend)
        # A stop (Ctrl-C) cancels the round loop: its CancelledError is the way it ends, not an error here.
        ended = await asyncio.gather(rounds, driver, return_exceptions=True)
        for result in ended:
            if isinstance(result, Exception):
                raise result
        return stopped_by[0] if stopped_by else None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(sig)
        if pool is not None:
            await asyncio.to_thread(pool.close)
        engine.close()


async def _show_progress(engine: Engine, config: RunConfig, console: Console, executors: int,
                         backend: Backend) -> None:
    score = score_name(engine.task)
    console.print(f"fedfleet: simulating {config.task} on {config.workers} clients with {executors} {backend} "
                  f"executor{'s' if executors > 1 else ''}, {config.rounds} rounds, partition {config.partition}")
    columns = (TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
               TextColumn(f"{score} {{task.fields[acc]}}  loss {{task.fields[loss]}}  {{task.fields[phase]}}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=console.quiet) as progress:
        bar = progress.add_task("run", total=config.rounds, acc="-", loss="-", phase="starting")
        while not engine.done.is_set():
            s = engine.snapshot()
            progress.update(bar, completed=s.round, phase=s.phase,
                            acc="-" if s.accuracy is None else f"{s.accuracy:.4f}",
                            loss="-" if s.loss is None else f"{s.loss:.4f}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.done.wait(), 0.25)
        s = engine.snapshot()
        progress.update(bar, completed=s.round, phase=s.state,
                        acc="-" if s.accuracy is None else f"{s.accuracy:.4f}",
                        loss="-" if s.loss is None else f"{s.loss:.4f}")
