"""Guest networking on the host: taps on a bridge (optionally in a network namespace), and the UDP
heartbeat listener whose record gives the **network blackout** a client of the guest saw across a
migration.

A bridged card's tap is opened here, not by QEMU: the agent creates it (``TUNSETIFF`` on
``/dev/net/tun``) inside the bridge's namespace, attaches it to the bridge, and hands QEMU the file
descriptor (``-netdev tap,fd=N``), as libvirt does. The tap lives as long as that descriptor: it
disappears when QEMU exits. The source's and the incoming QEMU's taps are on the same bridge, so
after the switchover the guest's frames simply leave through the target's tap, and the bridge learns
the guest's MAC there from QEMU's announce (``announce-self`` rounds, sent by the target QEMU by
itself after an incoming migration) or from the guest's own next frame.

Python 3.11 has no ``os.setns``; ``in_netns`` calls ``setns(2)`` through ctypes in a short-lived
thread (a namespace switch is per thread), so the agent's own threads stay where they were. Sockets
and taps opened there stay in that namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
HEARTBEAT_MAGIC = b"MXHB1"


class NetworkError(RuntimeError):
    """A namespace, bridge or tap could not be set up (the message says which command failed)."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def in_netns(netns: str | None, function: Callable[[], T]) -> T:
    """``function()`` run in network namespace ``netns`` (``/run/netns/<netns>``, as ``ip netns``
    names them); None: here. Raises ``NetworkError`` if the namespace cannot be entered."""
    if netns is None:
        return function()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            failure.append(NetworkError(f"no network namespace {netns!r}: {error}"))
            return
        try:
            _setns(target)  # this thread only, and it ends right after
            result.append(function())
        except BaseException as error:
            failure.append(error)
        finally:
            os.close(target)

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip [-n netns] args``; raises ``NetworkError`` with the command and its error."""
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def open_tap(name: str, bridge: str, netns: str | None = None, guest_mac: str | None = None) -> int:
    """Create tap ``name`` (with vnet headers, as QEMU's virtio-net wants) in ``netns``, attach it to
    ``bridge`` and bring it up; return its file descriptor (inheritable, for QEMU). The tap goes
    away when the last descriptor is closed. Raises ``NetworkError``.

    The tap's own MAC is the guest's with its first byte 0xfe (``guest_mac``; as libvirt does): a
    Linux bridge without a fixed MAC takes the lowest of its ports', and a new tap with a random
    lower one would change the host's MAC on the bridge under running guests, whose ARP entries for
    the host would then lead to a port, not to the host."""

    def create() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as error:
            os.close(fd)
            raise NetworkError(f"cannot create tap {name}: {error}") from None
        return fd

    fd = in_netns(netns, create)
    try:
        if guest_mac:
            ip("link", "set", name, "address", "fe:" + guest_mac.split(":", 1)[1], netns=netns)
        ip("link", "set", name, "master", bridge, "up", netns=netns)
    except NetworkError:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd


@dataclass(frozen=True)
class IsolatedNetwork:
    """A network namespace with a bridge and an address on it: the host side of a guest network that
    touches nothing of the host's own (for tests and demos)."""

    netns: str
    bridge: str
    host_address: str  # the host's address on the bridge, e.g. 10.77.0.1
    prefix: int

    def guest_address(self, index: int) -> str:
        """The ``index``-th guest's address (from .10 on), with the prefix: ``10.77.0.10/24``."""
        base = self.host_address.rsplit(".", 1)[0]
        return f"{base}.{10 + index}/{self.prefix}"


def create_isolated_network(
    netns: str, bridge: str = "br0", host_cidr: str = "10.77.0.1/24"
) -> IsolatedNetwork:
    """``ip netns add netns`` with ``bridge`` up at ``host_cidr`` inside it. Raises ``NetworkError``
    (naming the command that failed: ``ip netns add`` needs root or CAP_SYS_ADMIN)."""
    ip("netns", "add", netns)
    try:
        ip("link", "set", "lo", "up", netns=netns)
        # A fixed MAC: a bridge without one takes its ports' lowest, so the incoming QEMU's new tap
        # could change it, and a guest's ARP entry for the host would then point at the source's tap.
        ip("link", "add", bridge, "address", "02:00:00:00:00:01", "type", "bridge", netns=netns)
        # No forwarding delay: a new port (the incoming QEMU's tap) forwards at once.
        ip("link", "set", bridge, "type", "bridge", "forward_delay", "0", netns=netns)
        ip("addr", "add", host_cidr, "dev", bridge, netns=netns)
        ip("link", "set", bridge, "up", netns=netns)
    except NetworkError:
        delete_isolated_network(netns)
        raise
    address, prefix = host_cidr.split("/")
    return IsolatedNetwork(netns=netns, bridge=bridge, host_address=address, prefix=int(prefix))


def delete_isolated_network(netns: str) -> None:
    with contextlib.suppress(NetworkError):
        ip("netns", "delete", netns)


# --- heartbeats and the network blackout ----------------------------------------------------


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat as it arrived: host wall-clock time (s), the guest's id, sequence number and
    CLOCK_MONOTONIC (ns), and the sender's address (user-mode networking: the sending QEMU's own
    host port, so a source and a target QEMU differ)."""

    arrived: float
    guest: str
    seq: int
    guest_ns: int
    sender: tuple[str, int]


def parse_heartbeat(data: bytes, sender: tuple[str, int], arrived: float) -> Heartbeat | None:
    """``MXHB1 <guest> <seq> <guest ns>``, as guestload sends it; None for anything else."""
    parts = data.split()
    if len(parts) != 4 or parts[0] != HEARTBEAT_MAGIC:
        return None
    try:
        return Heartbeat(arrived, parts[1].decode(), int(parts[2]), int(parts[3]), sender)
    except ValueError:
        return None


class HeartbeatListener:
    """A UDP socket (in ``netns`` if given) recording every guest heartbeat that reaches it, in a
    thread of its own. ``port`` 0 picks a free port (``address`` tells which)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, netns: str | None = None, keep_s: float | None = None
    ) -> None:
        """``keep_s``: forget heartbeats older than that many seconds (None: keep all, for a test)."""

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, port))
            return sock

        self._sock = in_netns(netns, bind)
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._lock = threading.Lock()
        self._received: list[Heartbeat] = []
        self._keep_s = keep_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                data, sender = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            heartbeat = parse_heartbeat(data, sender, time.time())
            if heartbeat is not None:
                with self._lock:
                    self._received.append(heartbeat)
                    if (
                        self._keep_s is not None
                        and self._received[0].arrived < heartbeat.arrived - 2 * self._keep_s
                    ):
                        self._received = [
                            b for b in self._received if b.arrived >= heartbeat.arrived - self._keep_s
                        ]

    def heartbeats(self, guest: str | None = None) -> list[Heartbeat]:
        """What arrived so far (of ``guest`` only, if given), in arrival order."""
        with self._lock:
            return [beat for beat in self._received if guest is None or beat.guest == guest]

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._sock.close()


