"""Network faults between hosts, for real: the coordinator and its workers run in two Linux network
namespaces joined by a veth pair (10.77.0.1 ↔ 10.77.0.2), which the test creates and removes. Mid-run
it takes the link down, then drops every packet (netem loss 100%, or an iptables DROP where the
kernel has no netem), then slows it to 1 Mbit/s (tc tbf), restoring it after each; the run must
finish once the link is back, every round with both workers, and no process restarted.

Needs root, ``ip`` and ``tc`` (Debian package iproute2); skipped with the reason otherwise.
The figures (cut and slow durations, rounds done in each phase) are printed for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import log_tail, stop_process

pytestmark = pytest.mark.slow

COORD_IP, WORKER_IP, PREFIX = "10.77.0.1", "10.77.0.2", 24
PORT = 8080
WORKERS = 2
ROUNDS = 40
PARAMS = 50_000  # 200 KB of float32: a round moves 800 KB, several seconds at 1 Mbit/s
CUT_S = 8.0  # link down
LOSS_S = 6.0  # every packet dropped
SLOW_S = 10.0  # 1 Mbit/s
# A 5-10 s cut must not make a worker dead (--worker-timeout) nor a round miss its deadline.
RUN_OPTIONS = ("--task", "null", "--task-option", f"params={PARAMS}", "--workers", str(WORKERS),
               "--rounds", str(ROUNDS), "--quorum", "1.0", "--worker-timeout", "20", "--round-timeout", "60",
               "--wait-timeout", "120", "--linger", "5")
TBF = ("tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms")
PHASE_TIMEOUT = 90.0  # seconds any phase may wait for rounds to progress


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@dataclass
class Net:
    """Two namespaces and the veth pair between them; ``c`` holds the coordinator, ``w`` the workers."""

    c: str
    w: str
    dev_c: str
    dev_w: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def spawn(self, ns: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """``python -m fedfleet ARGV`` inside namespace ``ns``, in its own process group."""
        with log.open("ab") as fh:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedfleet", *argv],
                                    stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def tc(self, ns: str, dev: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, "tc", "qdisc", *args[:1], "dev", dev, "root", *args[1:], check=check)


def _setup(net: Net) -> None:
    sh("ip", "netns", "add", net.c)
    sh("ip", "netns", "add", net.w)
    sh("ip", "link", "add", net.dev_c, "type", "veth", "peer", "name", net.dev_w)
    sh("ip", "link", "set", net.dev_c, "netns", net.c)
    sh("ip", "link", "set", net.dev_w, "netns", net.w)
    for ns, dev, ip in ((net.c, net.dev_c, COORD_IP), (net.w, net.dev_w, WORKER_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX}", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def _teardown(net: Net) -> None:
    for proc in reversed(net.procs):  # workers first, then the coordinator
        with contextlib.suppress(Exception):
            stop_process(proc, grace=5)
    for ns in (net.c, net.w):  # removing a namespace removes its end of the veth, and the pair with it
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Iterator[Net]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed (Debian package iproute2)")
    suffix = secrets.token_hex(3)  # one run's names never clash with another's (veth names: 15 chars)
    n = Net(c=f"ffc-{suffix}", w=f"ffw-{suffix}", dev_c=f"ffc{suffix}", dev_w=f"ffw{suffix}")
    try:
        try:
            _setup(n)
        except AssertionError as exc:
            pytest.skip(f"cannot create network namespaces and a veth pair here: {exc}")
        if n.tc(n.c, n.dev_c, "add", *TBF, check=False).returncode != 0:
            pytest.skip("the kernel has no tbf qdisc (tc qdisc add ... tbf)")
        n.tc(n.c, n.dev_c, "del")
        yield n
    finally:
        failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))
        if failed:
            for log in n.logs:
                print(f"----- {log.name} -----\n{log_tail(log)}")
        _teardown(n)


class Cut:
    """Drop every packet on the link without taking it down: netem loss 100% where the kernel has
    netem, else an iptables DROP in the coordinator's namespace (both look the same to TCP)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.method = ""

    def __enter__(self) -> Cut:
        n = self.net
        if n.tc(n.c, n.dev_c, "add", "netem", "loss", "100%", check=False).returncode == 0:
            n.tc(n.w, n.dev_w, "add", "netem", "loss", "100%")
            self.method = "tc netem loss 100%"
        elif shutil.which("iptables") is not None:
            for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
                sh("ip", "netns", "exec", n.c, "iptables", "-A", chain, flag, n.dev_c, "-j", "DROP")
            self.method = "iptables DROP (no netem in this kernel)"
        else:
            pytest.skip("neither tc netem nor iptables can drop packets here")
        return self

    def __exit__(self, *exc: object) -> None:
        n = self.net
        if self.method.startswith("tc"):
            n.tc(n.c, n.dev_c, "del", check=False)
            n.tc(n.w, n.dev_w, "del", check=False)
        else:
            for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
                sh("ip", "netns", "exec", n.c, "iptables", "-D", chain, flag, n.dev_c, "-j", "DROP", check=False)


