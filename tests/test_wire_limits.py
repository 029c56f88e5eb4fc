"""Limits on the wire, against real coordinators on 127.0.0.1 (docs/reliability.md, "Limits on the wire").

Header size, header and idle timeouts on the server actually in use (uvicorn with httptools), the
connection cap that keeps file descriptors for the run, the Host check against DNS rebinding, and
escaped HTML error pages.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import HOST, Coordinator, Fleet, _wait_listening, run_fedfleet
from fedfleet.coordinator.http_limits import Tally, connection_cap
from fedfleet.coordinator.limits import Limits
from fedfleet.coordinator.security import HostCheck, host_name, parse_allowed_hosts
from fedfleet.errors import ConfigError

SONGS = ("--task", "songs", "--workers", "2", "--rounds", "3", "--linger", "1")
JOIN = "join-token-of-the-wire-tests-0123456789"
ADMIN = "admin-token-of-the-wire-tests-0123456789"
MB = 1024 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, timeout: float = 20.0) -> socket.socket:
    s = socket.create_connection((HOST, port_of(url)), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    start = time.monotonic()
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got, time.monotonic() - start


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length: its head (status line and headers) and its body."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {head + body!r}"
        body += chunk
    return head, body


def finished(coord: Coordinator, timeout: float = 120) -> dict[str, Any]:
    """Wait for the coordinator to end its run and exit 0; its summary.json."""
    assert coord.proc.wait(timeout=timeout) == 0, coord.log_text()[-3000:]
    summary: dict[str, Any] = json.loads((coord.data_dir / "summary.json").read_text())
    assert summary["state"] == "finished", summary
    return summary


def token_files(tmp_path: Path) -> list[str]:
    (tmp_path / "join.token").write_text(JOIN)
    (tmp_path / "admin.token").write_text(ADMIN)
    return ["--join-token-file", str(tmp_path / "join.token"), "--admin-token-file", str(tmp_path / "admin.token")]


@pytest.fixture(scope="module")
def open_coord(module_fleet: Fleet) -> Coordinator:
    """A tokenless coordinator on loopback with short timeouts and two extra host names; it never starts a round."""
    return module_fleet.coordinator(*SONGS, "--header-timeout", "1.5", "--idle-timeout", "2",
                                    "--allowed-hosts", "Coord.Example.org,*.lab.example")


# --- units -----------------------------------------------------------------------------------------
def test_limits_are_checked_and_the_cap_keeps_a_reserve() -> None:
    with pytest.raises(ConfigError, match="max_header_bytes"):
        Limits(header_bytes=100)
    with pytest.raises(ConfigError, match="'header_timeout' option must be a number above 0"):
        Limits(header_timeout=0)
    with pytest.raises(ConfigError, match="idle_timeout"):
        Limits(idle_timeout=float("inf"))
    assert connection_cap(1024, 30) == 1024 - 30 - 102  # a tenth of the limit, at least 64
    assert connection_cap(256, 20) == 256 - 20 - 64
    with pytest.raises(ConfigError, match="raise the limit"):
        connection_cap(100, 30)


def test_host_names_and_patterns() -> None:
    assert [host_name(h) for h in ("LocalHost:8080", "[::1]:80", "::1", "a.b.", "127.0.0.1")] == \
        ["localhost", "::1", "::1", "a.b", "127.0.0.1"]
    assert parse_allowed_hosts(" Coord.example.org., *.lab.example ,") == ("coord.example.org", "*.lab.example")
    for bad in ("a b", "*", "*.*.x", "http://x"):
        with pytest.raises(ConfigError, match="allowed-hosts"):
            parse_allowed_hosts(bad)

    async def app(scope: Any, receive: Any, send: Any) -> None: ...

    check = HostCheck(app, "127.0.0.1", ("coord.example.org", "*.lab.example"))
    for ok in (None, "localhost", "LOCALHOST:1", "dash.localhost", "127.0.0.1:9", "127.9.9.9", "[::1]:8080",
               "coord.example.org", "x.lab.example", "10.0.0.1:8080", "[fd00::2]"):  # an address cannot be rebound
        assert check.allows(ok), ok
    for refused in ("evil.example", "localhost.evil.example", "lab.example", "example.org", "10.0.0.1.nip.io",
                    "[evil.example]", ""):
        assert not check.allows(refused), refused


def test_a_tally_logs_a_flood_as_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    tally = Tally(every=10.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="fedfleet"):
        for i in range(1000):
            now[0] = i * 0.05  # 1000 events in 50 s
            tally.add("coordinator.connections_refused")
    assert tally.total["coordinator.connections_refused"] == 1000
    assert len(caplog.records) == 5  # at 0, 10, 20, 30, 40 s, each with the count since the last


# --- timeouts ----------------------------------------------------------------------------------------
def test_half_sent_headers_and_silent_connections_are_closed_after_the_header_timeout(
        open_coord: Coordinator) -> None:
    start = time.monotonic()
    half = connect(open_coord.url)
    half.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    silent = connect(open_coord.url)
    for s in (half, silent):
        got, _ = read_until_closed(s)
        seconds = time.monotonic() - start
        assert got == b"" and 1.0 < seconds < 15, (got, seconds)  # --header-timeout 1.5
        s.close()
    assert "coordinator.header_timeout" in open_coord.log_text()


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_timeout(open_coord: Coordinator) -> None:
    s = connect(open_coord.url)
    start = time.monotonic()
    with pytest.raises(OSError):  # closed under the trickle: EPIPE or ECONNRESET on a later byte
        for byte in b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Trickle: " + b"a" * 100:
            s.send(bytes([byte]))
            time.sleep(0.1)
    assert time.monotonic() - start < 12
    s.close()


def test_idle_connections_close_after_the_idle_timeout_and_a_slow_body_is_not_cut(open_coord: Coordinator) -> None:
    s = connect(open_coord.url)
    for _ in range(2):  # keep-alive: two requests, 1 s apart (under --idle-timeout 2)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(s)[0].startswith(b"HTTP/1.1 200 ")
        time.sleep(1.0)
    got, seconds = read_until_closed(s)
    assert got == b"" and seconds < 15
    s.close()

    # A body that takes 3 s (twice --header-timeout) is a slow upload, not a stalled request.
    body = b'{"worker_ids": []}'
    s = connect(open_coord.url)
    s.sendall(b"POST /v1/heartbeat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 3):
        s.sendall(body[i:i + 3])
        time.sleep(0.5)
    head, answer = read_response(s)
    assert head.startswith(b"HTTP/1.1 200 ") and answer == b'{"known":0}', (head, answer)
    s.close()


# --- header size -------------------------------------------------------------------------------------
def test_too_many_headers_get_431(open_coord: Coordinator) -> None:
    headers = {f"x-h{i}": "1" for i in range(120)}
    r = httpx.get(f"{open_coord.url}/v1/health", headers=headers, timeout=10)
    assert r.status_code == 431 and "over 100 headers" in r.text
    r = httpx.get(f"{open_coord.url}/v1/health", headers={"x-big": "a" * 70_000}, timeout=10)
    assert r.status_code == 431 and "over 65536 bytes" in r.text
    assert httpx.get(f"{open_coord.url}/v1/health", headers={"x-ok": "a" * 30_000}, timeout=10).status_code == 200


def _endless_header(url: str, size: int, sent: list[int], answers: list[bytes]) -> None:
    """Send ``size`` bytes of one header that never ends; record how many got out and what came back."""
    s = connect(url, timeout=30)
    n = 0
    piece = b"a" * 65536
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Endless: ")
        while n < size:
            s.sendall(piece)
            n += len(piece)
    except OSError:
        pass
    sent.append(n)
    try:
        answers.append(s.recv(200))
    except OSError:
        answers.append(b"(reset)")
    s.close()


def test_40_mb_of_headers_are_cut_early_and_the_run_finishes(fleet: Fleet) -> None:
    coord = fleet.coordinator(*SONGS)
    before = rss_mb(coord.proc.pid)
    sent: list[int] = []
    answers: list[bytes] = []
    # As reproduced: 12 connections, each sending 40 MB of one unfinished header, at once.
    threads = [threading.Thread(target=_endless_header, args=(coord.url, 40 * MB, sent, answers))
               for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    after = rss_mb(coord.proc.pid)
    print(f"coordinator RSS {before:.0f} MB before, {after:.0f} MB after 12 x 40 MB of headers; "
          f"bytes sent before the cut: {sorted(sent)}")
    assert len(sent) == 12 and max(sent) < 40 * MB  # each connection was closed long before its 40 MB
    assert all(a.startswith(b"HTTP/1.1 431 ") or a in (b"", b"(reset)") for a in answers), answers
    assert after - before < 100, (before, after)
    assert httpx.get(f"{coord.url}/v1/health", timeout=10).status_code == 200
    fleet.worker(coord.url, clients=2)
    finished(coord)


# --- file descriptors --------------------------------------------------------------------------------
FD_LIMIT = 1024
IDLE_SOCKETS = 2000


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Let this test process hold ``IDLE_SOCKETS`` sockets: its soft limit raised (to its hard one at most)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_SOCKETS + 256
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this test holds {IDLE_SOCKETS} sockets; the hard limit on open files is {hard} (ulimit -Hn)")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_limited_coordinator(fleet: Fleet, nofile: int, *args: str) -> Coordinator:
    """``fedfleet coordinator ARGS`` with at most ``nofile`` open files (soft and hard), as ``prlimit`` would."""
    data_dir = fleet.directory / "data"
    log_path = fleet.directory / "coordinator.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log_path.open("ab") as fh:
        # preexec_fn: the one way to give a child its limit before it runs (prlimit is not everywhere)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedfleet", "--log-level", "INFO", "coordinator", "--data-dir", str(data_dir),
             "--host", HOST, "--port", "0", *args],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=limit)
    coord = Coordinator(proc, "", data_dir, log_path)
    fleet.coordinators.append(coord)  # stopped at teardown like the others
    coord.url = _wait_listening(proc, data_dir / "coordinator.json", log_path, 60.0)
    return coord


def make_certs(folder: Path) -> Path:
    r = run_fedfleet("certs", "--out", str(folder), "--host", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    return folder


ROUNDS = 60


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_2000_idle_sockets_against_1024_fds_never_fail_the_run(fleet: Fleet, many_fds: None, tls: bool,
                                                               tmp_path: Path) -> None:
    # Under TLS the idle sockets never start a handshake: they must be counted (and refused) all the same.
    certs = make_certs(tmp_path / "certs") if tls else None
    tls_args = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server-key.pem")) if certs else ()
    # Long header timeout: the idle sockets stay for as long as the rounds below take. Enough rounds that
    # the run is still going while the sockets are opened and counted (8 rounds once ended in 1.8 s first).
    coord = start_limited_coordinator(fleet, FD_LIMIT, "--task", "songs", "--workers", "2", "--rounds", str(ROUNDS),
                                      "--local-epochs", "3", "--linger", "1", "--header-timeout", "20", *tls_args)
    pid = coord.proc.pid
    cap = int(next(f for f in coord.log_text().split() if f.startswith("max_open_connections=")).split("=")[1])
    assert cap <= FD_LIMIT - 64
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(certs / "ca.pem")) if certs else True
    admin = httpx.Client(base_url=coord.url, timeout=10, verify=verify)
    fleet.worker(coord.url, *(("--ca", str(certs / "ca.pem")) if certs else ()), clients=2)
    end = time.monotonic() + 60
    while admin.get("/v1/status").json()["round"] < 2 and time.monotonic() < end:
        time.sleep(0.1)
    before = rss_mb(pid)

    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_SOCKETS):
            s = socket.socket()
            s.settimeout(10)
            s.connect((HOST, port_of(coord.url)))
            idle.append(s)
        time.sleep(1.0)
        # Those past the cap were closed at once: their read end is at EOF.
        closed = 0
        for s in idle:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        held = open_fds(pid)
        during = rss_mb(pid)
        print(f"cap {cap} connections; {IDLE_SOCKETS - closed} idle sockets held, {closed} closed at once; "
              f"coordinator fds {held} of {FD_LIMIT}; RSS {before:.0f} MB before, {during:.0f} MB during")
        assert closed >= IDLE_SOCKETS - cap
        assert held <= FD_LIMIT - 64
        summary = finished(coord, timeout=120)
    finally:
        for s in idle:
            s.close()
        admin.close()
    assert summary["rounds"] == ROUNDS
    assert during - before < 100, (before, during)
    assert "coordinator.connections_refused" in coord.log_text()
    assert "Too many open files" not in coord.log_text()


def test_under_tls_a_connection_that_never_shakes_hands_is_dropped_after_the_header_timeout(
        fleet: Fleet, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    coord = fleet.coordinator(*SONGS, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                              str(certs / "server-key.pem"), "--header-timeout", "1")
    start = time.monotonic()
    mute = connect(coord.url)  # TCP only: no ClientHello
    got, _ = read_until_closed(mute)
    assert got == b"" and time.monotonic() - start < 15
    mute.close()
    trusted = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with httpx.Client(base_url=coord.url, verify=trusted, timeout=10) as http:
        assert http.get("/v1/health").status_code == 200
        assert http.get("/v1/health", headers={"x-big": "a" * 70_000}).status_code == 431
    assert "coordinator.tls_handshake_failed" in coord.log_text()


# --- Host and HTML -----------------------------------------------------------------------------------
def test_a_forged_host_gets_421_on_a_tokenless_loopback_coordinator(open_coord: Coordinator) -> None:
    with httpx.Client(base_url=open_coord.url, timeout=10) as http:
        for host in ("evil.example", f"evil.example:{port_of(open_coord.url)}", "localhost.evil.example",
                     "127.0.0.1.nip.io"):
            r = http.get("/v1/status", headers={"Host": host})
            assert r.status_code == 421, (host, r.text)
            assert host in r.json()["detail"] and "--allowed-hosts" in r.json()["detail"]
        r = http.get("/", headers={"Host": "evil.example", "Accept": "text/html"})
        assert r.status_code == 421
        for host in ("localhost", f"localhost:{port_of(open_coord.url)}", "127.0.0.1", "[::1]:1", "app.localhost",
                     "192.168.1.20:8080", "coord.example.org", "COORD.example.org:443", "gpu1.lab.example"):
            assert http.get("/v1/status", headers={"Host": host}).status_code == 200, host
    assert "coordinator.host_refused" in open_coord.log_text()


def test_any_host_is_served_when_there_is_an_admin_token(fleet: Fleet, tmp_path: Path) -> None:
    # As in compose: workers reach http://coordinator:8080 by a service name.
    coord = fleet.coordinator(*SONGS, *token_files(tmp_path))
    with httpx.Client(base_url=coord.url, timeout=10) as http:
        assert http.get("/v1/health", headers={"Host": "coordinator:8080"}).status_code == 200
        r = http.get("/v1/status", headers={"Host": "coordinator:8080", "Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200
        r = http.post("/v1/workers", json={"name": "w"},
                      headers={"Host": "coordinator", "Authorization": f"Bearer {JOIN}"})
        assert r.status_code == 200, r.text
        token = r.json()["token"]

        # A worker id with markup in the path comes back escaped in the HTML error page.
        r = http.get("/v1/workers/<script>alert(1)<%2Fscript>/task",
                     headers={"Authorization": f"Bearer {token}", "Accept": "text/html"})
        assert r.status_code == 403 and r.headers["content-type"].startswith("text/html")
        assert "<script>" not in r.text and "&lt;script&gt;alert(1)" in r.text


def test_coordinator_help_lists_the_wire_options() -> None:
    from fedfleet.cli import build_parser

    args = build_parser().parse_args(["coordinator"])
    assert (args.max_header_bytes, args.header_timeout, args.idle_timeout, args.allowed_hosts) == \
        (65536, 10.0, 75.0, "")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["coordinator", "--header-timeout", "0"])
