"""The QEMU source's data-plane handshake with a target that does not answer (no QEMU needed).

Found by the QEMU fault soak (its first batch, seed 20261137: the data-plane link stalled in Init,
before the soak aimed link faults at Copy): the migration aborted with the alert "Init phase failed:
TimeoutError." (the source's handshake time-out, without a word of what timed out).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from agentprotocol import Endpoint, FailureKind
from hostagent.driver import MigrationAborted
from hostagent.drivers.qemu import source


def test_a_target_that_never_answers_the_handshake_aborts_with_a_sentence_naming_it(monkeypatch):
    monkeypatch.setattr(source, "HANDSHAKE_TIMEOUT_S", 0.2)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
    port = silent.getsockname()[1]
    migration = object.__new__(source.SourceMigration)  # _connect needs only the target's endpoint
    migration.target = Endpoint(host="127.0.0.1", port=port, token="t" * 32)
    try:
        with pytest.raises(MigrationAborted) as aborted:
            asyncio.run(migration._connect("ctrl", "128"))
    finally:
        silent.close()

    assert aborted.value.kind == FailureKind.UNREACHABLE
    assert str(aborted.value) == (
        f"the target's data plane at 127.0.0.1:{port} did not answer the ctrl connection's handshake "
        "within 0.2 s"
    )
