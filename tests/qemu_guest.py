"""What the QEMU tests need: QEMU >= 10 and the test guest; else a loud skip reason (CI fails on skips)."""

from __future__ import annotations

from typing import Any

import pytest

from hostagent.drivers.qemu import DEFAULT_IMAGES
from hostagent.drivers.qemu.process import QemuTooOld, check_qemu
from tests.conftest import wait_until


def qemu_missing() -> str | None:
    try:
        check_qemu("qemu-system-x86_64")
    except QemuTooOld as error:
        return f"QEMU TESTS SKIPPED: {error}"
    if not (DEFAULT_IMAGES / "vmlinuz").is_file() or not (DEFAULT_IMAGES / "initramfs.cpio.gz").is_file():
        return "QEMU TESTS SKIPPED: no test guest in guest-images/; run scripts/build_test_guest.sh"
    return None


MISSING = qemu_missing()
needs_qemu = [pytest.mark.qemu, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

OS_IMAGE = DEFAULT_IMAGES / "guest-os.qcow2"
OS_IMAGE_MISSING = MISSING or (
    None
    if OS_IMAGE.is_file()
    else "QEMU TESTS SKIPPED: no OS image guest-images/guest-os.qcow2; run scripts/build_guest_image.sh"
)
needs_os_image = [
    pytest.mark.qemu,
    pytest.mark.skipif(OS_IMAGE_MISSING is not None, reason=OS_IMAGE_MISSING or ""),
]


def guest_named(agent: Any, name: str) -> dict[str, Any]:
    """The guest whose display name is ``name`` on ``agent`` (test names are unique)."""
    return next(guest for guest in agent.client.list_guests() if guest["name"] == name)


def workload(agent: Any, name: str) -> dict[str, Any]:
    """What the guest's memwriter last said on its serial console, as the agent reports it."""
    return guest_named(agent, name)["workload"]


def runs_intact(agent: Any, name: str) -> bool:
    """Running on ``agent``: it says alive again and passes a further full self-check, none failed."""
    before = workload(agent, name)

    def further_check() -> bool:
        now = workload(agent, name)
        return (
            now["selfchecks_passed"] > before["selfchecks_passed"]
            and now["alive_lines"] > before["alive_lines"]
        )

    passed = wait_until(further_check, timeout=30)
    guest = guest_named(agent, name)
    return passed and guest["hardware_status"] == "on" and guest["workload"]["selfchecks_failed"] == 0
