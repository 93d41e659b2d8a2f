"""A small deployment CA for the agents' TLS (the ``cryptography`` package).

``make run`` (``scripts/run_console.py``) and the tests use it to create one CA and one certificate
per host agent; the same certificate serves the agent's HTTPS API (the console verifies it) and
both ends of the agent-to-agent data plane (mutual TLS: each side must show a certificate from
this CA). Layout under a directory (keys mode 0600, created once and reused)::

    ca.pem  ca.key                 the deployment CA (EC P-256, 10 years)
    <name>.pem  <name>.key         an agent's certificate (EC P-256, 2 years), SAN = its hosts

A production deployment brings its own CA and certificates; only their paths reach the agent
(``--tls-cert --tls-key --tls-ca``), and the console needs the CA certificate or the SHA-256
fingerprint of each agent's certificate (``fingerprint()``).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Issued:
    """Paths of one agent's certificate and key, and of the CA certificate that signed it."""

    cert: Path
    key: Path
    ca: Path

    def agent_args(self) -> list[str]:
        """The ``python -m hostagent`` flags that serve with this certificate."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]

    def fingerprint(self) -> str:
        return fingerprint(self.cert.read_text())


def fingerprint(pem: str) -> str:
    """SHA-256 of a PEM certificate's DER form as upper-case hex pairs ``AB:CD:...`` (like openssl)."""
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def ensure_ca(directory: Path, common_name: str = "Matrix OE deployment CA") -> Path:
    """The CA certificate in ``directory`` (``ca.pem``), created with its key if absent."""
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def ensure_agent_cert(directory: Path, name: str, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> Issued:
    """``<name>.pem``/``<name>.key`` signed by the CA in ``directory`` (both created if absent).

    The certificate names ``hosts`` (IP addresses or DNS names) as subject alternative names and
    allows both server and client authentication: an agent is a server to the console and to its
    source peer, and a client to its target peer. That also suits QEMU's migration TLS (GnuTLS
    checks the purposes; no key-usage extension means any), which moreover checks the target's
    host name: ``hosts`` must include the agent's ``--data-host`` address.
    """
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"an agent name for a certificate file must be letters, digits, - or _: {name!r}")
    ca_path = ensure_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert_path.exists() and key_path.exists():
        return Issued(cert_path, key_path, ca_path)
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, ca_path)
