"""Several libvirt daemons on one machine, each acting as a host of its own (tests, demo, bench).

libvirt's system daemon keeps its state at fixed paths (``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt``) and refuses a loopback
address for migration (``migration_address``/``migration_host``: "must not be the address of the
local machine"). So each host here is one ``libvirtd`` in namespaces of its own:

- **mount**: its own directories bind-mounted over those five paths (what QEMU writes under
  ``/var/log/libvirt`` lands in that host's ``log/``, a serial console file too);
- **network**: a network namespace with one address on a private bridge of this machine
  (``198.18.0.0/24``, the benchmarking range; nothing is routed and the bridge has no address, so
  the rest of the machine cannot reach a migration port), where QEMU listens for and sends its
  migration stream; QEMU's default migration ports need no per-host range;
- **UTS**: its own host name (the host's name).

Each daemon has its own ``host_uuid`` (else libvirt refuses a migration "to the same host") and a
Unix socket outside the bind mounts, owner root, mode 0700, ``auth_unix_rw = "none"``: only root
on this machine can use it, the same rule as the system socket's. The source daemon of a
peer-to-peer migration opens the target's socket itself (``qemu+unix:///system?socket=...``): no
TCP, TLS or SASL listener of libvirt's own. The layout under ``root/<name>/``::

    etc/ run/ lib/ log/ cache/     bind-mounted over libvirt's paths (domains' XML in etc/qemu/)
    sock/libvirt-sock              the host's libvirt URI: ``host.uri``
    libvirtd.pid  libvirtd.log     the daemon's pid file and its own output

Needs root (mount, network namespaces, a bridge), ``ip`` and ``unshare``, and libvirt >= 11
(``scripts/install_libvirt.sh``). QEMU runs as libvirt's default user ``libvirt-qemu`` with
libvirt's default dynamic ownership: libvirt chowns what a domain uses while it runs (disks,
kernel, initrd) and gives it back after. So a domain's kernel and initrd go into each host's
``/var/lib/libvirt/boot`` (``install_boot_files``), never shared from elsewhere: the same path on
both hosts, as on two real hosts. No security driver (neither AppArmor nor SELinux runs here), no
cgroups (no systemd here, and this machine's cgroup v1 tree is not libvirt's to manage), QEMU's
output to files (no virtlogd). ``root/shared/`` is declared a shared file system to both
(``shared_filesystems``), as NFS would be: disks there migrate without copying. QEMU's migration
TLS (``VIR_MIGRATE_TLS``) uses one certificate per host from the rig's CA in ``root/pki/``
(``devtools.pki``), naming the host's address.

``python -m devtools.libvirt_hosts start|stop ROOT NAME...`` does the same by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools import pki

BRIDGE_SUBNET = "198.18.0"
BIND_MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
PACKAGE_DIRS = {
    "etc/qemu": 0o755,
    "lib/qemu": 0o750,
    "lib/images": 0o711,
    "log/qemu": 0o755,
    "cache/qemu": 0o711,
}
TLS_DIR = "/etc/libvirt/pki/qemu"  # in a host's etc/: QEMU's migration TLS files (VIR_MIGRATE_TLS)
QEMU_USER = "libvirt-qemu"  # Debian's default user (and group) for QEMU processes of the system daemon
START_TIMEOUT_S = 60.0  # a cold start probes QEMU's capabilities: 8-25 s on 2 busy cores under TCG


HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")
CACHE_SEED = Path(__file__).resolve().parent.parent / "var" / "libvirt-capabilities"


class LibvirtHostError(RuntimeError):
    """A libvirt host could not be set up or started; the message says which step and why."""


def libvirt_missing() -> str | None:
    """Why libvirt hosts cannot run here (None: they can): not root, or a tool or libvirt missing."""
    if os.geteuid() != 0:
        return "libvirt hosts need root (mount and network namespaces, a bridge)"
    for tool in ("libvirtd", "ip", "unshare"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} not found; run scripts/install_libvirt.sh"
    return None


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise LibvirtHostError(f"{' '.join(args)}: {result.stderr.strip() or result.returncode}")


def _tag(root: Path) -> str:
    """Six hex digits from ``root``: names this rig's bridge, interfaces and namespaces."""
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:6]


