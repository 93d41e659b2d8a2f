"""The QEMU driver: guests are QEMU processes, migrated by QEMU's own live migration over QMP.

Modules: ``driver`` (``QemuDriver``, the guests of one host), ``process`` (one QEMU process),
``migration`` (what both sides share, and how the two agents talk), ``source`` and ``target``
(the two sides), ``states`` (QEMU's states and figures onto the progress snapshot), ``digest``
(hashing a stopped guest's RAM), ``qmp`` (QMP), ``tls`` (QEMU's migration TLS).
"""

from hostagent.drivers.qemu.driver import DEFAULT_IMAGES, QemuDriver

__all__ = ["DEFAULT_IMAGES", "QemuDriver"]
