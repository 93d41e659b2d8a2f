"""The qemu driver's mirror of a guest's disks on local pools (``LocalDisks`` "mirror").

QEMU's own live storage migration, as QEMU 10 documents it (``docs/interop/live-block-operations``,
"QMP invocation for live storage migration with drive-mirror + NBD"; its test
``tests/qemu-iotests/194``) and libvirt and Proxmox drive it: the target QEMU exports its new, empty
volume over its NBD server, the source QEMU mirrors the running disk into it with ``blockdev-mirror``,
and once the memory migration completed the source ends each mirror with ``block-job-cancel``, which
for a job that was ready "changes to BLOCK_JOB_COMPLETED, to indicate that the mirroring has ended and
the destination now has a point-in-time copy tied to the time of the cancellation" (QMP reference,
``block-job-cancel``). The guest is stopped by then, so that point in time is the switchover.

Target (``DiskExport``), once its incoming QEMU runs (``-incoming defer -S``, every node inactive):
``nbd-server-start`` on a Unix socket in a private directory (0700), with the migration's TLS
credentials (``tls.CREDS_ID``, ``endpoint=server``, ``verify-peer``) under the policy "required", and
one ``block-export-add`` per disk, ``writable``, of its format node (``<device>-fmt``). The export
activates that node (QMP reference, ``allow-inactive``: "If false, inactive block nodes are
automatically activated before creating the export"), so the target QEMU holds its new volume's
write lock from then on; the volume is a file of the target's own pool, no other QEMU's. Nobody
reaches the socket but the target agent, which relays to it each data-plane connection that
presented the migration's one-time token as ``<token> nbd <device>`` (``target.TargetMigration``):
the export is the source's alone, under either policy. The agent answers that connection's greeting
with ``OK`` and where the new volume is (``TargetVolume``: its host's name and pool), so that the
source can say where a disk ran out of room. Before the target resumes, the exports are
removed with ``mode=safe``, which QEMU refuses while a client is connected: a target whose source
still mirrors into it does not run.

Source (``SourceMirror``), in Copy, before the memory's pre-copy (Proxmox's and libvirt's order):

1. Per disk one data-plane connection to the target (``<token> nbd <device>``), handed to QEMU
   (``getfd``) as an NBD client node (``blockdev-add driver=nbd``, ``server.type=fd``; with
   ``tls-creds`` and ``tls-hostname`` = the target's data-plane address under "required": the disk
   crosses the network only inside QEMU's TLS, as the memory does). The agent keeps its own copy of
   each connection.
2. ``blockdev-mirror sync=full`` per disk, background copy mode, ``speed`` = the pair's cap.
   QEMU zeroes the target's ranges with NBD write-zeroes commands (no data) and copies the rest; a
   range the source reads as zero (``block-status``) goes as a zero write too, and the target's
   format node has ``detect-zeroes=unmap`` (``machine.Disk.detect_zeroes``): its volume stays sparse.
3. On each job's BLOCK_JOB_READY, ``block-job-change copy-mode=write-blocking`` (QEMU >= 8.2):
   from then on a guest write completes only once it reached the target too, so the copy cannot fall
   behind while the memory moves; the job says ``actively-synced`` once no dirty range is left.
4. When every job is actively synced (``disk_mirror_ready``), the memory's ``migrate`` starts.
5. At the switchover QEMU stops the vCPUs, drains and flushes every node (the NBD client's too: the
   target flushes), sends the device state and inactivates its nodes. After ``completed``, the
   agent cancels each ready job (above) and waits for BLOCK_JOB_COMPLETED without ``error`` and with
   ``offset`` = ``len``, then deletes the client nodes. Anything else aborts the migration.
6. After the commit, once the target runs the guest, the console releases the source: its QEMU quits
   and the agent deletes its volumes of the mirrored disks (``resources.delete_volumes``), named in the
   snapshot's ``disks_deleted``.

A target pool that fills up during the mirror: the target QEMU's write fails with ENOSPC, its NBD
server answers the source's write with NBD's ENOSPC error, and the job ends (``on-target-error=report``)
with QEMU's "No space left on device"; the source aborts naming the target, its pool, the disk and how
far the job got ("vsp3's pool local ran out of space at 31 GiB of 40 GiB (db01's disk vda)"), the
target at fault (``failed_side``).

An abort, a cancel or a discard before the commit: the source first shuts down its copy of every
NBD connection (a guest write waiting on an unanswered target in write-blocking mode fails over to
the source alone at once: QEMU reports the target's error to the job, ``on-target-error=report``,
never to the guest), then cancels the jobs (``force``) and deletes the client nodes. A mirror only
reads the source's disks: they stay as the guest wrote them. The target's QEMU is killed and the
volumes it allocated deleted (``resources.remove_uncommitted`` after an agent's crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from agentprotocol import Role
from hostagent.drivers.qemu.qmp import QmpClient, QmpClosed, QmpError
from hostagent.drivers.qemu.tls import CREDS_ID
from hostagent.resources import in_words

END_TIMEOUT_S = 10.0  # a job's end after block-job-cancel
TCP_INFO_LEN = 256
TCP_INFO_BYTES_ACKED = 120  # struct tcp_info's tcpi_bytes_acked (u64; Linux >= 4.1, uapi linux/tcp.h)
NO_SPACE = "No space left on device"  # strerror(ENOSPC), as QEMU words a job's error


def format_node(device: str) -> str:
    """The disk's format node (``machine.Disk``): what is mirrored and exported."""
    return f"{device}-fmt"


