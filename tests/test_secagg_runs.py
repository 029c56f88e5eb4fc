"""Secure aggregation (--secure-aggregation) in real runs: a real coordinator process, real `fedfleet worker`
processes, and, where a worker has to misbehave or die at an exact step of the protocol, workers run in this
process as threads with the real worker code (``fedfleet.worker.agent.WorkerProcess``) and one method
patched. What each test checks:

- workers that die after uploading their masked update (no reveal, no more heartbeats) still count: their
  neighbours' shares unmask them;
- too few reveals fail the attempt with a message saying how many revealed and how many were needed, and
  the round runs again, with fresh workers, and completes;
- a wrong revealed share is named (its sender in the record's ``bad_shares``) and left out;
- nothing the coordinator receives or stores holds one worker's trained weights or delta, and what it
  receives of an update is uniform in the ring;
- a coordinator SIGKILLed in the middle of a round's protocol resumes and sets that round up again;
- join tokens and TLS together with secure aggregation;
- the option combinations that need updates in the clear are refused at the command line.

The protocol's maths against references is in tests/test_secagg_core.py and through the engine in
tests/test_secagg_engine.py.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedfleet.worker.agent as agent_module
from conftest import Coordinator, Fleet, Worker, run_fedfleet
from fedfleet.protocol.messages import SecAggUnmaskInstruction
from fedfleet.secagg import ring
from fedfleet.secagg.client import ClientRound
from fedfleet.worker.agent import Agent, WorkerProcess
from tcp_proxy import CutProxy

# A dead worker is noticed after --worker-timeout seconds without contact (live ones are heard from about
# every half second); the whole run, its linger included, must fit in RUN_TIMEOUT.
FAST = ("--worker-timeout", "3", "--round-timeout", "20", "--wait-timeout", "60", "--linger", "1")
SONGS = ("--task", "songs", "--secure-aggregation")
RUN_TIMEOUT = 90.0


# --- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture
def inproc(fleet: Fleet) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``inproc(url, clients, name, **kwargs)`` runs a WorkerProcess (``fedfleet worker``'s own code)
    in a thread of this process; every one is stopped at teardown."""
    started: list[tuple[WorkerProcess, threading.Thread]] = []

    def start(url: str, clients: int, name: str, **kwargs: Any) -> WorkerProcess:
        proc = WorkerProcess(url, clients, fleet.directory / f"inproc-{name}", name=name,
                             **{"give_up": 60.0, **kwargs})
        thread = threading.Thread(target=proc.run, name=f"inproc-{name}", daemon=True)
        thread.start()
        started.append((proc, thread))
        return proc

    yield start
    for proc, _ in started:
        proc.stop.set()
    for _, thread in started:
        thread.join(timeout=15)


def die_after_uploading(monkeypatch: pytest.MonkeyPatch, round_: int = 1) -> list[WorkerProcess]:
    """Patch the agent so that the in-process workers put in the returned list die when asked to reveal their
    shares in round ``round_``: their masked update is in, and they go silent (no reveal, no heartbeat)."""
    dying: list[WorkerProcess] = []
    real = Agent._secagg_step

    def step(self: Agent, client: Any, reg: Any, trainer: Any, msg: Any) -> Any:
        if any(self.proc is p for p in dying) and isinstance(msg, SecAggUnmaskInstruction) and msg.round == round_:
            self.proc.stop.set()  # the whole process goes: its agents and its heartbeat thread
            return "accepted"
        return real(self, client, reg, trainer, msg)

    monkeypatch.setattr(Agent, "_secagg_step", step)
    return dying


