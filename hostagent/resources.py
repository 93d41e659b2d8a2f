"""The checks every driver makes on a guest's disks and network cards against this host's pools and
networks (``hostagent.hostconfig``), before anything is created; and the pre-check of an incoming guest.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agentprotocol import GuestSpec, HostResources, Network, StoragePool, VolumeWriter
from agentprotocol.storage import DiskSpec
from hostagent.driver import Conflict, InvalidRequest
from hostagent.hostconfig import LOCAL_PREFIX, NetworkConfig, PoolConfig

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".matrixoe-mirror"  # beside a volume a target allocated and has not committed yet


@dataclass(frozen=True)
class PlannedDisk:
    """A disk of a definition, checked: its spec, its pool and the file it resolves to."""

    spec: DiskSpec
    pool: PoolConfig
    path: Path


@dataclass
class HostStorage:
    """The pools and networks of this host (``DriverSettings.pools``/``networks``)."""

    pools: list[PoolConfig] = field(default_factory=list)
    networks: list[NetworkConfig] = field(default_factory=list)
    host: str = "this host"

    def pool(self, name: str) -> PoolConfig | None:
        return next((pool for pool in self.pools if pool.name == name), None)

    def network(self, name: str) -> NetworkConfig | None:
        return next((network for network in self.networks if network.name == name), None)

    def report(self, writers: Iterable[VolumeWriter] = ()) -> HostResources:
        """``GET /v1/resources``: pools with capacity and free bytes now (``statvfs``), networks, writers."""
        pools = []
        for pool in self.pools:
            try:
                stat = os.statvfs(pool.path)
                capacity, free = stat.f_blocks * stat.f_frsize, stat.f_bavail * stat.f_frsize
            except OSError:
                capacity = free = 0  # unmounted: reported empty rather than not at all
            pools.append(
                StoragePool(
                    name=pool.name,
                    kind=pool.kind,
                    identity=pool.identity,
                    capacity_bytes=capacity,
                    free_bytes=free,
                    location=str(pool.path),
                )
            )
        networks = [Network(name=n.name, kind=n.kind, bridge=n.bridge) for n in self.networks]
        return HostResources(pools=pools, networks=networks, writers=list(writers))

    def volume_path(self, pool: PoolConfig, volume: str, device: str) -> Path:
        """The file of ``volume`` in ``pool``; InvalidRequest if it would lie outside the pool."""
        base = pool.path.resolve()
        path = (base / volume).resolve()
        if path.parent != base or volume in (".", "..") or "/" in volume:
            raise InvalidRequest(f"disk {device}: volume {volume!r} lies outside pool {pool.name}")
        return path

    def plan_disks(self, spec: GuestSpec, others: dict[Path, tuple[str, bool]]) -> list[PlannedDisk]:
        """Check a definition's disks against this host, creating nothing.

        ``others``: the volumes other guests of this host use -> (guest name, shareable). Raises
        InvalidRequest (no such pool or volume, outside the pool) or Conflict (volume exists while
        ``create``, used by another guest, no room in the pool), naming the disk.
        """
        planned, wanted_bytes = [], dict[str, int]()
        for disk in spec.disks:
            pool = self.pool(disk.pool)
            if pool is None:
                raise InvalidRequest(f"disk {disk.device}: no storage pool {disk.pool} on {self.host}")
            path = self.volume_path(pool, disk.volume, disk.device)
            user = others.get(path)
            if user is not None and not (disk.shareable and user[1]):
                raise Conflict(
                    f"disk {disk.device}: volume {disk.volume} in pool {pool.name} is used by guest {user[0]}"
                )
            if disk.create and (path.exists() or path.is_symlink()):
                raise Conflict(
                    f"disk {disk.device}: volume {disk.volume} exists in pool {pool.name} "
                    "(define the disk without create to use it)"
                )
            if not disk.create and not path.is_file():
                raise InvalidRequest(f"disk {disk.device}: no volume {disk.volume} in pool {pool.name}")
            if disk.create:
                wanted_bytes[pool.name] = wanted_bytes.get(pool.name, 0) + disk.virtual_size_bytes
            planned.append(PlannedDisk(disk, pool, path))
        self._check_room(wanted_bytes)
        return planned

    def _check_room(self, wanted_bytes: dict[str, int]) -> None:
        for name, wanted in wanted_bytes.items():
            pool = self.pool(name)
            assert pool is not None
            stat = os.statvfs(pool.path)
            free = stat.f_bavail * stat.f_frsize
            if wanted > free:
                raise Conflict(f"no room in pool {name}: new disks of {wanted} bytes, {free} bytes free")

    def check_nics(self, spec: GuestSpec, macs_in_use: dict[str, str], kinds: Iterable[str]) -> None:
        """Each card's network exists here and is of a kind the driver can plug into (``kinds``), and
        its MAC is no other guest's (``macs_in_use``: MAC -> guest name). InvalidRequest / Conflict."""
        usable = set(kinds)
        for index, nic in enumerate(spec.nics):
            network = self.network(nic.network)
            if network is None:
                raise InvalidRequest(f"nic {index}: no network {nic.network} on {self.host}")
            if network.kind not in usable:
                raise InvalidRequest(
                    f"nic {index}: network {nic.network} is of kind {network.kind}, which this driver "
                    f"cannot plug a card into"
                )
            if nic.mac in macs_in_use:
                raise Conflict(f"nic {index}: MAC {nic.mac} is used by guest {macs_in_use[nic.mac]}")

    def create_volumes(self, planned: list[PlannedDisk], make: Callable[[PlannedDisk], None]) -> None:
        """``make`` each new volume (``create``); if one fails, remove those made and re-raise."""
        made: list[Path] = []
        try:
            for disk in planned:
                if disk.spec.create:
                    make(disk)
                    made.append(disk.path)
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise

    def incoming_spec(self, spec: GuestSpec, *, mirror: bool = False) -> GuestSpec:
        """The spec of an incoming guest with its disks on this host's pools (found by identity, else by
        name), or Conflict saying which disk or card cannot come here: a pool this host does not mount,
        a disk on a local pool (unless ``mirror``), a volume it does not see, a missing network.

        ``mirror`` (``agentprotocol.LocalDisks`` "mirror"): a disk on a local pool gets a new volume of
        the same name in one of this host's local pools with room for its *virtual* size (a thin image
        grows to it), marked ``create`` (the caller makes it: ``create_volumes``); Conflict naming the
        disk if no local pool has room or a volume of that name, or if the disk is shareable or
        read-only (not mirrored). Nothing is created here.
        """
        guest, disks = spec.name, []
        wanted_bytes: dict[str, int] = {}
        for disk in spec.disks:
            if mirror and self._is_local(disk):
                pool = self._mirror_pool(disk, guest, wanted_bytes)
                wanted_bytes[pool.name] = wanted_bytes.get(pool.name, 0) + disk.virtual_size_bytes
                update = {"pool": pool.name, "pool_identity": pool.identity, "create": True}
                disks.append(disk.model_copy(update=update))
                continue
            pool = self._incoming_pool(disk, guest)
            path = self.volume_path(pool, disk.volume, disk.device)
            if not path.is_file():
                raise Conflict(
                    f"{self.host} does not see volume {disk.volume} in pool {pool.name}: {guest}'s disk "
                    f"{disk.device} (is the pool the same storage as the source's?)"
                )
            update = {"pool": pool.name, "pool_identity": pool.identity, "create": False}
            disks.append(disk.model_copy(update=update))
        for index, nic in enumerate(spec.nics):
            if self.network(nic.network) is None:
                raise Conflict(f"{self.host} has no network {nic.network}: {guest}'s nic {index}")
        return spec.model_copy(update={"disks": disks})

    def _is_local(self, disk: DiskSpec) -> bool:
        """The source's disk is on a local pool: by its identity, else by this host's pool of that name."""
        if disk.pool_identity is not None:
            return disk.pool_identity.startswith(LOCAL_PREFIX)
        pool = self.pool(disk.pool)
        return pool is not None and pool.kind == "local"

    def _mirror_pool(self, disk: DiskSpec, guest: str, wanted_bytes: dict[str, int]) -> PoolConfig:
        """The first local pool with room for ``disk``'s virtual size (besides ``wanted_bytes`` already
        planned there) and no volume of its name; Conflict saying why none fits."""
        what = f"{guest}'s disk {disk.device}"
        if disk.shareable or disk.read_only:
            kind = "shareable" if disk.shareable else "read-only"
            raise Conflict(f"a {kind} disk on a local pool is not mirrored: {what}")
        local = [pool for pool in self.pools if pool.kind == "local"]
        if not local:
            raise Conflict(f"{self.host} has no local pool to mirror {what} into")
        reasons = []
        for pool in local:
            path = self.volume_path(pool, disk.volume, disk.device)
            if path.exists() or path.is_symlink():
                reasons.append(f"pool {pool.name} has a volume {disk.volume} already")
                continue
            try:
                stat = os.statvfs(pool.path)
            except OSError as error:
                reasons.append(f"pool {pool.name} cannot be read ({error.strerror})")
                continue
            free = stat.f_bavail * stat.f_frsize - wanted_bytes.get(pool.name, 0)
            if disk.virtual_size_bytes <= free:
                return pool
            reasons.append(f"pool {pool.name} has {max(free, 0)} bytes free")
        raise Conflict(
            f"no local pool on {self.host} has room for {what} ({disk.virtual_size_bytes} bytes virtual): "
            + "; ".join(reasons)
        )

    def _incoming_pool(self, disk: DiskSpec, guest: str) -> PoolConfig:
        identity = disk.pool_identity
        if identity is not None and identity.startswith(LOCAL_PREFIX):
            raise Conflict(
                f"local disks cannot move yet: {guest}'s disk {disk.device} is on local pool {disk.pool}"
            )
        if identity is not None:
            pool = next((pool for pool in self.pools if pool.identity == identity), None)
        else:
            pool = self.pool(disk.pool)
        if pool is None:
            raise Conflict(f"{self.host} does not mount pool {disk.pool}: {guest}'s disk {disk.device}")
        if pool.kind == "local":
            raise Conflict(
                f"local disks cannot move yet: {guest}'s disk {disk.device} is on pool {pool.name}, local "
                f"to {self.host}"
            )
        return pool