@dataclass(frozen=True)
class Blackout:
    """The network blackout around a switchover, from the heartbeats a host listener received.

    ``gap_ms``: the longest silence between two heartbeats arriving in the window around the
    switchover (what a client of the guest saw), from ``last_before`` to ``first_after`` (host
    wall-clock s). ``first_from_target``: the first heartbeat after the target resumed (s; None if
    none came). ``lost``: sequence numbers never received in the window; ``repeated``: numbers
    received twice (two copies of the guest sending at once would repeat them).
    """

    gap_ms: float
    last_before: float
    first_after: float
    first_from_target: float | None
    lost: int
    repeated: int
    received: int


def network_blackout(
    heartbeats: Iterable[Heartbeat], stopped_at: float, resumed_at: float | None, margin_s: float = 2.0
) -> Blackout:
    """The blackout of a switchover whose source stopped at ``stopped_at`` and whose target resumed
    at ``resumed_at`` (host wall-clock s, e.g. from QEMU's trace or QMP event timestamps), from the
    heartbeats arriving within ``margin_s`` before the stop to ``margin_s`` after the resume.

    Raises ``ValueError`` if fewer than two heartbeats arrived in that window.
    """
    end = (resumed_at if resumed_at is not None else stopped_at) + margin_s
    window = sorted((beat for beat in heartbeats if stopped_at - margin_s <= beat.arrived <= end), key=_at)
    if len(window) < 2:
        raise ValueError(f"only {len(window)} heartbeat(s) arrived around the switchover")
    pairs = zip(window, window[1:], strict=False)
    before, after = max(pairs, key=lambda pair: pair[1].arrived - pair[0].arrived)
    seqs = [beat.seq for beat in window]
    distinct = set(seqs)
    first_from_target = next(
        (beat.arrived for beat in window if resumed_at is not None and beat.arrived >= resumed_at), None
    )
    return Blackout(
        gap_ms=round((after.arrived - before.arrived) * 1000, 1),
        last_before=before.arrived,
        first_after=after.arrived,
        first_from_target=first_from_target,
        lost=max(seqs) - min(seqs) + 1 - len(distinct),
        repeated=len(seqs) - len(distinct),
        received=len(window),
    )


def _at(beat: Heartbeat) -> float:
    return beat.arrived