def wait_for_log(coord: Coordinator, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match[str]:
    """The first match of ``pattern`` in the coordinator's log after character ``start``; fails after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        found = re.search(pattern, coord.log_text()[start:])
        if found is not None:
            return found
        if coord.proc.poll() is not None or time.monotonic() > end:
            pytest.fail(f"no {pattern!r} in the coordinator's log:\n{coord.log_text()[start:][-3000:]}")
        time.sleep(0.05)


def finished(coord: Coordinator, workers: tuple[Worker, ...] = (),
             timeout: float = RUN_TIMEOUT) -> list[dict[str, Any]]:
    """Wait for the run to end; check that it finished and its worker processes exited cleanly; its records."""
    try:
        rc = coord.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not end within {timeout:g} s:\n{coord.log_text()[-3000:]}")
    assert rc == 0, coord.log_text()[-3000:]
    summary = json.loads((coord.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished", summary
    for w in workers:
        assert w.proc.wait(timeout=30) == 0, w.log_text()[-2000:]
    return [json.loads(line) for line in (coord.data_dir / "metrics.jsonl").read_text().splitlines() if line]


def log_events(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f" {event} " in line]


# --- dropouts -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_workers_that_die_after_uploading_still_count(monkeypatch: pytest.MonkeyPatch, fleet: Fleet,
                                                      inproc: Callable[..., WorkerProcess]) -> None:
    """10 workers; 3 die in round 1 after uploading their masked update. The 7 others reveal their shares of
    all 10 self-mask seeds (6 of 10 holders needed for each), so all 10 updates are unmasked and count."""
    dying = die_after_uploading(monkeypatch)
    coord = fleet.coordinator(*SONGS, "--workers", "10", "--rounds", "2", *FAST)
    real = fleet.worker(coord.url, clients=7)
    dying.append(inproc(coord.url, 3, "dying"))
    records = finished(coord, (real,))
    first, second = records
    assert first["round"] == 1 and first["attempts"] == 1 and first["participants"] == 10
    s = first["secagg"]
    assert (s["sampled"], s["keys"], s["dealt"], s["uploaded"], s["revealed"]) == (10, 10, 10, 10, 7), s
    assert s["dropped_unmasked"] == 0 and s["bad_shares"] == [] and s["needed"] == 6
    # Round 2 samples the 7 that are left.
    assert second["participants"] == 7 and second["secagg"]["revealed"] == 7
    assert math.isfinite(second["accuracy"]) and 0.3 < second["accuracy"] < 1
    assert not log_events(coord.log_text(), "secagg.failed")


@pytest.mark.slow
def test_too_few_reveals_fail_the_attempt_and_the_round_runs_again(monkeypatch: pytest.MonkeyPatch, fleet: Fleet,
                                                                    inproc: Callable[..., WorkerProcess]) -> None:
    """5 workers, threshold 0.6: 3 of the 5 shares of a seed are needed. 3 die after uploading in round 1, so
    only 2 reveal: the attempt fails, saying so; 3 fresh workers take the dead ones' partitions and the
    round's next attempt completes, with fresh keys."""
    dying = die_after_uploading(monkeypatch)
    coord = fleet.coordinator(*SONGS, "--workers", "5", "--rounds", "2", "--secagg-threshold", "0.6", *FAST)
    real = fleet.worker(coord.url, clients=2)
    dying.append(inproc(coord.url, 3, "dying"))
    failed = wait_for_log(coord, r"secagg\.failed .*")
    assert "round=1 attempt=0" in failed[0]
    assert "round 1 could not be unmasked: 2 of the 5 workers that uploaded revealed their shares" in failed[0]
    assert re.search(r"self-mask seed has 2 valid shares of the 3 needed", failed[0]), failed[0]
    fresh = fleet.worker(coord.url, clients=3)
    records = finished(coord, (real, fresh))
    assert [r["round"] for r in records] == [1, 2]
    first = records[0]
    assert first["attempts"] >= 2 and first["participants"] == 5
    assert first["secagg"]["uploaded"] == 5 and first["secagg"]["revealed"] == 5
    setups = [line for line in log_events(coord.log_text(), "secagg.setup") if " round=1 " in line]
    assert len(setups) >= 2 and "attempt=0" in setups[0] and "attempt=0" not in setups[-1]


# --- a wrong share -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_wrong_revealed_share_is_named_and_left_out(monkeypatch: pytest.MonkeyPatch, fleet: Fleet,
                                                      inproc: Callable[..., WorkerProcess]) -> None:
    """One worker flips a byte of one self-mask share it reveals in round 1: the coordinator checks it against
    its dealer's commitment, names the sender and unmasks with the other (enough) valid shares."""
    liars: list[str] = []
    real_reveal = ClientRound.reveal

    def reveal(self: ClientRound, survivors: Any, dropped: Any) -> tuple[dict[str, bytes], dict[str, bytes]]:
        self_masks, mask_keys = real_reveal(self, survivors, dropped)
        if self.labels.round == 1:
            victim = next(d for d in sorted(self_masks) if d != self.worker_id)
            share = bytearray(self_masks[victim])
            share[len(share) // 2] ^= 0x01
            self_masks = {**self_masks, victim: bytes(share)}
            liars.append(self.worker_id)
        return self_masks, mask_keys

    monkeypatch.setattr(ClientRound, "reveal", reveal)  # only the in-process worker uses this module's copy
    coord = fleet.coordinator(*SONGS, "--workers", "5", "--rounds", "2", *FAST)
    honest = fleet.worker(coord.url, clients=4)
    inproc(coord.url, 1, "liar")
    records = finished(coord, (honest,))
    assert len(liars) == 1
    first, second = records
    s = first["secagg"]
    assert first["attempts"] == 1 and first["participants"] == 5 and s["revealed"] == 5
    assert len(s["bad_shares"]) == 1 and s["bad_shares"][0].startswith(f"worker {liars[0]} sent a self-mask share"), \
        s["bad_shares"]
    assert second["secagg"]["bad_shares"] == []
    bad = log_events(coord.log_text(), "secagg.bad_share")
    assert len(bad) == 1 and liars[0] in bad[0] and "round=1" in bad[0]
    assert not log_events(coord.log_text(), "secagg.failed")
    # The model is still right: a wrong share that got in would leave a mask on it (noise over all of Z/2^64).
    for r in records:
        assert math.isfinite(r["accuracy"]) and 0.4 < r["accuracy"] < 1 and math.isfinite(r["loss"])


# --- what the coordinator sees -----------------------------------------------------------------------------
@dataclass
class Masked:
    """One worker's update of one round as it trained it, and as it went up masked."""

    worker: str
    round: int
    weights: dict[str, np.ndarray]  # its trained weights (float32)
    base: dict[str, np.ndarray]  # the global model it trained from
    masked: dict[str, np.ndarray]  # the uint64 tensors it uploaded
    encoding: tuple[float, float, int]  # (scale, clip, num_examples) it was encoded with


def record_masking(monkeypatch: pytest.MonkeyPatch) -> list[Masked]:
    """Wrap the agent's ``masked_update`` to keep, for each in-process worker and round, what went in and out."""
    seen: list[Masked] = []
    lock = threading.Lock()
    real = agent_module.masked_update

    def masked_update(session: ClientRound, weights: Any, base: Any, neighbours: Any, scale: float, clip: float,
                      num_examples: int, *rest: Any, **kwargs: Any) -> Any:
        result = real(session, weights, base, neighbours, scale, clip, num_examples, *rest, **kwargs)
        out = result[0]
        with lock:
            seen.append(Masked(session.worker_id, session.labels.round,
                               {k: np.array(v, copy=True) for k, v in weights.items()},
                               {k: np.array(v, copy=True) for k, v in base.items()},
                               {k: np.array(v, copy=True) for k, v in out.items()}, (scale, clip, num_examples)))
        return result

    monkeypatch.setattr(agent_module, "masked_update", masked_update)
    return seen


def plaintext_windows(m: Masked) -> dict[str, set[bytes]]:
    """16-byte windows of the worker's trained float32 weights and of its float32 and float64 delta, over
    coordinates that all differ from the global model's (the others are the global model's own bytes)."""
    out: dict[str, set[bytes]] = {"weights": set(), "delta32": set(), "delta64": set()}
    for name, w in m.weights.items():
        w = np.asarray(w, dtype=np.float32).reshape(-1)
        b = np.asarray(m.base[name], dtype=np.float32).reshape(-1)
        changed = w != b
        d32 = w - b
        d64 = w.astype(np.float64) - b.astype(np.float64)
        for i in range(w.size):
            if changed[i:i + 4].size == 4 and changed[i:i + 4].all():
                out["weights"].add(w[i:i + 4].tobytes())
                out["delta32"].add(d32[i:i + 4].tobytes())
            if changed[i:i + 2].size == 2 and changed[i:i + 2].all():
                out["delta64"].add(d64[i:i + 2].tobytes())
    return out


def chi_square_256(values: np.ndarray) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(np.sum((counts - expected) ** 2 / expected))


def chi_square_critical_255() -> float:
    """The chi-square statistic with 255 degrees of freedom that a uniform sample exceeds with probability 1e-4."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return 347.654
    return float(chi2.isf(1e-4, 255))


@pytest.mark.slow
def test_nothing_the_coordinator_receives_or_stores_holds_an_update(monkeypatch: pytest.MonkeyPatch, fleet: Fleet,
                                                                    inproc: Callable[..., WorkerProcess]) -> None:
    """4 workers, 2 rounds of songs, every byte they send recorded on the way. Neither the recorded requests
    nor any file the coordinator keeps (state database, checkpoints, uploads, logs, records) holds a 16-byte
    window of one worker's trained weights or of its delta, while the masked tensors it uploaded are there."""
    seen = record_masking(monkeypatch)
    coord = fleet.coordinator(*SONGS, "--workers", "4", "--rounds", "2", *FAST)
    port = int(coord.url.rsplit(":", 1)[1])
    proxy = CutProxy(port, record=True)
    try:
        inproc(proxy.url, 4, "recorded")
        records = finished(coord)
    finally:
        proxy.close()
    assert [r["participants"] for r in records] == [4, 4]
    assert len(seen) == 8 and len({m.worker for m in seen}) == 4 and len({(m.round, m.worker) for m in seen}) == 8
    requests = b"\n--connection--\n".join(proxy.sent())
    files = {p: p.read_bytes() for p in sorted(coord.data_dir.rglob("*")) if p.is_file()}
    files[coord.log_path] = coord.log_path.read_bytes()
    assert any(p.name.startswith("state.sqlite") for p in files) and any("checkpoints" in p.parts for p in files)
    haystacks = {"requests to the coordinator": requests, **{str(p): data for p, data in files.items()}}
    stored = b"".join(files.values())
    for m in seen:
        # The search finds what is there: the global model round 2 trained from is round 1's checkpoint.
        assert m.round == 1 or all(b.tobytes() in stored for b in m.base.values())
        # The recording works: each masked tensor went up as it is, its bytes whole in the requests.
        for name, tensor in m.masked.items():
            assert tensor.dtype == np.uint64 and tensor.shape == m.base[name].shape
            assert tensor.tobytes() in requests, f"{m.worker} round {m.round}: masked {name} not in the requests"
        windows = plaintext_windows(m)
        assert len(windows["weights"]) >= 40 and len(windows["delta64"]) >= 40, {k: len(v) for k, v in windows.items()}
        for what, wins in windows.items():
            for where, data in haystacks.items():
                leaked = [w for w in wins if w in data]
                assert not leaked, f"{m.worker}'s round {m.round} {what} is in {where}"
    # Uniform in the ring. The songs model is small (78 values a worker and round), too few for 256 buckets
    # per vector; pooled, every byte of the 8 masked vectors is 4992 samples (about 20 a bucket). The next
    # test checks each vector on its own, on a model of 20000 values.
    pooled = np.concatenate([t.reshape(-1) for m in seen for t in m.masked.values()]).view(np.uint8)
    assert chi_square_256(pooled) < chi_square_critical_255()


@pytest.mark.slow
def test_masked_uploads_are_uniform_even_when_every_update_is_the_same(monkeypatch: pytest.MonkeyPatch,
                                                                       fleet: Fleet,
                                                                       inproc: Callable[..., WorkerProcess]) -> None:
    """The null task with 20000 parameters, whose update (w + 1) is the same for every worker: each masked
    vector's low bytes pass a chi-square test of uniformity (p = 1e-4), and the same test rejects the
    encoded update without its masks (so it can tell)."""
    seen = record_masking(monkeypatch)
    coord = fleet.coordinator("--task", "null", "--task-option", "params=20000", "--workers", "3", "--rounds", "1",
                              "--secure-aggregation", *FAST)
    inproc(coord.url, 3, "uniform")
    records = finished(coord)
    assert records[0]["participants"] == 3 and len(seen) == 3
    critical = chi_square_critical_255()
    for m in seen:
        flat = m.masked["w"].reshape(-1)
        assert flat.size == 20000
        assert chi_square_256(flat & np.uint64(0xFF)) < critical, m.worker
        assert chi_square_256(flat >> np.uint64(56)) < critical, m.worker
    # Without its masks, the encoded update is one value repeated: the same test rejects it.
    delta = m.weights["w"].astype(np.float64) - m.base["w"].astype(np.float64)
    encoded, _ = ring.encode(delta, m.encoding[1], m.encoding[0], m.encoding[2])
    assert chi_square_256(encoded & np.uint64(0xFF)) > critical


# --- a coordinator crash ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_coordinator_killed_mid_protocol_sets_the_round_up_again(monkeypatch: pytest.MonkeyPatch, fleet: Fleet,
                                                                   inproc: Callable[..., WorkerProcess]) -> None:
    """4 workers, 4 rounds. One in-process worker holds back its reveal in round 2, so the coordinator sits in
    round 2's unmask phase; it is SIGKILLed there and started again on the same data dir. The workers find
    it again by themselves; it runs round 2 again from its keys (new keys from every worker) and finishes."""
    held, release = threading.Event(), threading.Event()
    keys: list[tuple[int, int, bytes]] = []  # (round, attempt, public keys) the in-process worker made
    real_step, real_keys = Agent._secagg_step, ClientRound.keys

    def step(self: Agent, client: Any, reg: Any, trainer: Any, msg: Any) -> Any:
        if isinstance(msg, SecAggUnmaskInstruction) and msg.round == 2 and not release.is_set():
            held.set()
            release.wait(60)
        return real_step(self, client, reg, trainer, msg)

    def make_keys(self: ClientRound) -> tuple[bytes, bytes, bytes]:
        out = real_keys(self)
        keys.append((self.labels.round, self.labels.attempt, out[0] + out[1]))
        return out

    monkeypatch.setattr(Agent, "_secagg_step", step)
    monkeypatch.setattr(ClientRound, "keys", make_keys)
    # A long --worker-timeout: the workers' retries must find the new life before it counts them dead.
    args = (*SONGS, "--workers", "4", "--rounds", "4", "--worker-timeout", "10", "--round-timeout", "30",
            "--linger", "1", "--port", str(free_port()))
    coord = fleet.coordinator(*args)
    real = fleet.worker(coord.url, clients=3)
    inproc(coord.url, 1, "holder", give_up=120.0)
    assert held.wait(60), coord.log_text()[-3000:]
    wait_for_log(coord, r"secagg\.setup .*round=2 attempt=0", timeout=5)
    time.sleep(0.3)  # the three others reveal; the round waits for the fourth (for up to --round-timeout)
    coord.kill()
    coord.proc.wait(timeout=30)
    rounds_at_kill = (coord.data_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in rounds_at_kill] == [1], "the kill was not in round 2"
    assert "round.closed run" not in coord.log_text().split("round=2 attempt=0")[-1]
    before = len(coord.log_text())
    again = fleet.coordinator(*args, data_dir=coord.data_dir)
    release.set()  # its reveal goes to the new life, which refuses it: that attempt is gone
    records = finished(again, (real,))
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(r["participants"] == 4 and r["secagg"]["revealed"] == 4 for r in records), records
    later = again.log_text()[before:]
    assert log_events(later, "run.resumed") and " round=1 " in log_events(later, "run.resumed")[0]
    assert [line for line in log_events(later, "secagg.setup") if " round=2 " in line]
    assert not [line for line in log_events(later, "secagg.setup") if " round=1 " in line]
    # Fresh keys: the in-process worker made new ones for round 2 in the new life.
    round2 = [k for r, _, k in keys if r == 2]
    assert len(round2) >= 2 and len(set(round2)) == len(round2)
    assert len({k for _, _, k in keys}) == len(keys)


