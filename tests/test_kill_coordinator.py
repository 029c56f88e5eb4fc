"""The coordinator is SIGKILLed again and again during a run and restarted on the same data dir; its
workers are never restarted and find it again by themselves. The run must finish with every round
recorded once, every accepted update counted once, and the same final model as a run nobody touched.

Two runs, real processes:

- ``songs`` (real learning): kills after seeded random delays; the final model must equal, byte for
  byte, the one of an undisturbed ``fedfleet run`` with the same seed. Quorum 1.0 makes every round
  use every partition, and the engine's float64 running sums make the model independent of the order
  in which updates arrive, so a resumed round gives exactly the update it would have given anyway.
- ``null`` with a 16 MB model, so that aggregating and writing a checkpoint take long enough to be
  hit: kills while ``/v1/status`` says ``aggregating``, while a checkpoint's temp file is being
  written, and while the round is training. Each round adds exactly 1 to every weight, so the final
  model is exactly ``rounds``: a round lost or applied twice would show.

The kills survived are printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy

from conftest import Fleet, Worker

pytestmark = pytest.mark.slow

WORKERS = 3
# Quorum 1.0 and long timeouts: a round waits for every partition however long a restart takes,
# so that no round closes short of a worker and the model equals the undisturbed one.
TIMEOUTS = ("--quorum", "1.0", "--worker-timeout", "30", "--round-timeout", "120", "--wait-timeout", "120")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(client: httpx.Client) -> dict[str, Any] | None:
    try:
        r = client.get("/v1/status")
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None


def run_state(data_dir: Path) -> str:
    db = sqlite3.connect(f"file:{data_dir / 'state.sqlite'}?mode=ro", uri=True)
    try:
        return str(db.execute("SELECT state FROM run").fetchone()[0])
    finally:
        db.close()


class Chaos:
    """Kills and restarts one run's coordinator; counts the kills and where they landed."""

    def __init__(self, fleet: Fleet, args: tuple[str, ...], rounds: int) -> None:
        self.fleet = fleet
        self.args = (*args, "--port", str(free_port()))  # restarts listen where the workers knock
        self.rounds = rounds
        self.coord = fleet.coordinator(*self.args)
        self.data_dir = self.coord.data_dir
        self.client = httpx.Client(base_url=self.coord.url, timeout=5.0)
        self.kills: list[str] = []

    def close(self) -> None:
        self.client.close()

    def watch(self, hit: Callable[[dict[str, Any]], str | None], budget: float, interval: float = 0.002) -> str | None:
        """Poll until ``hit(status)`` names what it caught (then SIGKILL at once) or ``budget`` s passed.

        Never kills once the run is in its last round: a run that finished while its workers were
        not yet told would leave them knocking on a door that will not open again."""
        end = time.monotonic() + budget
        while time.monotonic() < end:
            s = status(self.client)
            if s is not None:
                if s["state"] in ("finished", "failed") or s["round"] >= self.rounds - 1:
                    return None
                what = hit(s)
                if what is not None:
                    self.kill(what)
                    return what
            time.sleep(interval)
        return None

    def kill(self, what: str) -> None:
        self.coord.kill()
        self.coord.proc.wait(timeout=30)
        self.kills.append(what)

    def restart(self) -> None:
        self.coord = self.fleet.coordinator(*self.args, data_dir=self.data_dir)

    def finish(self, workers: list[Worker]) -> dict[str, Any]:
        assert self.coord.proc.wait(timeout=180) == 0, self.coord.log_text()[-3000:]
        summary: dict[str, Any] = json.loads((self.data_dir / "summary.json").read_text())
        for w in workers:  # the same worker processes, never restarted
            assert w.proc.wait(timeout=60) == 0, w.log_text()[-2000:]
        return summary


def check_state(data_dir: Path, rounds: int) -> None:
    """Every round recorded once with every worker; every accepted update counted once."""
    db = sqlite3.connect(f"file:{data_dir / 'state.sqlite'}?mode=ro", uri=True)
    try:
        recorded = db.execute("SELECT round, attempts, participants FROM rounds ORDER BY round").fetchall()
        assert [r[0] for r in recorded] == list(range(1, rounds + 1))
        assert all(p == WORKERS for _, _, p in recorded), recorded
        for rnd, attempts, participants in recorded:
            used = db.execute("SELECT worker_id FROM updates WHERE round = ? AND attempt = ?",
                              (rnd, attempts - 1)).fetchall()
            assert len(used) == len(set(used)) == participants, (rnd, used)
        dup = db.execute("SELECT round, worker_id, COUNT(*) FROM updates "
                         "GROUP BY round, worker_id HAVING COUNT(*) > 1").fetchall()
        assert dup == [], f"updates recorded twice for one (round, worker): {dup}"
        served = db.execute("SELECT rounds_served FROM workers").fetchall()
        assert sorted(s for (s,) in served) == [rounds] * WORKERS, served
    finally:
        db.close()
    lines = [json.loads(x) for x in (data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, rounds + 1))


SONGS_ROUNDS = 20
SONGS_SEED = 7
SONGS_KILLS = 5


