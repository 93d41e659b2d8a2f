"""Connections to a host's libvirt daemon, the one libvirt event loop of this process, the host's identity.

libvirt delivers domain events (lifecycle, ``MIGRATION_ITERATION``, ``JOB_COMPLETED``) and
keepalives only to a process that registered an event loop *before* it opened its connections;
``open_connection`` does that first (libvirt's default loop, run by a daemon thread: callbacks
then run on that thread, whatever the caller's own concurrency).
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from types import ModuleType
from typing import Any

DEFAULT_URI = "qemu:///system"
MIN_LIBVIRT = (11, 0, 0)
KEEPALIVE_INTERVAL_S = 5  # libvirt pings an idle daemon this often ...
KEEPALIVE_COUNT = 3  # ... and closes the connection after this many unanswered pings

Connection = Any  # libvirt.virConnect (the binding has no type information)
Domain = Any  # libvirt.virDomain

_event_loop_lock = threading.Lock()
_event_loop_started = False


class LibvirtUnavailable(RuntimeError):
    """The binding is missing, libvirt is too old, or the daemon at a URI does not answer."""


def libvirt_missing() -> str | None:
    """Why libvirt cannot be used from this process (None: it can), in words for a skip or a log."""
    try:
        libvirt_module()
    except LibvirtUnavailable as error:
        return str(error)
    return None


def libvirt_module() -> ModuleType:
    """The ``libvirt`` binding, imported on first use; raises LibvirtUnavailable with what to install."""
    try:
        import libvirt
    except ImportError as error:
        raise LibvirtUnavailable(
            f"the libvirt binding is not installed ({error}): scripts/install_libvirt.sh, then "
            "pip install -r hostagent/requirements-libvirt.txt"
        ) from None
    version = _version_tuple(libvirt.getVersion())
    if version < MIN_LIBVIRT:
        raise LibvirtUnavailable(f"libvirt {_dotted(version)} is too old: {_dotted(MIN_LIBVIRT)} or newer")
    return libvirt


def _version_tuple(number: int) -> tuple[int, int, int]:
    """libvirt's ``major * 1,000,000 + minor * 1,000 + release`` as a tuple."""
    return number // 1_000_000, number // 1_000 % 1_000, number % 1_000


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it on a daemon thread.

    Also silences the binding's printing of errors to stderr (they are raised as exceptions).
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt = libvirt_module()
        # The binding prints every error to stderr by default, even those a caller catches and
        # expects ("domain is not running" once a migrated domain left): errors are raised anyway.
        libvirt.registerErrorHandler(lambda _context, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def open_connection(uri: str = DEFAULT_URI) -> Connection:
    """A read-write connection to the libvirt daemon at ``uri``, with events and keepalive.

    Raises LibvirtUnavailable with libvirt's own reason when the daemon does not answer (a wrong
    socket path, no permission on it, the daemon down).
    """
    libvirt = libvirt_module()
    ensure_event_loop()
    try:
        connection = libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise LibvirtUnavailable(f"cannot connect to libvirt at {uri}: {error}") from None
    connection.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
    return connection


@dataclass(frozen=True)
class HostIdentity:
    """Who a libvirt host is: ``host_uuid`` is what libvirt compares to refuse a migration to itself."""

    hostname: str
    host_uuid: str
    libvirt_version: str  # the daemon's, e.g. "11.3.0"
    hypervisor_version: str  # QEMU's, e.g. "10.0.2"
    domain_types: tuple[str, ...]  # what it can run: ("qemu",) under TCG only, ("qemu", "kvm") with KVM


def host_identity(connection: Connection) -> HostIdentity:
    """The host behind ``connection``, read from the daemon (its capabilities XML for the UUID)."""
    capabilities = ElementTree.fromstring(connection.getCapabilities())  # noqa: S314 - the daemon's own XML
    domain_types = {domain.get("type", "") for domain in capabilities.iterfind("./guest/arch/domain")}
    domain_types.discard("")
    return HostIdentity(
        hostname=connection.getHostname(),
        host_uuid=capabilities.findtext("./host/uuid", default=""),
        libvirt_version=_dotted(_version_tuple(connection.getLibVersion())),
        hypervisor_version=_dotted(_version_tuple(connection.getVersion())),
        domain_types=tuple(sorted(domain_types)),
    )