def job_id(device: str) -> str:
    return f"mirror-{device}"


def client_node(device: str) -> str:
    """The source's NBD client node of the target's export of ``device``."""
    return f"mirror-{device}-nbd"


def export_id(device: str) -> str:
    return f"export-{device}"


@dataclass(frozen=True)
class TargetVolume:
    """Where the target put a disk's new volume: its agent's name and the pool's (for the source's
    words when the pool fills up)."""

    host: str
    pool: str

    def answer(self) -> str:
        """The target's answer to a disk's data-plane greeting: ``OK {"host": ..., "pool": ...}``."""
        return "OK " + json.dumps({"host": self.host, "pool": self.pool})

    @classmethod
    def from_answer(cls, rest: bytes) -> TargetVolume | None:
        """The place in what followed ``OK`` (None if the target said nothing usable)."""
        try:
            fields = json.loads(rest)
            return cls(host=str(fields["host"]), pool=str(fields["pool"]))
        except (ValueError, TypeError, KeyError):
            return None


class MirrorFailed(Exception):
    """A disk's mirror could not start, ended with an error or did not end in step (the message says
    which disk and why, in QEMU's words where QEMU gave them)."""


def bytes_acked(sock: socket.socket) -> int | None:
    """Bytes of ``sock`` (TCP) the peer acknowledged, from the kernel (``TCP_INFO``); None if unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < TCP_INFO_BYTES_ACKED + 8:
        return None
    return int.from_bytes(info[TCP_INFO_BYTES_ACKED : TCP_INFO_BYTES_ACKED + 8], sys.byteorder)


async def written_bytes(qmp: QmpClient, devices: list[str]) -> int:
    """Bytes the guest wrote to ``devices`` since QEMU started (``query-blockstats`` ``wr_bytes``)."""
    total = 0
    for entry in await qmp.execute("query-blockstats"):
        qdev = str(entry.get("qdev", ""))
        device = qdev.split("/")[3] if qdev.startswith("/machine/peripheral/") else qdev
        if device in devices:
            total += int(entry.get("stats", {}).get("wr_bytes", 0))
    return total


class DiskExport:
    """The target's NBD server exporting the mirror's new volumes (module docstring, Target)."""

    def __init__(self, qmp: QmpClient, devices: list[str], *, tls: bool) -> None:
        """``devices``: the disks whose volumes this migration allocated; ``tls``: the policy is
        "required" (the migration's server credentials exist in this QEMU already)."""
        self.qmp = qmp
        self.devices = devices
        self.tls = tls
        self.joined: set[str] = set()  # devices whose connection the source made
        self._dir: str | None = None
        self.path = ""

    async def start(self) -> None:
        """Start the NBD server and export every volume, writable. Raises QmpError/QmpClosed."""
        self._dir = tempfile.mkdtemp(prefix="hostagent-nbd-")  # 0700: only this user connects
        self.path = os.path.join(self._dir, "nbd.sock")
        server: dict[str, Any] = {
            "addr": {"type": "unix", "data": {"path": self.path}},
            "max_connections": len(self.devices),
        }
        if self.tls:
            server["tls_creds"] = CREDS_ID
        await self.qmp.execute("nbd-server-start", **server)
        for device in self.devices:
            await self.qmp.execute(
                "block-export-add",
                type="nbd",
                id=export_id(device),
                node_name=format_node(device),
                writable=True,
                name=device,
            )

    async def connect(self) -> socket.socket:
        """A new connection to QEMU's NBD server (non-blocking), for the relay. Raises OSError."""
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self, timeout: float) -> None:
        """Remove every export once no client holds it, then stop the server.

        ``block-export-del`` in its default ``safe`` mode fails while a client is connected; it is
        retried until ``timeout`` s, then MirrorFailed says the source still mirrors here. Raises
        QmpClosed if QEMU is gone."""
        deadline = time.monotonic() + timeout
        for device in self.devices:
            while True:
                try:
                    await self.qmp.execute("block-export-del", id=export_id(device))
                    break
                except QmpError as error:
                    if "not found" in error.description:
                        break
                    if time.monotonic() > deadline:
                        why = f"the source is still connected to the export of disk {device}"
                        raise MirrorFailed(f"{why}: {error.description}") from None
                    await asyncio.sleep(0.02)
        with contextlib.suppress(QmpError):  # already stopped
            await self.qmp.execute("nbd-server-stop")
        self.close()

    def close(self) -> None:
        """Remove the socket's directory (idempotent; QEMU may be gone)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class MirrorJob:
    """One disk's mirror on the source: its connection (this side's copy) and QEMU's figures."""

    device: str
    sock: socket.socket
    ended: asyncio.Future[tuple[str, str | None]]  # (BLOCK_JOB_COMPLETED|CANCELLED, QEMU's error)
    place: TargetVolume | None = None  # where the target put the new volume, as it said
    attached: bool = False  # the NBD client node exists
    running: bool = False  # blockdev-mirror accepted
    ready: bool = False  # BLOCK_JOB_READY: the first pass is done
    synced: bool = False  # write-blocking, nothing left to copy (``actively-synced``)
    length: int = 0  # QEMU's ``len`` and ``offset`` (bytes)
    offset: int = 0
    wire_bytes: int = 0  # TCP bytes the target acknowledged on the connection
    changing: bool = False  # block-job-change sent


