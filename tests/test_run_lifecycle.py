"""Starting, stopping and starting again (issue 13, items 1-5), with real processes.

- Ctrl-C (SIGINT) of ``fedfleet run`` stops its coordinator and workers, writes a "stopped" summary and
  prints the command that resumes the run; ``--resume`` then finishes it with every round recorded once.
- SIGTERM stops the whole process tree too, and SIGKILL of the runner takes its children with it.
- A stale ``coordinator.json`` never makes a new run hang; a folder still served is refused.
- An existing run folder without ``--resume`` or ``--overwrite`` is one line naming both; nothing written.
- A coordinator stopped by a signal exits 128 + the signal, its run resumable, its address file gone.
- state.sqlite alone (without -wal and -shm) holds every round once a run has ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADDRESS_FILE, Fleet, run_fedfleet, stop_process
from fedfleet.config import RunConfig
from fedfleet.coordinator.engine import Engine
from fedfleet.storage.run_dir import RunDir
from fedfleet.tasks import load_task

# Fast songs rounds (well under a second each on two cores), enough of them that a signal sent after
# the second one always lands while the run is still going.
SONGS = ("--task", "songs", "--workers", "2", "--rounds", "60", "--round-timeout", "5")
STOP_WITHIN = 30.0  # seconds a stopped run has to end completely (the runner's own grace is 15 s)


def start_run(out: Path, *args: str) -> subprocess.Popen[str]:
    """``fedfleet run ARGS --out OUT`` in a session of its own, output captured; the caller stops it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FEDFLEET_LOG_LEVEL", None)
    return subprocess.Popen([sys.executable, "-m", "fedfleet", "run", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


@pytest.fixture
def runs() -> Iterator[list[subprocess.Popen[str]]]:
    """Runner processes a test starts; whatever is left of them (and their groups) is stopped after it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        stop_process(proc)  # type: ignore[arg-type]  # text or bytes, it is the same process


def recorded(out: Path) -> int:
    try:
        return len(out.joinpath("metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_rounds(proc: subprocess.Popen[str], out: Path, rounds: int, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while recorded(out) < rounds:
        assert proc.poll() is None, f"the run ended early:\n{proc.communicate()[0]}"
        assert time.monotonic() < end, f"no {rounds} rounds within {timeout:g} s"
        time.sleep(0.05)


def start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, which tells it apart from a later one with its pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def tree(pid: int) -> dict[int, str]:
    """``pid`` and every process below it, each with its start time."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        started = start_time(p)
        if started is not None:
            found[p] = started
            todo.extend(children.get(p, []))
    return found


def alive(processes: dict[int, str]) -> list[int]:
    return [pid for pid, started in processes.items() if start_time(pid) == started]


def wait_gone(processes: dict[int, str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < end:
        time.sleep(0.05)
    assert alive(processes) == [], f"still running {timeout:g} s after the stop: {alive(processes)}"


def summary(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return data


def rounds_in_state(path: Path) -> list[int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r for (r,) in db.execute("SELECT round FROM rounds ORDER BY round")]
    finally:
        db.close()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's size and modification time; the -shm of state.sqlite by size only, since reading a
    database in WAL mode (to see whether its run ended) updates the shared-memory index in it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, 0 if p.name.endswith("-shm") else p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- fedfleet run: Ctrl-C, SIGTERM, SIGKILL -------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_ctrl_c_stops_the_run_and_resume_finishes_it_with_every_round_once(
        tmp_path: Path, runs: list[subprocess.Popen[str]]) -> None:
    out = tmp_path / "run"
    proc = start_run(out, *SONGS)
    runs.append(proc)
    wait_rounds(proc, out, 2)
    processes = tree(proc.pid)
    assert len(processes) >= 4, processes  # the runner, its coordinator and two worker processes
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the runner
    text = proc.communicate(timeout=STOP_WITHIN)[0]
    assert proc.returncode == 130, text
    wait_gone(processes, 5.0)

    s = summary(out)
    assert s["state"] == "stopped" and "SIGINT" in s["message"], s
    done = s["rounds"]
    assert 2 <= done < 60 and recorded(out) == done
    assert "stopped by SIGINT (Ctrl-C): the coordinator and 2 worker processes ended." in text
    assert f"Last completed round: {done} of 60, test accuracy {s['final_accuracy']:.4f}." in text
    assert f"fedfleet run --out {out} --resume" in text
    assert (out / "model.safetensors").is_file()
    assert not (out / ADDRESS_FILE).exists()
    assert rounds_in_state(out / "state.sqlite") == list(range(1, done + 1))

    # A stale address file (a coordinator long gone, a port nobody serves) must not fool the new run.
    (out / ADDRESS_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": dead_pid()}))
    again = run_fedfleet("run", "--out", str(out), "--resume", "--quiet", timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    s = summary(out)
    assert s["state"] == "finished" and s["rounds"] == 60, s
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 61))
    assert rounds_in_state(out / "state.sqlite") == list(range(1, 61))
    assert not (out / ADDRESS_FILE).exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_sigterm_stops_the_whole_tree_and_prints_the_resume_command(
        tmp_path: Path, runs: list[subprocess.Popen[str]]) -> None:
    out = tmp_path / "run"
    proc = start_run(out, *SONGS, "--quiet")
    runs.append(proc)
    wait_rounds(proc, out, 1)
    processes = tree(proc.pid)
    assert len(processes) >= 4, processes
    proc.terminate()
    text = proc.communicate(timeout=STOP_WITHIN)[0]
    assert proc.returncode == 143, text
    wait_gone(processes, 5.0)
    assert "stopped by SIGTERM" in text and f"fedfleet run --out {out} --resume" in text
    s = summary(out)
    assert s["state"] == "stopped" and s["rounds"] == recorded(out) >= 1, s
    # Stopped, the run is resumable: the state database does not say it ended.
    db = sqlite3.connect(f"file:{out / 'state.sqlite'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT state FROM run").fetchone()[0] not in ("finished", "failed")
    finally:
        db.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_runner_takes_its_coordinator_and_workers_with_it(
        tmp_path: Path, runs: list[subprocess.Popen[str]]) -> None:
    out = tmp_path / "run"
    proc = start_run(out, *SONGS, "--quiet")
    runs.append(proc)
    wait_rounds(proc, out, 1)
    processes = tree(proc.pid)
    assert len(processes) >= 4, processes
    proc.kill()  # no chance to pass anything on: the children must notice by themselves
    proc.wait(timeout=10)
    wait_gone(processes, 20.0)
    # The coordinator got SIGTERM from the kernel and stopped the run as it does for a signal of its own.
    assert summary(out)["state"] == "stopped"
    assert not (out / ADDRESS_FILE).exists()


# --- run folders: stale address files, existing runs --------------------------------------------------

def test_a_stale_address_file_does_not_hang_a_new_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / ADDRESS_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "host": "127.0.0.1", "port": 9,
                                                "pid": dead_pid(), "run_id": "gone"}))
    r = run_fedfleet("run", "--task", "null", "--workers", "2", "--rounds", "2", "--round-timeout", "5",
                     "--out", str(out), "--quiet", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary(out)["state"] == "finished"
    assert not (out / ADDRESS_FILE).exists()


def test_a_folder_a_coordinator_still_serves_is_refused(tmp_path: Path, fleet: Fleet) -> None:
    coord = fleet.coordinator("--task", "null", "--workers", "2", "--rounds", "2")
    before = set(files(coord.data_dir))
    r = run_fedfleet("run", "--task", "null", "--workers", "2", "--rounds", "2", "--out", str(coord.data_dir),
                     "--resume", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"coordinator process {coord.proc.pid} still serves it" in r.stderr
    assert set(files(coord.data_dir)) == before
    assert json.loads((coord.data_dir / ADDRESS_FILE).read_text())["pid"] == coord.proc.pid  # left alone


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-round null run (module-scoped: several tests only read it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = run_fedfleet("run", "--task", "null", "--workers", "2", "--rounds", "2", "--round-timeout", "5",
                     "--out", str(out), "--quiet", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.parametrize("extra", [(), ("--task", "null", "--rounds", "5")])
def test_an_existing_run_without_resume_or_overwrite_is_one_line_naming_both(
        finished_run: Path, extra: tuple[str, ...]) -> None:
    before = files(finished_run)
    r = run_fedfleet("run", *extra, "--out", str(finished_run), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "already holds a run (finished after 2 of 2 rounds)" in lines[0]
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert files(finished_run) == before  # nothing written, not even logs


@pytest.mark.parametrize(("args", "words"), [
    (("--resume",), "has finished, so there is nothing to carry on"),
    (("--resume", "--overwrite"), "--resume and --overwrite contradict each other"),
])
def test_resume_refuses_what_it_cannot_do(finished_run: Path, args: tuple[str, ...], words: str) -> None:
    before = files(finished_run)
    r = run_fedfleet("run", "--out", str(finished_run), *args, timeout=60)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert files(finished_run) == before


def test_resume_refuses_a_flag_that_contradicts_the_saved_config_and_names_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    RunDir(out).start(RunConfig.from_mapping({"task": "null", "rounds": 4, "workers": 2}))
    before = files(out)
    r = run_fedfleet("run", "--out", str(out), "--resume", "--rounds", "9", timeout=60)
    assert r.returncode == 2
    assert "--rounds 9 contradicts the run in" in r.stderr and "whose 'rounds' is 4" in r.stderr, r.stderr
    assert files(out) == before
    nothing = run_fedfleet("run", "--out", str(tmp_path / "none"), "--resume", timeout=60)
    assert nothing.returncode == 2 and "holds no run to resume" in nothing.stderr, nothing.stderr
    assert not (tmp_path / "none").exists()


def test_state_sqlite_alone_holds_every_round_of_a_finished_run(finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "state.sqlite"
    shutil.copyfile(finished_run / "state.sqlite", copy)  # without its -wal and -shm
    assert rounds_in_state(copy) == [1, 2]


# --- the coordinator on its own --------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_coordinator_ends_the_run_stopped_and_removes_its_address_file(
        fleet: Fleet, sig: signal.Signals) -> None:
    coord = fleet.coordinator("--task", "null", "--workers", "2", "--rounds", "3")
    assert json.loads((coord.data_dir / ADDRESS_FILE).read_text())["pid"] == coord.proc.pid
    coord.proc.send_signal(sig)
    assert coord.proc.wait(timeout=30) == 128 + sig.value, coord.log_text()[-2000:]
    s = summary(coord.data_dir)
    assert s["state"] == "stopped" and s["rounds"] == 0 and sig.name in s["message"], s
    assert (coord.data_dir / "model.safetensors").is_file()
    assert not (coord.data_dir / ADDRESS_FILE).exists()
    assert rounds_in_state(coord.data_dir / "state.sqlite") == []
    # Stopped is resumable: the same coordinator command on the same data dir picks the run up again.
    again = fleet.coordinator("--task", "null", "--workers", "2", "--rounds", "3", data_dir=coord.data_dir)
    assert json.loads((again.data_dir / ADDRESS_FILE).read_text())["run_id"] == s["run_id"]


def test_engine_stop_is_resumable_and_only_once(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"task": "null", "task_options": {"params": "8"}, "workers": 2, "rounds": 2})

    async def stop_while_waiting() -> tuple[bool, bool, str]:
        engine = Engine.open(config, load_task("null", {"params": "8"}), tmp_path / "run", linger=0.0)
        loop = asyncio.create_task(engine.run())
        await asyncio.sleep(0.05)  # the loop waits for workers that never come
        first = engine.stop("stopped by a test")
        second = engine.stop("stopped again")
        with pytest.raises(asyncio.CancelledError):
            await loop
        state = engine.snapshot().state
        engine.close()
        return first, second, state

    assert asyncio.run(stop_while_waiting()) == (True, False, "stopped")
    s = RunDir(tmp_path / "run").read_summary()
    assert s is not None and s.state == "stopped" and s.message.startswith("stopped by a test after round 0")
    # The state database keeps the run open: opening it again resumes it instead of refusing.
    again = Engine.open(config, load_task("null", {"params": "8"}), tmp_path / "run", linger=0.0)
    assert again.run_id == s.run_id
    again.close()
