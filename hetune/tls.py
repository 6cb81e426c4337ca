"""Certificates for a test deployment: a throw-away CA and a worker certificate with the right names.

A client checks that the worker's certificate names the host it dialled: a DNS name as a
DNS subject alternative name, an IP address as an IP one (RFC 6125; the common name is not
consulted). ``make_worker_certs`` writes the CA's certificate (the data owners'
``--ca-cert``) and the worker's certificate and key (``serve --tls-cert/--tls-key``); the
CA's key is never written, so this CA can sign nothing else. A production worker uses a
certificate from the organisation's CA or ACME (docs/protocol.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from hetune.errors import ConfigError, OutputError
from hetune.files import write_atomic


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    cert: Path
    key: Path


def _names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in "/: "):
                raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name",
                                  "pass the name or address the data owners put in --worker https://HOST:PORT") from None
            names.append(x509.DNSName(host))
    return names


def make_worker_certs(out: Path, hosts: list[str], days: int = 30) -> CertFiles:
    """A CA and a worker certificate for ``hosts`` (DNS names and IP addresses), valid ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ConfigError("no --host given", "pass every name and address clients dial, e.g. --host worker.lan --host 10.0.0.5")
    if days < 1:
        raise ConfigError(f"--days {days} must be >= 1", "use e.g. 30")
    sans = _names(hosts)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hetune test CA {secrets.token_hex(4)}")])  # one name per CA
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    files = CertFiles(out / "ca.pem", out / "worker.pem", out / "worker-key.pem")
    try:
        write_atomic(files.ca, ca.public_bytes(pem))
        write_atomic(files.cert, cert.public_bytes(pem))
        write_atomic(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)
    except OSError as err:
        raise OutputError(f"could not write certificates to {out}: {err.strerror or err}", "choose a writable --out") from err
    return files