def after(target: int, delay: float) -> Callable[[dict[str, Any]], str | None]:
    """Hits ``delay`` seconds after round ``target`` (or a later one) is seen under way."""
    seen: list[float] = []

    def hit(s: dict[str, Any]) -> str | None:
        if s["round"] + 1 < target or s["phase"].startswith(("waiting", "starting")):
            return None
        seen.append(seen[0] if seen else time.monotonic())
        return f"round {s['round'] + 1}, {s['phase']}" if time.monotonic() - seen[0] >= delay else None

    return hit


def test_songs_run_survives_random_kills_and_matches_an_undisturbed_run(fleet: Fleet, tmp_path: Path) -> None:
    options = ("--task", "songs", "--workers", str(WORKERS), "--rounds", str(SONGS_ROUNDS),
               "--seed", str(SONGS_SEED), *TIMEOUTS)
    ref = tmp_path / "undisturbed"
    r = subprocess.run([sys.executable, "-m", "fedfleet", "run", *options, "--out", str(ref), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = safetensors.numpy.load_file(ref / "model.safetensors")

    chaos = Chaos(fleet, options, SONGS_ROUNDS)
    workers = [fleet.worker(chaos.coord.url, "--give-up", "120") for _ in range(WORKERS)]
    # Seeded kill points: a round to reach, then a delay of up to about one round (0.1 s on loopback).
    rng = random.Random(SONGS_SEED)
    points = [(t, rng.uniform(0.0, 0.15)) for t in sorted(rng.sample(range(1, SONGS_ROUNDS - 2), SONGS_KILLS))]
    try:
        for target, delay in points:
            if chaos.watch(after(target, delay), budget=60, interval=0.005) is None:
                break
            chaos.restart()
        summary = chaos.finish(workers)
    finally:
        chaos.close()

    print(f"\nsongs: {len(chaos.kills)} SIGKILLs survived: {chaos.kills}")
    assert len(chaos.kills) >= 3, chaos.kills
    assert summary["state"] == "finished" and summary["rounds"] == SONGS_ROUNDS, summary
    check_state(chaos.data_dir, SONGS_ROUNDS)
    got = safetensors.numpy.load_file(chaos.data_dir / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].tobytes() == expected[name].tobytes(), (name, np.abs(got[name] - expected[name]).max())
    accuracy = [json.loads(x)["accuracy"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert summary["final_accuracy"] == accuracy[-1]


NULL_ROUNDS = 14
NULL_PARAMS = 4_000_000  # 16 MB of float32: aggregation and checkpoint writes take a while


def test_kills_while_aggregating_and_checkpointing_lose_and_double_nothing(fleet: Fleet) -> None:
    chaos = Chaos(fleet, ("--task", "null", "--task-option", f"params={NULL_PARAMS}", "--workers", str(WORKERS),
                          "--rounds", str(NULL_ROUNDS), *TIMEOUTS), NULL_ROUNDS)
    workers = [fleet.worker(chaos.coord.url, "--give-up", "120") for _ in range(WORKERS)]
    checkpoints = chaos.data_dir / "checkpoints"

    def in_phase(phase: str, target: int) -> Callable[[dict[str, Any]], str | None]:
        return lambda s: f"round {s['round'] + 1}, {phase}" if s["phase"] == phase and s["round"] + 1 >= target \
            else None

    def writing_checkpoint(target: int) -> Callable[[dict[str, Any]], str | None]:
        return lambda s: checkpoint_tmp(s) if s["round"] + 1 >= target else None

    def checkpoint_tmp(s: dict[str, Any]) -> str | None:
        # write_atomic's temp file exists from the first byte written until the rename.
        with contextlib.suppress(OSError):
            for p in checkpoints.iterdir():
                if p.name.endswith(".tmp") and p.stat().st_size > 0:
                    return f"round {s['round'] + 1}, checkpointing ({p.stat().st_size} of {4 * NULL_PARAMS} bytes)"
        return None

    targets = [in_phase("aggregating", 2), writing_checkpoint(4), in_phase("training", 6), writing_checkpoint(8),
               in_phase("aggregating", 10)]
    missed = 0
    try:
        for hit in targets:
            if chaos.watch(hit, budget=20) is None:
                missed += 1
                continue
            chaos.restart()
        summary = chaos.finish(workers)
    finally:
        chaos.close()

    print(f"\nnull ({4 * NULL_PARAMS / 1e6:g} MB model): {len(chaos.kills)} SIGKILLs survived: {chaos.kills}"
          f"; {missed} targets not caught in time")
    assert len(chaos.kills) >= 3, chaos.kills
    assert summary["state"] == "finished" and summary["rounds"] == NULL_ROUNDS, summary
    check_state(chaos.data_dir, NULL_ROUNDS)
    # A kill mid-write leaves a temp file; the next life's checkpoints clear it away.
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")) == []
    model = safetensors.numpy.load_file(chaos.data_dir / "model.safetensors")["w"]
    # Each round's update is the model plus 1: the model after the last round is exactly that many.
    assert np.array_equal(model, np.full(NULL_PARAMS, NULL_ROUNDS, dtype=np.float32))
