"""The QEMU driver: guests are QEMU processes, migrated by QEMU's own live migration over QMP.

Modules: ``driver`` (``QemuDriver``, the guests of one host), ``process`` (one QEMU process),
``migration`` (both sides, mapped onto the agent's phases), ``states`` (QEMU's states and
figures onto the progress snapshot), ``digest`` (hashing a stopped guest's RAM), ``qmp`` (QMP).
"""

from hostagent.drivers.qemu.driver import DEFAULT_IMAGES, QemuDriver

__all__ = ["DEFAULT_IMAGES", "QemuDriver"]