# --- tokens and TLS -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_with_join_tokens_and_tls(fleet: Fleet) -> None:
    """A coordinator behind TLS that takes only workers with the join token: the secure-aggregation phases go
    through the same authenticated https endpoints, and 3 workers that trust its CA finish 2 rounds."""
    certs = fleet.directory / "certs"
    r = run_fedfleet("certs", "--out", str(certs), "--host", "127.0.0.1", "--host", "localhost")
    assert r.returncode == 0, r.stderr
    join = fleet.directory / "join.token"
    join.write_text("join-" + "s" * 40 + "\n")
    join.chmod(0o600)
    coord = fleet.coordinator(*SONGS, "--workers", "3", "--rounds", "2", *FAST, "--join-token-file", str(join),
                              "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem"))
    assert coord.url.startswith("https://")
    w = fleet.worker(coord.url, "--ca", str(certs / "ca.pem"), "--join-token-file", str(join), clients=3)
    records = finished(coord, (w,))
    assert [(r["participants"], r["secagg"]["revealed"]) for r in records] == [(3, 3), (3, 3)]


# --- refusals at the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "words"), [
    (("--secure-aggregation", "--strategy", "median"), "'median' cannot be used with --secure-aggregation"),
    (("--secure-aggregation", "--strategy", "krum"), "'krum' cannot be used with --secure-aggregation"),
    (("--secure-aggregation", "--strategy", "trimmed_mean"), "'trimmed_mean' cannot be used with --secure-aggregation"),
    (("--secure-aggregation", "--max-update-norm", "5"), "'max_update_norm' option cannot be used with"),
    (("--secure-aggregation", "--dp", "central", "--dp-clip", "1", "--dp-noise-multiplier", "1"),
     "--dp central cannot be used with --secure-aggregation"),
    (("--secure-aggregation", "--workers", "2"), "needs at least 3 workers sampled"),
    (("--secure-aggregation", "--workers", "4", "--fraction", "0.5"), "needs at least 3 workers sampled"),
    (("--secure-aggregation", "--task", "tabular", "--task-option", "label=x"),
     "task 'tabular' cannot be trained with --secure-aggregation"),
    (("--secagg-clip", "5"), "'secagg_clip' option applies only with --secure-aggregation"),
    (("--secagg-threshold", "0.7"), "'secagg_threshold' option applies only with --secure-aggregation"),
])
def test_combinations_that_need_updates_in_the_clear_are_refused(tmp_path: Path, args: tuple[str, ...],
                                                                  words: str) -> None:
    r = run_fedfleet("coordinator", "--data-dir", str(tmp_path / "data"), "--port", "0", *args, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert words in r.stderr, r.stderr
    assert not (tmp_path / "data" / "state.sqlite").exists()