def rounds_done(data_dir: Path) -> int:
    """Rounds the coordinator has recorded (metrics.jsonl gets a line per round as it closes)."""
    try:
        return len((data_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_rounds(data_dir: Path, n: int, coord: subprocess.Popen[bytes]) -> int:
    end = time.monotonic() + PHASE_TIMEOUT
    while (done := rounds_done(data_dir)) < n:
        assert coord.poll() is None, f"the coordinator exited ({coord.returncode}) at round {done}"
        assert time.monotonic() < end, f"only {done} of {n} rounds after {PHASE_TIMEOUT:g} s"
        time.sleep(0.02)
    return done


def test_run_survives_link_cuts_and_a_slow_link(net: Net, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # A join token on both sides: a coordinator listening beyond loopback needs one.
    env = {"FEDFLEET_JOIN_TOKEN": secrets.token_urlsafe(24)}
    coord = net.spawn(net.c, ["--log-level", "INFO", "coordinator", "--host", COORD_IP, "--port", str(PORT),
                              "--data-dir", str(data_dir), *RUN_OPTIONS], tmp_path / "coordinator.log", env)
    end = time.monotonic() + 60
    while not (data_dir / "coordinator.json").exists():
        assert coord.poll() is None, log_tail(tmp_path / "coordinator.log")
        assert time.monotonic() < end, "the coordinator did not start listening"
        time.sleep(0.05)
    workers = [net.spawn(net.w, ["--log-level", "INFO", "worker", "--coordinator", f"http://{COORD_IP}:{PORT}",
                                 "--state-dir", str(tmp_path / f"worker-{i}"), "--give-up", "120"],
                         tmp_path / f"worker-{i}.log", env) for i in range(WORKERS)]
    figures: list[str] = []

    # 1. The link goes down (both ends lose carrier), then comes back.
    # Rounds close every ~10 ms with a healthy link, so count from the moment the fault is in place,
    # not from when the wait saw its round: a round or two closes while `ip`/`tc` start.
    wait_rounds(data_dir, 3, coord)
    sh("ip", "-n", net.w, "link", "set", net.dev_w, "down")
    before = rounds_done(data_dir)
    time.sleep(CUT_S)
    during = rounds_done(data_dir) - before
    sh("ip", "-n", net.w, "link", "set", net.dev_w, "up")
    figures.append(f"link down {CUT_S:g} s after round {before}: {during} rounds closed meanwhile")
    assert during <= 1, "rounds kept closing with the link down: the cut did not cut"

    # 2. Every packet dropped, the link up: what a dead switch or a firewall does.
    wait_rounds(data_dir, before + 3, coord)
    with Cut(net) as cut:
        before = rounds_done(data_dir)
        time.sleep(LOSS_S)
        during = rounds_done(data_dir) - before
    figures.append(f"{cut.method} for {LOSS_S:g} s after round {before}: {during} rounds closed meanwhile")
    assert during <= 1, "rounds kept closing with every packet dropped"

    # 3. 1 Mbit/s both ways.
    wait_rounds(data_dir, before + 3, coord)
    net.tc(net.c, net.dev_c, "add", *TBF)
    net.tc(net.w, net.dev_w, "add", *TBF)
    before = rounds_done(data_dir)
    time.sleep(SLOW_S)
    during = rounds_done(data_dir) - before
    net.tc(net.c, net.dev_c, "del")
    net.tc(net.w, net.dev_w, "del")
    figures.append(f"tc {' '.join(TBF)} for {SLOW_S:g} s after round {before}: {during} rounds closed meanwhile")

    assert coord.wait(timeout=PHASE_TIMEOUT) == 0, log_tail(tmp_path / "coordinator.log")
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["state"] == "finished", summary
    assert summary["rounds"] == ROUNDS
    records = [json.loads(x) for x in (data_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    assert all(r["participants"] == WORKERS for r in records)
    for i, w in enumerate(workers):  # never restarted; each heard that the run is over
        assert w.wait(timeout=60) == 0, log_tail(tmp_path / f"worker-{i}.log")
    print(f"\nnetns: run finished, {summary['rounds']} rounds with {WORKERS} workers each, "
          f"{summary['seconds']:.1f} s; " + "; ".join(figures))