def in_words(size: int) -> str:
    """``size`` bytes for people: GiB with one decimal from 1 GiB on, else whole MiB."""
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB".replace(".0 ", " ")
    return f"{size >> 20} MiB"


def delete_volumes(guest: str, volumes: dict[str, Path]) -> list[str]:
    """Delete a source's volumes of its mirrored local disks after the commit (``volumes``: device ->
    the volume's file here), once the target runs the guest on its own copies (the console releases
    the source only then). Returns the devices whose volume is gone, in ``volumes``' order (one already
    missing counts); a volume that cannot be deleted is logged with why and left out, never raised:
    the console then says it was left (``ProgressSnapshot.disks_deleted``). ``guest``: its name, for
    the log."""
    deleted = []
    for device, path in volumes.items():
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("guest %s: volume %s of disk %s not deleted: %s", guest, path, device, error)
            continue
        log.info("guest %s: deleted volume %s of mirrored disk %s", guest, path, device)
        deleted.append(device)
    return deleted


def allocated_bytes(path: Path) -> int:
    """Bytes the file takes on its pool (sparse and thin files: less than their size); 0 if gone."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError as error:
        if error.errno == errno.ENOENT:
            return 0
        raise


# -- volumes a mirror allocated on a target (both drivers) ------------------------------------


def marker_of(volume: Path) -> Path:
    """The marker file that says ``volume`` was allocated for a mirror not committed yet."""
    return volume.with_name(f".{volume.name}{MARKER_SUFFIX}")


def mark_allocated(volume: Path, migration_id: str) -> None:
    """Record that ``volume`` belongs to the uncommitted migration ``migration_id`` (the marker file
    survives a crash of the agent: ``remove_uncommitted`` deletes both at its next start)."""
    marker_of(volume).write_text(f"{migration_id}\n")


def mark_committed(volume: Path) -> None:
    """The migration completed here: the volume is the guest's now, nobody removes it."""
    marker_of(volume).unlink(missing_ok=True)


def remove_uncommitted(pool: Path) -> list[str]:
    """At the agent's start: delete every volume of ``pool`` still marked as allocated for a mirror (its
    migration is unknown to this new process, so it can never complete), and its marker. Returns the
    volume names deleted."""
    removed = []
    for marker in pool.glob(f".*{MARKER_SUFFIX}"):
        volume = marker.with_name(marker.name[1 : -len(MARKER_SUFFIX)])
        if volume.parent == pool and volume.name not in ("", ".", ".."):
            volume.unlink(missing_ok=True)
            removed.append(volume.name)
        marker.unlink(missing_ok=True)
    return removed


def remove_uncommitted_volumes(pools: Iterable[PoolConfig]) -> list[tuple[str, str]]:
    """``remove_uncommitted`` over every local pool of ``pools``, each deletion logged as a warning;
    the (pool name, volume name) pairs deleted. For a driver's start, after it re-adopted its guests."""
    removed = []
    for pool in pools:
        if pool.kind == "local":
            for volume in remove_uncommitted(pool.path):
                log.warning(
                    "removed volume %s of pool %s: allocated for a migration never completed",
                    volume,
                    pool.name,
                )
                removed.append((pool.name, volume))
    return removed
