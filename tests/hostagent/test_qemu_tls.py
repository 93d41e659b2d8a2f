"""QEMU's copy of the agent's TLS files (``hostagent/drivers/qemu/tls.py``); no QEMU needed."""

from __future__ import annotations

import stat
from pathlib import Path

from devtools import pki
from hostagent.drivers.qemu.tls import write_credentials
from hostagent.tls import TlsSettings


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_writes_qemus_file_names_with_the_keys_readable_by_the_agent_only(tmp_path):
    issued = pki.ensure_agent_cert(tmp_path / "pki", "vsp1")
    settings = TlsSettings(issued.cert, issued.key, issued.ca)

    directory = write_credentials(settings, tmp_path / "run")

    assert sorted(path.name for path in directory.iterdir()) == [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
        "server-cert.pem",
        "server-key.pem",
    ]
    assert mode(directory) == 0o700
    assert mode(directory / "server-key.pem") == mode(directory / "client-key.pem") == 0o600
    assert (directory / "server-key.pem").read_bytes() == issued.key.read_bytes()
    assert (directory / "client-cert.pem").read_bytes() == issued.cert.read_bytes()
    assert (directory / "ca-cert.pem").read_bytes() == issued.ca.read_bytes()


def test_it_replaces_the_files_of_an_earlier_start(tmp_path):
    first = pki.ensure_agent_cert(tmp_path / "pki", "vsp1")
    renewed = pki.ensure_agent_cert(tmp_path / "pki", "vsp2")
    write_credentials(TlsSettings(first.cert, first.key, first.ca), tmp_path / "run")

    directory = write_credentials(TlsSettings(renewed.cert, renewed.key, renewed.ca), tmp_path / "run")

    assert (directory / "server-cert.pem").read_bytes() == renewed.cert.read_bytes()
    assert (directory / "client-key.pem").read_bytes() == renewed.key.read_bytes()
    assert mode(directory / "client-key.pem") == 0o600
