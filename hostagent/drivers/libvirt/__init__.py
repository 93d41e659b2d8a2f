"""Groundwork of the libvirt driver: a host's libvirt daemon, its domains, and P2P live migration.

Modules: ``connection`` (open a daemon's URI, its event loop, who the host is), ``inventory``
(domains read from their XML and libvirt's storage pools and networks: memory, vCPUs, disks,
network cards), ``jobs`` (a migration policy onto libvirt's flags and parameters; one outgoing
peer-to-peer migration followed through job statistics and events, steered and aborted).

Importing these needs no ``libvirt`` module; calling into libvirt does (``libvirt-python``, pinned
in ``hostagent/requirements-libvirt.txt``, built against libvirt >= 11 from
``scripts/install_libvirt.sh``), else ``LibvirtUnavailable``. See ``docs/libvirt-driver.md``.
"""

from hostagent.drivers.libvirt.connection import LibvirtUnavailable, libvirt_missing

__all__ = ["LibvirtUnavailable", "libvirt_missing"]
