"""``fedfleet run``: a coordinator and N workers as real OS processes on this machine.

The coordinator is started as its own process on a free loopback port, the workers are spread over
a few processes (``--processes``, by default one per CPU the run may use: ``default_processes``; each is
told its torch threads, ``torch_threads``), and this process only watches ``/v1/status`` to draw
progress, exactly as a person with a browser could. Logs of every process go to OUT/logs/.

Stopping: Ctrl-C (SIGINT) or SIGTERM to this process is passed on to the coordinator and every worker
process; they get ``STOP_GRACE`` seconds to end (the coordinator ends the run as "stopped", writing
its summary and model), then whatever is left is killed. What was stopped, the last completed round
and the command that resumes the run are printed, and the exit status is 128 + the signal's number
(130 for SIGINT, 143 for SIGTERM). Should this process die without a word (SIGKILL), its children
follow it (``fedfleet.parent``).

An existing run folder is never reused silently: ``--resume`` carries its run on with the config saved
in it (flags that contradict that config are refused), ``--overwrite`` deletes it and starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedfleet.config import OPTIONS_BY_NAME, RunConfig
from fedfleet.coordinator.engine import check_data_source
from fedfleet.coordinator.security import new_token
from fedfleet.coordinator.server import ADDRESS_FILE, SIGNAL_NAMES
from fedfleet.errors import ConfigError, FedfleetError, StorageError, TaskError
from fedfleet.parent import PARENT_ENV
from fedfleet.partition import parse_partition
from fedfleet.protocol.messages import API, Status
from fedfleet.storage.files import write_text_atomic
from fedfleet.storage.records import RunSummary
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import BUILTIN, find_task, load_task, score_name
from fedfleet.tasks.torch_common import THREADS_ENV, usable_cpus

START_TIMEOUT = 120.0
STOP_GRACE = 15.0  # seconds the processes have to end after a Ctrl-C or SIGTERM before they are killed
# Seconds between two looks at /v1/status while a run goes. At 0.2 s, fedfleet run itself took 0.3-0.5 CPU
# seconds a round of the MNIST CNN (benchmarks/mnist_cost.py), about 1% of the work, on the cores the workers
# train on, and the coordinator answered each look; a person watching the bar does not see the difference.
STATUS_POLL = 0.5


def default_processes(workers: int, cpus: int | None = None) -> int:
    """Worker processes for ``workers`` logical workers: one per CPU the run may use (``cpus``, by default
    ``usable_cpus()``: this process's CPU affinity, capped by a cgroup CPU quota), never more than the workers.

    A process's logical workers train side by side in threads (torch releases the GIL), so one process per
    core keeps every core busy; each process more holds its own interpreter, libraries and copy of the
    data (about 0.3 GB with torch) and buys no speed.

    >>> default_processes(10, cpus=2), default_processes(3, cpus=8), default_processes(100, cpus=16)
    (2, 3, 16)
    """
    return max(1, min(workers, usable_cpus() if cpus is None else cpus))


def spread(workers: int, processes: int) -> list[int]:
    """How many logical workers each process hosts: as even as possible, none empty."""
    processes = max(1, min(processes, workers))
    base, extra = divmod(workers, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


def torch_threads(counts: Sequence[int], cpus: int) -> list[int]:
    """Torch intra-op threads for each worker process, hosting ``counts[i]`` logical workers, on ``cpus`` CPUs:
    the process's even share of the cores, split among its logical workers (they train at the same time), at
    least one. So P processes on C cores never run many more than C threads of torch work at once.

    >>> torch_threads([5, 5], cpus=2), torch_threads([1, 1, 1], cpus=8), torch_threads([1] * 4, cpus=2)
    ([1, 1], [3, 3, 2], [1, 1, 1, 1])
    """
    if not counts or len(counts) >= cpus:
        return [1] * len(counts)
    return [max(1, share // k) for share, k in zip(spread(cpus, len(counts)), counts, strict=True)]


class _Interrupted(BaseException):
    """SIGINT or SIGTERM reached ``fedfleet run``: unwinds to the code that stops its processes."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(sig.name)
        self.sig = sig


class Processes:
    """The coordinator and worker processes of one run.

    Each is started in a session of its own, so that a terminal's Ctrl-C reaches only this process,
    which stops them itself (the coordinator gets the chance to record the stop); each also learns
    this process's pid (``fedfleet.parent``) and ends if this process dies.
    """

    def __init__(self, join_token: str) -> None:
        self.join_token = join_token
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopped_by: signal.Signals | None = None
        self._stopping = False  # once a stop is under way, a signal hurries it instead of starting another

    def spawn(self, args: list[str], log_path: Path, extra_env: Mapping[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        # The token goes by environment, not argv: other users can read a process's argv, not its environment.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDFLEET_JOIN_TOKEN": self.join_token,
               PARENT_ENV: str(os.getpid()), **(extra_env or {})}
        fh: IO[bytes] = log_path.open("ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "fedfleet", *args], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            fh.close()
        self.procs.append(proc)
        return proc

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """While inside, SIGINT and SIGTERM raise ``_Interrupted`` (once; asked again, kill at once)."""
        if sys.platform == "win32" or not _main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            self._stopping = True
            self.stopped_by = signal.Signals(signum)
            raise _Interrupted(self.stopped_by)
        self.send(signal.SIGKILL)  # asked again while stopping: no more waiting

    def send(self, sig: signal.Signals) -> None:
        """``sig`` to each process still running, and to what it started (its process group)."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)

    def wait(self, timeout: float) -> bool:
        """Wait until every process has ended, at most ``timeout`` s; True if they all did."""
        end = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, grace: float, sig: signal.Signals | None = signal.SIGTERM) -> None:
        """Send ``sig`` (None: nothing, they are ending by themselves), wait up to ``grace`` s, then kill."""
        self._stopping = True
        if sig is not None:
            self.send(sig)
        if not self.wait(grace):
            self.send(signal.SIGTERM)
            if not self.wait(5.0):
                self.send(signal.SIGKILL)
                self.wait(10.0)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def check_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Check ``out`` against --overwrite and --resume; writes nothing (a stale address file aside)."""
    if overwrite and resume:
        raise ConfigError("--resume and --overwrite contradict each other: --resume carries on the run in "
                          f"{out}, --overwrite deletes it; pass one", option="resume")
    run_dir = RunDir(out)
    exists = run_dir.config_path.exists() or run_dir.state_path.exists()
    if out.is_dir():
        _check_not_served(out)
    if exists and not (overwrite or resume):
        raise ConfigError(f"{out} already holds a run ({_describe(run_dir)}): pass --resume to carry it on, "
                          "or --overwrite to delete it and start over (or choose another --out)", option="out")
    if resume:
        if not exists:
            raise ConfigError(f"--resume: {out} holds no run to resume (it has no {run_dir.config_path.name}); "
                              "leave --resume out to start a new run there", option="resume")
        ended = _ended(run_dir)
        if ended is not None:
            raise ConfigError(f"--resume: the run in {out} has {ended}, so there is nothing to carry on; pass "
                              "--overwrite to start over, or choose another --out", option="resume")


def make_out(out: Path, overwrite: bool) -> None:
    run_dir = RunDir(out)
    if overwrite and (run_dir.config_path.exists() or run_dir.state_path.exists()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)


def _describe(run_dir: RunDir) -> str:
    try:
        summary = run_dir.read_summary()
    except StorageError:
        summary = None
    if summary is not None:
        return f"{summary.state} after {summary.rounds} of {summary.rounds_planned} rounds"
    return "never ended: stopped by a crash or a kill"


def _ended(run_dir: RunDir) -> str | None:
    """"finished" or "failed" if state.sqlite, the truth, says the run is over; None if it can go on."""
    try:
        store = run_dir.read_store()
    except StorageError:
        return None
    if store is None:
        return None
    try:
        row = store.run()
    except StorageError:
        return None
    finally:
        store.close()
    return row.state if row is not None and row.state in ("finished", "failed") else None


def _check_not_served(out: Path) -> None:
    """Refuse ``out`` while a coordinator still serves it; a stale address file (its process gone) is
    removed, so that nobody can mistake it for the new coordinator's."""
    path = out / ADDRESS_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        info = None
    pid = info.get("pid") if isinstance(info, dict) else None
    if isinstance(pid, int) and _is_coordinator(pid):
        raise ConfigError(f"{out} is in use: coordinator process {pid} still serves it at {info.get('url')}; "
                          f"stop it (kill {pid}) or choose another --out", option="out")
    path.unlink(missing_ok=True)


def _is_coordinator(pid: int) -> bool:
    """Whether ``pid`` is a live fedfleet coordinator (the pid of a dead one may belong to anything now)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a coordinator of ours
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc on this system: alive is all we can tell
    except OSError:
        return False
    return b"coordinator" in argv and any(b"fedfleet" in a for a in argv)


def resume_config(out: Path, config: RunConfig, given: Collection[str]) -> RunConfig:
    """The config saved in ``out``, for ``--resume``; an option given on the command line (``given``:
    names from flags or --config) must agree with it, or a ConfigError names the first that does not."""
    saved = RunDir(out).read_config()
    for name in sorted(given):
        if getattr(saved, name) != getattr(config, name):
            opt = OPTIONS_BY_NAME.get(name)
            flag = opt.flag if opt is not None else "--" + name.removesuffix("s").replace("_", "-")
            raise ConfigError(
                f"--resume: {flag} {_shown(getattr(config, name))} contradicts the run in {out}, whose '{name}' "
                f"is {_shown(getattr(saved, name))}; leave {flag} out to resume that run as it was configured, "
                "or pass --overwrite to start a new one", option=name)
    return saved


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{k}={v}" for k, v in value) or "(none)"
    return str(value)


def _wait_address(out: Path, coord: subprocess.Popen[bytes]) -> str:
    """The URL the coordinator we started serves at, from the address file it writes; a file that names
    another process (left by an earlier coordinator) is never taken."""
    path = out / ADDRESS_FILE
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if coord.poll() is not None:
            raise FedfleetError(f"the coordinator exited with status {coord.returncode} before serving:\n"
                                + _tail(out / "logs" / "coordinator.log"))
        try:
            info = json.loads(path.read_text())
            if info["pid"] == coord.pid:
                return str(info["url"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.05)
    raise FedfleetError(f"the coordinator did not start within {START_TIMEOUT:g} s; see {out}/logs/coordinator.log")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_local(config: RunConfig, out: Path, processes: int | None = None, overwrite: bool = False,
              quiet: bool = False, resume: bool = False, given: Collection[str] = (),
              data_split: Path | None = None) -> int:
    """Run a whole federated job on this machine; returns 0 if it finished, 1 if it failed, 128 + the
    signal's number if SIGINT or SIGTERM stopped it. With ``resume`` the run in ``out`` is carried on
    with its saved config (``given`` names the options the user set, which must agree with it).

    With ``data_split`` the file is split into one file per worker in ``OUT/sites`` and each worker is
    its own process started with ``--data`` on its file: the path a real deployment's sites take."""
    check_out(out, overwrite, resume)
    if resume:
        config = resume_config(out, config, given)
        if data_split is None and RunDir(out).sites_path.is_dir():
            data_split = RunDir(out).sites_path  # the sites' files were split when the run started
    if config.data_source == "sites" or config.test_data is not None:
        check_data_source(config, load_task(config.task, config.task_options_dict))
    if data_split is not None:
        config = _site_config(config)
    elif _sites_run(config):
        raise ConfigError(f"a run of task {config.task!r} trains on each site's own files: give fedfleet run "
                          "--data-split FILE (one file cut into a file per worker, each worker on its own), or start "
                          "a coordinator and a fedfleet worker --data PATH per site", option="data_split")
    make_out(out, overwrite)
    run_dir = RunDir(out)
    sites = _site_files(config, data_split, run_dir, resume) if data_split is not None else None
    before = read_summary(run_dir)  # a resumed run's summary stays until the run ends again
    console = Console(stderr=False, quiet=quiet)
    request = out / ".run-config.toml"
    write_text_atomic(request, config.to_toml())
    # Even on loopback, other local users can reach the port: only our workers may join.
    procs = Processes(new_token())
    t0 = time.monotonic()
    interrupted: signal.Signals | None = None
    with procs.signals():
        try:
            coord = procs.spawn(["--log-level", "INFO", "coordinator", "--config", str(request), "--data-dir",
                                 str(out), "--host", "127.0.0.1", "--port", "0", "--linger", "5"],
                                out / "logs" / "coordinator.log")
            url = _wait_address(out, coord)
            allow = [] if config.task in BUILTIN else ["--allow-task", config.task]  # the user named it: theirs
            cpus = usable_cpus()
            if sites is not None:
                counts = [1] * len(sites)  # one process per site: each holds its own file, as a real site would
            else:
                counts = spread(config.workers, processes or default_processes(config.workers, cpus))
            workers: list[tuple[subprocess.Popen[bytes], Path]] = []
            for i, (k, threads) in enumerate(zip(counts, torch_threads(counts, cpus), strict=True)):
                data = ["--data", str(sites[i])] if sites is not None else []
                log_path = out / "logs" / f"worker-{i}.log"
                workers.append((procs.spawn(["--log-level", "INFO", "worker", "--coordinator", url, "--clients", str(k),
                                             "--state-dir", str(out / "workers" / f"proc-{i}"), "--name", f"local-{i}",
                                             "--give-up", "30", *data, *allow], log_path,
                                            {THREADS_ENV: str(threads)}), log_path))
            console.print(f"fedfleet: {'resuming ' if resume else ''}{config.task} on {config.workers} workers in "
                          f"{len(counts)} processes, {config.rounds} rounds, partition {config.partition}; "
                          f"coordinator {url}")
            _watch(url, config, coord, console, run_dir, workers)
            procs.stop(grace=10.0, sig=None)
        except _Interrupted as exc:
            interrupted = exc.sig
            # The coordinator ends the run as "stopped" (summary, model) on the same signal; workers stop.
            procs.stop(grace=STOP_GRACE, sig=exc.sig)
        except BaseException:
            procs.stop(grace=3.0)
            raise
        finally:
            request.unlink(missing_ok=True)
    summary = read_summary(run_dir)
    if summary == before:
        summary = None  # the coordinator wrote none this time
    if interrupted is not None and (summary is None or summary.state == "stopped"):
        # Said even with --quiet: a stopped run is not what the user asked for, and how to resume it matters.
        _print_stopped(Console(), interrupted, summary, run_dir, len(procs.procs), processes,
                       score_name(find_task(config.task)))
        return 128 + interrupted.value
    if summary is None:
        console.print(f"[red]the coordinator ended without a summary[/red]:\n{_tail(out / 'logs' / 'coordinator.log')}")
        return 1
    print_summary(console, summary, out, time.monotonic() - t0)
    # The summary, not the last status polled, is the word on how the run ended: the coordinator
    # may finish and exit between two polls.
    if summary.state == "finished":
        return 0
    console.print(f"[red]run {summary.state}:[/red] {escape(summary.message)}")
    if summary.state == "stopped":
        console.print(f"resume it with: {escape(resume_command(run_dir.path, processes))}", soft_wrap=True)
    return 1


def _sites_run(config: RunConfig) -> bool:
    """Whether the run's workers must bring their own data (``--data-source``, else the task's default)."""
    if config.data_source is not None:
        return config.data_source == "sites"
    default = getattr(find_task(config.task), "data_at_sites", False)
    if isinstance(default, bool):
        return default
    # A property: the task decides from its options (a TorchTask without a shared data set).
    return bool(getattr(load_task(config.task, config.task_options_dict), "data_at_sites", False))


def _site_config(config: RunConfig) -> RunConfig:
    """The config of a run on split files: its workers bring their own data."""
    if config.data_source == "partitions":
        raise ConfigError("--data-split starts every worker with its own file (--data), which a run with "
                          "--data-source partitions refuses: leave --data-source out", option="data_source")
    return dataclasses.replace(config, data_source="sites")


def _site_files(config: RunConfig, source: Path, run_dir: RunDir, resume: bool) -> list[Path]:
    """One file per worker in OUT/sites, split from ``source`` by the task (its ``split_data``); on resume,
    the files split when the run started."""
    if resume and source == run_dir.sites_path:
        files = sorted(p for p in source.iterdir() if p.is_file())
        if len(files) != config.workers:
            raise ConfigError(f"{source} holds {len(files)} site files, not one per worker ({config.workers}); "
                              "start a new run", option="data_split")
        return files
    if not source.is_file():
        raise ConfigError(f"--data-split {source}: no such file", option="data_split")
    task = load_task(config.task, config.task_options_dict)
    split_data = getattr(task, "split_data", None)
    if not callable(split_data):
        raise ConfigError(f"task {config.task!r} cannot split a file into sites' files (it has no split_data); "
                          "--data-split is for tasks such as tabular", option="data_split")
    try:
        spec = parse_partition(config.partition)
    except ValueError as exc:
        raise ConfigError(f"The 'partition' option {exc}", option="partition") from exc
    written: list[Path] = split_data(source, run_dir.sites_path, config.workers, spec, config.seed)
    return written


def read_summary(run_dir: RunDir) -> RunSummary | None:
    try:
        return run_dir.read_summary()
    except StorageError:
        return None


def resume_command(out: Path, processes: int | None = None) -> str:
    """The command line that carries on the run in ``out`` (its config comes from the folder)."""
    extra = ["--processes", str(processes)] if processes else []
    return shlex.join(["fedfleet", "run", "--out", str(out), *extra, "--resume"])


def _print_stopped(console: Console, sig: signal.Signals, summary: RunSummary | None, run_dir: RunDir,
                   started: int, processes: int | None, score: str) -> None:
    workers = started - 1
    what = ("nothing had started yet" if started == 0 else "the coordinator ended (no worker had started)"
            if workers == 0 else f"the coordinator and {workers} worker process{'es' if workers > 1 else ''} ended")
    console.print(f"fedfleet: stopped by {SIGNAL_NAMES.get(sig, sig.name)}: {what}.", soft_wrap=True)
    planned: int | str
    if summary is not None:
        last, planned, accuracy = summary.rounds, summary.rounds_planned, summary.final_accuracy
    else:  # the coordinator did not get to write its summary: the records say how far it got
        try:
            records = run_dir.read_rounds()
        except StorageError:
            records = []
        last = records[-1].round if records else 0
        accuracy = records[-1].accuracy if records else None
        planned = _planned(run_dir)
    if last:
        console.print(f"Last completed round: {last} of {planned}, test {score} {_fmt(accuracy)}.", soft_wrap=True)
    else:
        console.print("No round was completed.")
    if run_dir.config_path.exists():
        console.print("The run can be resumed from there with:", soft_wrap=True)
        console.print(f"  {escape(resume_command(run_dir.path, processes))}", soft_wrap=True)


def _planned(run_dir: RunDir) -> int | str:
    try:
        return run_dir.read_config().rounds
    except StorageError:
        return "?"


def _watch(url: str, config: RunConfig, coord: subprocess.Popen[bytes], console: Console, run_dir: RunDir,
           workers: Sequence[tuple[subprocess.Popen[bytes], Path]] = ()) -> None:
    """Draw a progress bar from /v1/status until the run is over or the coordinator is gone. If every worker
    process ends first (none could join, or their data could not be read), say why instead of waiting out
    --wait-timeout: the first failure a worker logged."""
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
                time.sleep(STATUS_POLL)
                continue
            progress.update(bar, completed=status.round, phase=status.phase,
                            acc="-" if status.accuracy is None else f"{status.accuracy:.4f}",
                            loss="-" if status.loss is None else f"{status.loss:.4f}")
            if status.state in ("finished", "failed", "stopped"):
                break
            if workers and all(w.poll() is not None for w, _ in workers) and coord.poll() is None:
                raise TaskError("every worker process ended before the run did; "
                                + (_worker_failure([path for _, path in workers]) or "see their logs in "
                                   f"{run_dir.path / 'logs'}"))
            failed = [path for w, path in workers if w.poll() not in (None, 0)]
            if failed and status.round == 0 and config.min_workers is None and status.state == "waiting":
                # The first round waits for every worker, and a local worker that failed does not come back
                # (its data could not be read, say): waiting out --wait-timeout would only delay the news.
                raise TaskError(f"a worker process failed before the first round, which needs all "
                                f"{config.workers}: " + (_worker_failure(failed) or f"see {failed[0]}"))
            time.sleep(STATUS_POLL)
        # The coordinator may end between two polls: the last word is its summary.
        coord.wait(timeout=60)
        final = read_summary(run_dir)
        if final is not None:
            progress.update(bar, completed=final.rounds, phase=final.state,
                            acc=_fmt(final.final_accuracy), loss=_fmt(final.final_loss))


def _worker_failure(logs: Sequence[Path]) -> str | None:
    """The message of the first ``worker.failed`` line in the workers' logs, if one failed."""
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if " worker.failed " in line and "message=" in line:
                return "the first said: " + line.split("message=", 1)[1].strip("'\"")
    return None


def print_summary(console: Console, s: RunSummary, out: Path, wall: float) -> None:
    timings = [r.seconds for r in s.round_timings]
    table = Table(title=f"fedfleet run {s.run_id}: {s.state}", show_header=False)
    rows = [
        ("task", s.task), ("partition", s.partition), ("workers", s.workers),
        ("rounds", f"{s.rounds} of {s.rounds_planned}"),
        *([(f"final {score_name(find_task(s.task))}", _fmt(s.final_accuracy)), ("final loss", _fmt(s.final_loss))]
          if s.evaluation == "test" else
          # No held-out set (a sites run without --test-data): the workers' own validation splits are the score.
          [(f"final {score_name(find_task(s.task))} (federated evaluation)", _fmt(s.final_fed_accuracy))]),
        *([("data", "each site's own files")] if s.data_source == "sites" else []),
        ("seconds (coordinator)", _fmt(s.seconds, 1)), ("seconds (wall)", f"{wall:.1f}"),
        ("median round (s)", _fmt(sorted(timings)[len(timings) // 2] if timings else None, 3)),
        ("outputs", str(out)),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
