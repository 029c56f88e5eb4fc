"""``fedfleet certs``: a development certificate authority and a server certificate signed by it.

For trying TLS end to end without a public CA: give the coordinator ``server.pem`` and
``server-key.pem`` (``--tls-cert/--tls-key``) and every worker ``ca.pem`` (``--ca``). In production,
use certificates from your organisation's CA or a public one instead (docs/reliability.md); keep
``ca-key.pem`` offline, since whoever holds it can mint certificates your workers will trust.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfleet.errors import ConfigError
from fedfleet.storage.files import write_atomic

FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfleet development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() or c in "/:@" for c in host):
                raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name", option="host") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out: Path, hosts: list[str], days: int = 365, force: bool = False) -> list[Path]:
    """Write ca.pem, ca-key.pem, server.pem (valid for ``hosts``) and server-key.pem to ``out``."""
    paths = [out / f for f in FILES]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists already; pass --force to replace the certificates in {out}",
                          option="out")
    san = _san(hosts)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedfleet development CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))

    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    write_atomic(paths[0], [ca.public_bytes(pem)])
    write_atomic(paths[1], [_key_pem(ca_key)], mode=0o600)
    write_atomic(paths[2], [cert.public_bytes(pem)])
    write_atomic(paths[3], [_key_pem(key)], mode=0o600)
    return paths
