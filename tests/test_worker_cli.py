"""`fedfleet worker` as a user starts it: several in one directory, default names, a coordinator not there."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Coordinator, Fleet, run_fedfleet, stop_process
from fedfleet.worker.agent import Waiting
from fedfleet.worker.statedir import LOCK_FILE, claim


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and nothing else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def spawn_worker(cwd: Path, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``fedfleet worker ARGS`` started in ``cwd`` as a user would: no --state-dir, no --name."""
    with log_path.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedfleet", "worker", *args], cwd=cwd, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def test_three_workers_in_one_directory_take_a_slot_each(fleet: Fleet, tmp_path: Path) -> None:
    coord: Coordinator = fleet.coordinator("--workers", "3", "--min-workers", "3", "--rounds", "3")
    host = tmp_path / "host"
    host.mkdir()
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [spawn_worker(host, log, "--coordinator", coord.url) for log in logs]
    try:
        assert coord.proc.wait(timeout=180) == 0, coord.log_text()[-3000:]
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            stop_process(p)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], "\n".join(texts)

    rounds = [json.loads(line) for line in (coord.data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["participants"] for r in rounds] == [3, 3, 3], rounds
    assert "duplicate" not in coord.log_text()

    # One process per slot: the folder itself, then 1 and 2 inside it, each with its own id.
    state = host / ".fedfleet-worker"
    slots = [state, state / "1", state / "2"]
    ids = {json.loads((s / "client-0.json").read_text())["worker_id"] for s in slots}
    assert len(ids) == 3
    assert not (state / "3").exists()
    # The two that found a slot taken said which they took instead.
    taken = [t for t in texts if "worker.state_dir" in t]
    assert len(taken) == 2, texts
    assert all("pid" in t and "--state-dir" in t for t in taken)

    # The coordinator saw three partitions and three names HOST-PID/0, the pids those of the processes.
    registered = re.findall(r"worker\.registered .*?partition=(\d+) name=(\S+)", coord.log_text())
    assert sorted(p for p, _ in registered) == ["0", "1", "2"]
    assert {n for _, n in registered} == {f"{socket.gethostname()}-{p.pid}/0" for p in procs}
    # The workers spell the partition as the coordinator does.
    assert sorted(m for t in texts for m in re.findall(r"worker\.registered .*?partition=(\S+)", t)) == ["0", "1", "2"]


def test_state_dir_slots_are_locked_and_given_back(tmp_path: Path) -> None:
    first = claim(tmp_path / "state")
    second = claim(tmp_path / "state")  # a second open file: flock refuses it even in this process
    assert (first.number, first.path) == (0, tmp_path / "state")
    assert (second.number, second.path) == (1, tmp_path / "state" / "1")
    assert second.passed == (f"{first.path} (held by pid {os.getpid()})",)
    assert (first.path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    first.release()
    again = claim(tmp_path / "state")  # a restarted worker gets the slot, and so the ids, it had
    assert again.number == 0
    again.release()
    second.release()


def test_worker_beside_a_running_one_says_which_folder_it_took(tmp_path: Path, closed_port: int) -> None:
    held = claim(tmp_path / ".fedfleet-worker")  # stands for a worker process already running here
    try:
        r = run_fedfleet("worker", "--coordinator", f"http://127.0.0.1:{closed_port}", "--give-up", "1",
                         cwd=tmp_path, timeout=60)
    finally:
        held.release()
    assert r.returncode == 1
    line = next(x for x in r.stderr.splitlines() if "worker.state_dir" in x)
    assert "path=.fedfleet-worker/1" in line and "slot=1" in line and "--state-dir" in line


def test_unwritable_state_dir_is_one_line_naming_the_option(tmp_path: Path, closed_port: int) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_fedfleet("worker", "--coordinator", f"http://127.0.0.1:{closed_port}",
                     "--state-dir", str(blocker / "state"), timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("fedfleet: error: cannot write the worker state dir")
    assert "--state-dir" in r.stderr and "Traceback" not in r.stderr


def test_worker_without_its_coordinator_says_so_once_then_gives_up(tmp_path: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    r = run_fedfleet("worker", "--coordinator", url, "--clients", "2", "--give-up", "4", cwd=tmp_path, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    # Two logical workers retrying, one line: what for, where, and when it gives up.
    waiting = [x for x in lines if "worker.waiting" in x]
    assert len(waiting) == 1, r.stderr
    assert f"coordinator={url}" in waiting[0] and "waiting_for=register" in waiting[0]
    assert "gives_up_in=" in waiting[0] and "next_line_in=30s" in waiting[0]
    # Sparse: nothing else until it gives up (the next line would be 30 s later).
    assert not [x for x in lines if "WARNING" in x and "worker.waiting" not in x], r.stderr
    assert "worker=None" not in r.stderr
    failed = [x for x in lines if "worker.failed" in x]
    assert len(failed) == 2  # one per logical worker, each named
    assert all(f"gave up reaching the coordinator: no answer from {url} for 4 s" in x for x in failed)
    assert all("--give-up" in x and re.search(r"name=\S+-\d+/[01] ", x) for x in failed)


def test_waiting_lines_come_every_30_seconds(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    waiting = Waiting("http://coordinator:8080", give_up=300.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="fedfleet"):
        for t in range(101, 200):  # a failed retry every second for 99 s
            now[0] = float(t)
            waiting.failed("register", OSError("refused"), since=100.0)
        now[0] = 200.5
        waiting.answered()
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split()[0] for m in messages] == ["worker.waiting", "worker.still_waiting", "worker.still_waiting",
                                                 "worker.still_waiting", "worker.reconnected"]
    assert "gives_up_in=299s" in messages[0]
    assert "waited=31s gives_up_in=269s" in messages[1] and "waited=91s gives_up_in=209s" in messages[3]
    assert "after=100.5s" in messages[4]


def test_a_short_blip_is_not_worth_a_line(caplog: pytest.LogCaptureFixture) -> None:
    now = [10.0]
    waiting = Waiting("http://coordinator:8080", give_up=300.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="fedfleet"):
        now[0] = 10.5
        waiting.failed("next instruction", OSError("reset"), since=10.0)
        waiting.answered()
    assert caplog.records == []


def test_version() -> None:
    from importlib.metadata import version

    r = run_fedfleet("--version", timeout=60)
    assert r.returncode == 0
    assert r.stdout.strip() == f"fedfleet {version('fedfleet')}"
