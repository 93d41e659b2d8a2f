"""The agent's TLS settings: its certificate, key and the deployment CA (``ssl`` only).

One certificate serves three roles (``devtools/pki.py`` issues such certificates):
- the HTTPS API: the console verifies the agent's certificate (against the registered CA, or
  pinned by its SHA-256 fingerprint) and authenticates itself with the bearer secret, so the API
  does not ask for client certificates;
- the data plane's listener (target): the source must show a certificate from the same CA
  (mutual TLS), then still present the one-time token in HELLO;
- the data plane's connection (source): it checks the target's certificate against the CA.

The data plane authenticates membership of the deployment (the CA), not a host name: a data-plane
address is handed out by the target itself through the authenticated API, and the one-time
token binds the connection to the migration (the QEMU driver's stream is QEMU's own TLS, which
does check the target's name: ``drivers/qemu/tls.py``). TLS 1.2 is the minimum; OpenSSL picks AES-GCM or
ChaCha20-Poly1305 (AES-GCM with AES-NI runs at several GB/s per core).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsSettings:
    """Paths of the agent's certificate (PEM, may hold the chain), its key and the CA certificate."""

    cert: Path
    key: Path
    ca: Path

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert), str(self.key))
        return context

    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of the agent's own certificate (the first in ``cert``), as
        ``AB:CD:...``: what an admin compares when adding the VSP in the console (trust on first use)."""
        text, end = self.cert.read_text(), "-----END CERTIFICATE-----"
        der = ssl.PEM_cert_to_DER_cert(
            text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)]
        )
        digest = hashlib.sha256(der).hexdigest().upper()
        return ":".join(digest[i : i + 2] for i in range(0, 64, 2))

    def api_context(self) -> ssl.SSLContext:
        """Server context of the HTTPS API (no client certificate: the console uses the secret)."""
        context = self._context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_NONE
        return context

    def data_server_context(self) -> ssl.SSLContext:
        """Target side of the data plane: the source must show a certificate from the CA."""
        context = self._context(ssl.Purpose.CLIENT_AUTH)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def data_client_context(self) -> ssl.SSLContext:
        """Source side of the data plane: the target's certificate must come from the CA."""
        context = self._context(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def check(self) -> None:
        """Load everything once, so a wrong path or key fails at start-up, not at the first migration."""
        self.api_context()
        self.data_client_context()