@dataclass(frozen=True)
class LibvirtHost:
    """One libvirt daemon acting as a host: its name, directories, address and URI."""

    name: str
    index: int  # 1-based: the host's address is BRIDGE_SUBNET.<index>
    root: Path  # the rig's root; this host's directories are under root/<name>

    @property
    def base(self) -> Path:
        return self.root / self.name

    @property
    def socket(self) -> Path:
        return self.base / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The libvirt URI of this host, usable from anywhere on this machine (as root)."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def address(self) -> str:
        """Where this host's QEMU listens for incoming migrations (in its network namespace)."""
        return f"{BRIDGE_SUBNET}.{self.index}"

    @property
    def host_uuid(self) -> str:
        """Stable for the same root and name, so a restarted daemon is the same host."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"matrixoe-libvirt:{self.root.resolve()}:{self.name}"))

    @property
    def netns(self) -> str:
        return f"mxlv-{_tag(self.root)}-{self.name}"

    @property
    def veth(self) -> str:
        return f"mxlv{_tag(self.root)}h{self.index}"  # the bridge's end; at most 15 characters

    @property
    def log_dir(self) -> Path:
        """This host's /var/log/libvirt: qemu/<domain>.log, and serial console files put there."""
        return self.base / "log"

    @property
    def boot_dir(self) -> Path:
        """This host's /var/lib/libvirt/boot: kernels and initrds for its domains (``install_boot_files``)."""
        return self.base / "lib" / "boot"

    @property
    def pid_file(self) -> Path:
        return self.base / "libvirtd.pid"

    def serial(self, domain: str) -> str:
        """What ``domain``'s serial console said on this host (``memwriter_domain_xml`` puts it there)."""
        try:
            return (self.log_dir / "qemu" / f"{domain}.serial").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def memory_checks(self, domain: str) -> tuple[int, int]:
        """memwriter's (passed, failed) full checks of its memory while ``domain`` ran on this host."""
        text = self.serial(domain)
        return text.count("memwriter: selfcheck ok"), text.count("memwriter: selfcheck FAIL")

    def qemu_pid(self, domain: str) -> int | None:
        """The pid of ``domain``'s QEMU on this host while it runs (libvirt's pid file), or None."""
        try:
            pid = int((self.base / "run" / "qemu" / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_process(pid, b"qemu-system") else None

    def daemon_pid(self) -> int | None:
        """The running libvirtd's pid, or None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _is_process(pid, b"libvirtd") else None

    def qemu_pids(self) -> list[int]:
        """Pids of the QEMU processes this host's daemon started that still run."""
        pids = []
        for pid_file in (self.base / "run" / "qemu").glob("*.pid"):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _is_process(pid, b"qemu-system"):
                pids.append(pid)
        return pids


def _is_process(pid: int, command: bytes) -> bool:
    try:
        return command in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _libvirtd_conf(host: LibvirtHost) -> str:
    return f"""\
unix_sock_dir = "{host.socket.parent}"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
listen_tcp = 0
listen_tls = 0
host_uuid = "{host.host_uuid}"
log_outputs = "3:stderr"
"""


def _qemu_conf(host: LibvirtHost) -> str:
    return f"""\
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_address = "{host.address}"
migration_host = "{host.address}"
shared_filesystems = [ "{host.root / "shared"}" ]
migrate_tls_x509_cert_dir = "{TLS_DIR}"
migrate_tls_x509_verify = 1
"""


class LibvirtHosts:
    """Start, find and stop a rig of libvirt hosts under ``root`` (root only).

    ``with LibvirtHosts(root, ["a", "b"]) as hosts: hosts["a"].uri``. ``start()`` first removes
    what an earlier rig with the same root left (daemons, QEMU, namespaces, interfaces); ``stop()``
    stops every daemon, then kills the QEMU they started (a libvirtd that stops leaves its guests
    running, as on a real host), then removes the namespaces, interfaces and bridge.
    Raises LibvirtHostError naming the step that failed.
    """

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        if len(names) > 250 or len(set(names)) != len(names):
            raise ValueError(f"host names must be unique, at most 250: {names}")
        for name in names:
            if not HOST_NAME.fullmatch(name):
                raise ValueError(f"a host name is a letter, then up to 19 of a-z, 0-9, '-': {name!r}")
        self.root = root.resolve()
        if len(str(self.root)) > 80:  # a Unix socket's path has at most 107 bytes
            raise ValueError(f"the rig's root path is too long for libvirt's socket under it: {self.root}")
        self.hosts = {name: LibvirtHost(name, index, self.root) for index, name in enumerate(names, 1)}
        self.bridge = f"mxlv{_tag(self.root)}br"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def __getitem__(self, name: str) -> LibvirtHost:
        return self.hosts[name]

    def __enter__(self) -> LibvirtHosts:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        missing = libvirt_missing()
        if missing:
            raise LibvirtHostError(missing)
        self.stop()
        (self.root / "shared").mkdir(parents=True, exist_ok=True)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            self._prepare(host)
            self.start_daemon(host)
        for host in self.hosts.values():
            self.wait_ready(host)
        self._save_capabilities_cache()

    def install_boot_files(self, *paths: Path) -> None:
        """Copy ``paths`` (kernel, initrd) into every host's /var/lib/libvirt/boot under their own names."""
        for host in self.hosts.values():
            host.boot_dir.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copyfile(path, host.boot_dir / path.name)

    def _seed_capabilities_cache(self, host: LibvirtHost) -> None:
        """A cold daemon probes QEMU for its capabilities (~8 s on 2 cores under TCG, twice that
        under load) and caches them; a cache from an earlier rig is copied in first. libvirt checks
        it against QEMU's binary and its own version and probes again when either changed."""
        target = host.base / "cache" / "qemu" / "capabilities"
        if CACHE_SEED.is_dir() and not any(target.glob("*.xml")):
            shutil.copytree(CACHE_SEED, target, dirs_exist_ok=True)

    def _save_capabilities_cache(self) -> None:
        first = next(iter(self.hosts.values()))
        source = first.base / "cache" / "qemu" / "capabilities"
        if any(source.glob("*.xml")) and not CACHE_SEED.is_dir():
            temporary = CACHE_SEED.with_name(f"{CACHE_SEED.name}.{os.getpid()}")
            shutil.copytree(source, temporary)
            try:
                temporary.rename(CACHE_SEED)  # atomic: concurrent rigs never read half a copy
            except OSError:
                shutil.rmtree(temporary, ignore_errors=True)  # another rig saved it first

    def _prepare(self, host: LibvirtHost) -> None:
        for target in BIND_MOUNTS.values():
            # The mount points: /run is a tmpfs, so /run/libvirt (made by the package's tmpfiles at boot,
            # with no systemd here) is gone after the container restarts. Empty, nothing lands in them.
            Path(target).mkdir(parents=True, exist_ok=True)
        for directory in (*BIND_MOUNTS, "sock"):
            (host.base / directory).mkdir(parents=True, exist_ok=True)
        for directory, mode in PACKAGE_DIRS.items():  # what the packages create under libvirt's paths
            (host.base / directory).mkdir(exist_ok=True)
            (host.base / directory).chmod(mode)
        shutil.chown(host.base / "lib" / "qemu", QEMU_USER, QEMU_USER)
        self._seed_capabilities_cache(host)
        (host.base / "etc" / "libvirtd.conf").write_text(_libvirtd_conf(host))
        (host.base / "etc" / "qemu.conf").write_text(_qemu_conf(host))
        (host.base / "sock").chmod(0o700)
        others = "".join(f"{other.address} {other.name}\n" for other in self.hosts.values())
        (host.base / "hosts").write_text(f"127.0.0.1 localhost\n{others}")
        self._install_tls(host)
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
        inside = ("ip", "netns", "exec", host.netns, "ip")
        _run(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run(*inside, "link", "set", "eth0", "up")
        _run(*inside, "link", "set", "lo", "up")

    def _install_tls(self, host: LibvirtHost) -> None:
        """QEMU's migration TLS files from the rig's CA: one certificate naming the host's address
        and name, in both roles (server when it receives, client when it sends). QEMU runs as
        ``libvirt-qemu`` and reads them itself: the key is root's, readable by that group only."""
        issued = pki.ensure_agent_cert(self.root / "pki", f"libvirt-{host.name}", (host.address, host.name))
        tls_dir = host.base / "etc" / Path(TLS_DIR).relative_to("/etc/libvirt")
        tls_dir.mkdir(parents=True, exist_ok=True)
        for source, names in (
            (issued.ca, ("ca-cert.pem",)),
            (issued.cert, ("server-cert.pem", "client-cert.pem")),
            (issued.key, ("server-key.pem", "client-key.pem")),
        ):
            for name in names:
                shutil.copyfile(source, tls_dir / name)
                shutil.chown(tls_dir / name, "root", QEMU_USER)
                (tls_dir / name).chmod(0o640 if name.endswith("key.pem") else 0o644)

    def start_daemon(self, host: LibvirtHost) -> None:
        """Start ``host``'s libvirtd (its namespaces already exist), without waiting for it."""
        mounts = "; ".join(
            f"mount --bind {host.base / directory} {target}" for directory, target in BIND_MOUNTS.items()
        )
        mounts += f"; mount --bind {host.base / 'hosts'} /etc/hosts"
        script = f"set -e; {mounts}; hostname {host.name}; exec libvirtd --pid-file {host.pid_file}"
        command = ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c", script]
        with open(host.base / "libvirtd.log", "ab") as log:
            self.processes[host.name] = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, host: LibvirtHost, timeout: float = START_TIMEOUT_S) -> None:
        """Until ``host``'s daemon answers on its socket; raises LibvirtHostError with its log."""
        deadline = time.monotonic() + timeout
        process = self.processes.get(host.name)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                break
            if host.socket.exists() and _answers(host):
                return
            time.sleep(0.1)
        tail = (host.base / "libvirtd.log").read_text(errors="replace")[-2000:]
        raise LibvirtHostError(f"libvirtd of host {host.name} did not answer on {host.socket}:\n{tail}")

    def stop_daemon(self, host: LibvirtHost, signum: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal ``host``'s libvirtd and wait until it exited (SIGKILL after ``timeout``)."""
        pid = host.daemon_pid()
        if pid is None:
            return
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while _is_process(pid, b"libvirtd") and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_process(pid, b"libvirtd"):
            os.kill(pid, signal.SIGKILL)
        process = self.processes.pop(host.name, None)
        if process is not None:
            process.wait(timeout=10)

    def stop(self) -> None:
        for host in self.hosts.values():
            self.stop_daemon(host)
            for pid in host.qemu_pids():
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def cut_link(self, name: str) -> None:
        """Take ``name``'s network interface down: its migration streams stall (a cable pulled)."""
        _run("ip", "link", "set", self.hosts[name].veth, "down")

    def restore_link(self, name: str) -> None:
        _run("ip", "link", "set", self.hosts[name].veth, "up")


def memwriter_domain_xml(
    name: str, memory_mib: int = 256, dirty_pages_per_s: int = 2000, uuid: str | None = None
) -> str:
    """The QEMU test guest (``scripts/build_test_guest.sh``) as an admin would define it in libvirt
    (``uuid``: the domain's; libvirt makes one when None).

    TCG (``type='qemu'``), kernel and initrd from the host's /var/lib/libvirt/boot
    (``install_boot_files``), memwriter filling all but 96 MiB (the kernel's) and rewriting
    ``dirty_pages_per_s`` random pages; its serial console goes to the host's
    ``log/qemu/<name>.serial`` (``LibvirtHost.serial``).
    """
    written_mib = max(16, memory_mib - 96)
    cmdline = f"console=ttyS0 panic=-1 quiet memwriter.mib={written_mib} memwriter.rate={dirty_pages_per_s}"
    identity = f"\n  <uuid>{uuid}</uuid>" if uuid else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>{identity}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/var/lib/libvirt/boot/vmlinuz</kernel>
    <initrd>/var/lib/libvirt/boot/initramfs.cpio.gz</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='/var/log/libvirt/qemu/{name}.serial'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def _answers(host: LibvirtHost) -> bool:
    """libvirtd accepted a connection and answered a version query (virsh, so no binding needed)."""
    result = subprocess.run(
        ["virsh", "-c", host.uri, "version", "--daemon"], capture_output=True, text=True, timeout=30
    )
    return result.returncode == 0


@contextmanager
def libvirt_hosts(root: Path, names: Sequence[str]) -> Iterator[LibvirtHosts]:
    """The rig as a context manager: started on entry, everything stopped and removed on exit."""
    hosts = LibvirtHosts(root, names)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("root", type=Path)
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    hosts = LibvirtHosts(args.root, args.names)
    if args.action == "stop":
        hosts.stop()
        return 0
    hosts.start()
    for host in hosts.hosts.values():
        print(f"{host.name}: {host.uri}  (migration address {host.address}, host UUID {host.host_uuid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
