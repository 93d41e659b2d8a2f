"""The qemu driver refuses a QEMU older than 10, which corrupts guests that write memory while they move.

A shell script stands in for ``qemu-system-x86_64`` and answers ``--version`` like Debian 12's QEMU 7.2:
installing a second, older QEMU on the test machine is not possible. The agent itself is real.
"""

from __future__ import annotations

import pytest

from tests.hostagent.conftest import AgentFactory

OLD_QEMU = """#!/bin/sh
echo "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u13)"
"""


def test_it_refuses_to_start_on_qemu_older_than_10(agent_factory: AgentFactory, tmp_path):
    old_qemu = tmp_path / "qemu-system-x86_64"
    old_qemu.write_text(OLD_QEMU)
    old_qemu.chmod(0o755)

    with pytest.raises(RuntimeError) as refused:
        agent_factory("vsp-old", "--driver-option", f"qemu_binary={old_qemu}", driver="qemu")

    message = str(refused.value)
    assert "QEMU 7.2.15" in message and "needs QEMU >= 10" in message
    assert "scripts/install_qemu.sh" in message
