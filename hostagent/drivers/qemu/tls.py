"""QEMU's own migration TLS (``tls-creds-x509``) from the agent's certificate, key and CA.

Under the policy "required" the guest's memory travels inside QEMU's TLS session: both QEMUs get a
``tls-creds-x509`` object (``endpoint=server`` on the target, ``client`` on the source, both
``verify-peer=true``) and the migration parameter ``tls-creds`` naming it, before ``migrate-incoming``
and ``migrate``. So the target accepts only a source whose certificate comes from the deployment CA,
and the source sends only to a target whose certificate does (mutual TLS, as the simulated data
plane does with Python's ``ssl``). The agents' one-time token is still checked before QEMU sees the
socket.

QEMU reads its credentials from a directory with fixed file names; ``write_credentials`` copies the
agent's ``--tls-cert``/``--tls-key``/``--tls-ca`` files there (``<run_dir>/tls/``, mode 0700, keys
0600): ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` and ``client-cert.pem``/
``client-key.pem`` (the same certificate in both roles: ``devtools/pki.py`` issues certificates for
server and client authentication).

QEMU, as a TLS client, always checks the target's host name (``crypto/tlssession.c``: with an ``fd:``
URI it has none of its own, so ``tls-hostname`` is set to the data-plane address the target handed
out). The target's certificate must therefore name its data-plane address (an IP address or DNS
name) among its subject alternative names.

The policy "off" clears ``tls-creds`` (a source QEMU that migrated under "required" before and was
rolled back still has it set) and the stream is plain TCP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Literal

from hostagent.drivers.qemu.qmp import QmpClient, QmpError
from hostagent.tls import TlsSettings

CREDS_ID = "migration-tls"
CREDS_DIR = "tls"

TlsEndpoint = Literal["server", "client"]


def write_credentials(tls: TlsSettings, run_dir: Path) -> Path:
    """``run_dir/tls/`` with the agent's certificate, key and CA under QEMU's file names.

    Rewritten at every start (a renewed certificate takes effect at the agent's restart).
    Raises OSError if a file cannot be read or written.
    """
    directory = run_dir / CREDS_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    shutil.copyfile(tls.ca, directory / "ca-cert.pem")
    for role in ("server", "client"):
        shutil.copyfile(tls.cert, directory / f"{role}-cert.pem")
        _copy_private(tls.key, directory / f"{role}-key.pem")
    return directory


def _copy_private(source: Path, destination: Path) -> None:
    destination.unlink(missing_ok=True)
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(source.read_bytes())


async def use_tls(qmp: QmpClient, endpoint: TlsEndpoint, directory: Path, hostname: str = "") -> None:
    """Give this QEMU the credentials object and make its next migration use it.

    ``hostname``: on the source (``client``), the name the target's certificate must hold.
    Raises ``QmpError`` if QEMU refuses the credentials (unreadable files, a certificate that is not
    valid for the role or not signed by the CA: QEMU checks them when the object is created).
    """
    with contextlib.suppress(QmpError):
        await qmp.execute("object-del", id=CREDS_ID)  # left by an earlier, rolled-back migration
    await qmp.execute(
        "object-add",
        qom_type="tls-creds-x509",
        id=CREDS_ID,
        endpoint=endpoint,
        dir=str(directory),
        verify_peer=True,
    )
    await qmp.execute("migrate-set-parameters", tls_creds=CREDS_ID, tls_hostname=hostname)


async def use_plain(qmp: QmpClient) -> None:
    """The policy "off": this QEMU's next migration is plain TCP."""
    await qmp.execute("migrate-set-parameters", tls_creds="", tls_hostname="")