class SourceMirror:
    """The source's side of the mirror of ``devices`` (module docstring, Source)."""

    def __init__(
        self, qmp: QmpClient, devices: list[str], *, tls_hostname: str | None, speed: int, guest: str = ""
    ) -> None:
        """``tls_hostname``: the name the target's certificate must hold (policy "required"), or None
        for plain NBD ("off"); ``speed``: the jobs' cap in bytes/s (0: none); ``guest``: its name, for
        the words of a failure."""
        self.qmp = qmp
        self.devices = devices
        self.guest = guest
        self.failed_side: Role | None = None  # "target" when its pool ran out of space
        self.tls_hostname = tls_hostname
        self.speed = speed
        self.jobs: dict[str, MirrorJob] = {}
        self.synced = asyncio.Event()  # every job actively synced
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.synced_at: float | None = None
        self._written_at_start = 0
        self._throughput = 0  # bytes/s on the wire, the first pass's average once synced
        self._ending = False

    # -- starting ---------------------------------------------------------
    async def attach(self, device: str, sock: socket.socket, place: TargetVolume | None = None) -> None:
        """Give QEMU ``sock`` (a data-plane connection to the target's export of ``device``, its
        handshake answered, ``place`` what it said of the volume) as the NBD client node
        ``mirror-<device>-nbd``; this side keeps its copy. The NBD (and TLS) handshake happens here.
        Raises QmpError (refused, e.g. a certificate), QmpClosed."""
        job = MirrorJob(device, sock, asyncio.get_running_loop().create_future(), place)
        self.jobs[device] = job
        fd_name = f"nbd-{device}"
        await self.qmp.execute("getfd", pass_fd=sock.fileno(), fdname=fd_name)
        options: dict[str, Any] = {
            "driver": "nbd",
            "node_name": client_node(device),
            "server": {"type": "fd", "str": fd_name},
            "export": device,
        }
        if self.tls_hostname is not None:
            options.update(tls_creds=CREDS_ID, tls_hostname=self.tls_hostname)
        await self.qmp.execute("blockdev-add", **options)
        job.attached = True

    async def start(self) -> None:
        """``blockdev-mirror`` of every attached disk (module docstring, step 2). Raises QmpError
        (e.g. source and target sizes differ), QmpClosed."""
        self.started = time.monotonic()
        self._written_at_start = await written_bytes(self.qmp, self.devices)
        for job in self.jobs.values():
            await self.qmp.execute(
                "blockdev-mirror",
                job_id=job_id(job.device),
                device=format_node(job.device),
                target=client_node(job.device),
                sync="full",
                speed=self.speed,
            )
            job.running = True

    async def set_speed(self, speed: int) -> None:
        """A new cap for the jobs (bytes/s, 0: none). Raises QmpError, QmpClosed."""
        self.speed = speed
        for job in self.jobs.values():
            if job.running and not job.ended.done():
                await self.qmp.execute("block-job-set-speed", device=job_id(job.device), speed=speed)

    # -- running ----------------------------------------------------------
    def job_of(self, event: dict[str, Any]) -> MirrorJob | None:
        """The job a QMP event is about, if it is one of this mirror's."""
        device = str(event.get("data", {}).get("device") or event.get("data", {}).get("id") or "")
        return next((job for job in self.jobs.values() if job_id(job.device) == device), None)

    async def handle_event(self, event: dict[str, Any]) -> None:
        """BLOCK_JOB_READY: switch the job to write-blocking; a job's end: record it, and fail the
        mirror if it ended before ``finish`` asked. Raises QmpError/QmpClosed (block-job-change)."""
        job = self.job_of(event)
        name = event.get("event")
        if job is None:
            return
        data = event.get("data", {})
        if name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            job.length, job.offset = int(data.get("len", job.length)), int(data.get("offset", job.offset))
            error = data.get("error")
            if not job.ended.done():
                job.ended.set_result((str(name), str(error) if error is not None else None))
            if not self._ending and not self.failed.done():
                early = "cancelled" if name == "BLOCK_JOB_CANCELLED" else "ended before the switchover"
                if NO_SPACE in str(error):
                    self.failed_side = "target"
                self.failed.set_result(self.describe(job, str(error or early)))
        elif name == "BLOCK_JOB_READY" and not job.changing:
            job.ready, job.changing = True, True
            await self.qmp.execute(
                "block-job-change", id=job_id(job.device), type="mirror", copy_mode="write-blocking"
            )

    def describe(self, job: MirrorJob, why: str) -> str:
        """The failure in words, with how far the job got: a full target pool as the simulated target
        says it ("vsp3's pool local ran out of space at 31 GiB of 40 GiB (db01's disk vda)")."""
        at = f"{in_words(job.offset)} of {in_words(job.length)}"
        disk = f"{self.guest}'s disk {job.device}" if self.guest else f"disk {job.device}"
        if NO_SPACE in why:
            where = f"{job.place.host}'s pool {job.place.pool}" if job.place else "the target's pool"
            return f"{where} ran out of space at {at} ({disk})"
        return f"the mirror of {disk} failed at {at}: {why}"

    async def poll(self) -> dict[str, Any]:
        """QEMU's figures now, as the snapshot's ``disk_*`` fields (``agentprotocol.ProgressSnapshot``).

        ``disk_bytes_total``/``sent``/``remaining``: the jobs' ``len``, ``offset`` and the rest (QEMU
        counts ranges it zeroes on the target, no data sent, as copied); ``disk_throughput_bytes_s``:
        bytes the target acknowledged on the NBD connections (``TCP_INFO``) per second since the
        mirror began, held at its value once every job is synced; ``disk_dirty_rate_bytes_s``: bytes
        the guest wrote to the disks per second since then (``query-blockstats``). Raises QmpError,
        QmpClosed."""
        entries = {str(entry.get("device")): entry for entry in await self.qmp.execute("query-block-jobs")}
        for job in self.jobs.values():
            entry = entries.get(job_id(job.device))
            if entry is not None:
                job.length, job.offset = int(entry.get("len", 0)), int(entry.get("offset", 0))
                # QEMU keeps a job actively synced once it is (it stands by while the guest's disks drain)
                job.synced = job.synced or bool(entry.get("actively-synced"))
            acked = bytes_acked(job.sock)
            if acked is not None:
                job.wire_bytes = acked
        elapsed = max(time.monotonic() - self.started, 1e-3)
        wire = sum(job.wire_bytes for job in self.jobs.values())
        if self.synced_at is None:
            self._throughput = round(wire / elapsed)
        if self.jobs and all(job.synced for job in self.jobs.values()) and not self.synced.is_set():
            self.synced_at = time.monotonic()
            self.synced.set()
        written = await written_bytes(self.qmp, self.devices) - self._written_at_start
        return {
            "disk_bytes_total": sum(job.length for job in self.jobs.values()),
            "disk_bytes_sent": sum(job.offset for job in self.jobs.values()),
            "disk_bytes_remaining": sum(max(0, job.length - job.offset) for job in self.jobs.values()),
            "disk_throughput_bytes_s": self._throughput,
            "disk_dirty_rate_bytes_s": max(0, round(written / elapsed)),
            "disk_mirror_ready": self.synced.is_set(),
        }

    @property
    def wire_bytes(self) -> int:
        """Bytes the target acknowledged on all the mirror's connections (as last polled)."""
        return sum(job.wire_bytes for job in self.jobs.values())

    # -- ending -----------------------------------------------------------
    async def finish(self, timeout: float = END_TIMEOUT_S) -> None:
        """At Frozen (QEMU completed the memory migration: the guest stopped, its disks drained and
        flushed): end every job with ``block-job-cancel`` (module docstring, step 5), then delete the
        client nodes. Raises MirrorFailed naming the disk if a job was not in step, ended otherwise
        than BLOCK_JOB_COMPLETED without error and with ``offset`` = ``len``, or did not end in
        ``timeout`` s; QmpClosed if QEMU is gone."""
        self._ending = True
        await self.poll()
        for job in self.jobs.values():
            if job.ended.done():
                continue
            if not job.synced:
                raise MirrorFailed(self.describe(job, "it was not in step at the switchover"))
            try:
                await self.qmp.execute("block-job-cancel", device=job_id(job.device))
            except QmpError as refused:
                raise MirrorFailed(self.describe(job, refused.description)) from None
        deadline = time.monotonic() + timeout
        for job in self.jobs.values():
            try:
                name, error = await asyncio.wait_for(
                    asyncio.shield(job.ended), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise MirrorFailed(self.describe(job, f"it did not end within {timeout:g} s")) from None
            if name != "BLOCK_JOB_COMPLETED" or error is not None or job.offset != job.length:
                raise MirrorFailed(self.describe(job, error or f"{name} at the switchover"))
        await self._detach()

    async def abort(self) -> None:
        """Stop mirroring now (module docstring, last paragraph); never raises for QEMU's errors.

        What QEMU holds is read back from it, not from this object's flags: a command in flight when
        the abort came (``blockdev-add``, ``blockdev-mirror``) may have made its node or job anyway."""
        self._ending = True
        for job in self.jobs.values():
            with contextlib.suppress(OSError):
                job.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(QmpError, QmpClosed):
            await remove_mirrors(self.qmp, [job_id(device) for device in self.devices])
        self.close()

    async def _detach(self) -> None:
        """Delete the NBD client nodes (closing one flushes the target) and close this side's copies."""
        for job in self.jobs.values():
            if job.attached:
                await self.qmp.execute("blockdev-del", node_name=client_node(job.device))
                job.attached = False
        self.close()

    def close(self) -> None:
        for job in self.jobs.values():
            job.sock.close()


async def remove_mirrors(qmp: QmpClient, jobs: list[str] | None = None) -> list[str]:
    """Cancel (``force``) the mirror jobs ``jobs`` (None: every ``mirror-*`` job, as a re-adopted
    source's QEMU may hold from an interrupted migration), wait for their end (``END_TIMEOUT_S`` at
    most) and delete their NBD client nodes, so no guest write waits on a target any longer; the
    guest keeps its own disks, which a mirror only reads. Returns the jobs cancelled. Raises
    QmpClosed."""

    def ours(name: str) -> bool:
        return name in jobs if jobs is not None else name.startswith("mirror-")

    cancelled = []
    for entry in await qmp.execute("query-block-jobs"):
        name = str(entry.get("device", ""))
        if entry.get("type") == "mirror" and ours(name):
            with contextlib.suppress(QmpError):  # it may have ended meanwhile
                await qmp.execute("block-job-cancel", device=name, force=True)
            cancelled.append(name)
    deadline = time.monotonic() + END_TIMEOUT_S
    while cancelled and time.monotonic() < deadline:
        if not any(str(entry.get("device")) in cancelled for entry in await qmp.execute("query-block-jobs")):
            break
        await asyncio.sleep(0.02)
    for node in await qmp.execute("query-named-block-nodes", flat=True):
        name = str(node.get("node-name", ""))
        if name.endswith("-nbd") and ours(name.removesuffix("-nbd")):
            with contextlib.suppress(QmpError):
                await qmp.execute("blockdev-del", node_name=name)
    return cancelled
