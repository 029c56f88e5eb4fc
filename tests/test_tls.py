"""TLS: `fedfleet certs` makes a development CA and server certificate; a coordinator serves https with
them and workers that trust the CA (--ca) train through it, while those that do not are refused."""

from __future__ import annotations

import json
import os
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from conftest import Fleet
from conftest import run_fedfleet as fedfleet

NULL_TASK = ("--task", "null", "--task-option", "params=1000", "--workers", "2", "--rounds", "2", "--linger", "2")
JOIN = "join-" + "t" * 40


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    r = fedfleet("certs", "--out", str(out), "--host", "localhost", "--host", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    return out


def test_certs_makes_a_ca_and_a_server_certificate_for_the_hosts(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for key in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    # The pair loads as a server's, and the CA verifies it: what uvicorn and the workers will do.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certs / "server.pem", certs / "server-key.pem")


def test_certs_does_not_overwrite_without_force(certs: Path) -> None:
    r = fedfleet("certs", "--out", str(certs))
    assert r.returncode == 2 and "exists already" in r.stderr and "--force" in r.stderr
    assert fedfleet("certs", "--out", str(certs / "bad"), "--host", "a b").returncode == 2


def test_a_run_over_tls_finishes_and_untrusting_clients_are_refused(fleet: Fleet, certs: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFLEET_JOIN_TOKEN", JOIN)  # for both sides: tokens only ever cross TLS here
    c = fleet.coordinator(*NULL_TASK, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                          str(certs / "server-key.pem"))
    assert c.url.startswith("https://127.0.0.1:")
    ca = str(certs / "ca.pem")
    assert httpx.get(f"{c.url}/v1/health", verify=ssl.create_default_context(cafile=ca)).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{c.url}/v1/health")  # the system's CAs do not know ours
    with pytest.raises(httpx.HTTPError):
        httpx.get(c.url.replace("https://", "http://") + "/v1/health")  # no plain http on a TLS port
    stranger = fleet.worker(c.url, "--give-up", "3")
    assert stranger.proc.wait(timeout=60) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in stranger.log_text()
    w = fleet.worker(c.url, "--ca", ca, clients=2)
    assert w.proc.wait(timeout=120) == 0, w.log_text()
    assert c.proc.wait(timeout=60) == 0, c.log_text()
    assert json.loads((c.data_dir / "summary.json").read_text())["state"] == "finished"


def test_a_bad_certificate_or_key_is_a_cli_error(tmp_path: Path, certs: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    base = ("coordinator", "--port", "0", "--data-dir", str(tmp_path / "d"))
    r = fedfleet(*base, "--tls-cert", str(garbage), "--tls-key", str(certs / "server-key.pem"))
    assert r.returncode == 2 and "are not a PEM certificate and its private key" in r.stderr
    r = fedfleet(*base, "--tls-cert", str(certs / "server.pem"))
    assert r.returncode == 2 and "go together" in r.stderr
    r = fedfleet("worker", "--coordinator", "https://127.0.0.1:1", "--ca", str(garbage))
    assert r.returncode == 2 and "is not PEM CA certificates" in r.stderr
    assert not os.path.exists(tmp_path / "d" / "state.sqlite")  # refused before anything was made
