"""One QEMU process running one guest: launch, QMP, serial console, stop.

A guest boots either the built-in test guest (a kernel and initramfs from
``scripts/build_test_guest.sh``, workload memwriter) or, when its ``Machine`` has a boot disk, from
its own disk image (``scripts/build_guest_image.sh``, workload guestload; see ``machine``). The
workload reports on the serial console, which goes to a file per process so a test or an admin can
read what the guest said after a migration. Each QEMU also writes a trace file (``quiesce``) with
its run-state changes, from which the switchover's stop, drain and resume are timed.

A guest outlives its agent's own death, as a real host's guests outlive their management agent:
QEMU runs in the agent's process group (a stop of the whole service, ``kill`` of the group, ends
it) but not tied to the agent's process, so a ``kill -9`` of the agent alone leaves it running, and
the agent's next start re-adopts it (``QemuProcess.adopt``: by its pid and its QMP socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hostagent.drivers.qemu import guestload
from hostagent.drivers.qemu.machine import GUESTLOAD_FW_CFG, BridgeNetwork, Machine, qemu_escape, tap_name
from hostagent.drivers.qemu.network import open_tap
from hostagent.drivers.qemu.qmp import QmpClient, QmpClosed, QmpError
from hostagent.drivers.qemu.quiesce import LAUNCH_TRACE_EVENTS

MIN_QEMU_MAJOR = 10
KERNEL_OVERHEAD_MIB = 96
MIN_GUEST_MIB = 128

_ALIVE = re.compile(rb"memwriter: alive t=(\d+) writes=(\d+)")
_CHECK_OK = re.compile(rb"memwriter: selfcheck ok")
_CHECK_FAIL = re.compile(rb"memwriter: selfcheck FAIL")


class QemuTooOld(RuntimeError):
    pass


@dataclass(frozen=True)
class QemuConfig:
    binary: str
    kernel: Path
    initramfs: Path
    run_dir: Path
    accel: str = "tcg"


@dataclass(frozen=True)
class Workload:
    memory_mib: int
    vcpus: int
    dirty_pages_per_s: int

    @property
    def written_mib(self) -> int:
        """memwriter fills what the kernel leaves free."""
        return max(16, self.memory_mib - KERNEL_OVERHEAD_MIB)


def qemu_version(binary: str) -> tuple[int, int, int]:
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", output)
    if not found:
        raise QemuTooOld(f"cannot read the version of {binary}: {output[:80]!r}")
    major, minor, micro = (int(part) for part in found.groups())
    return major, minor, micro


def check_qemu(binary: str) -> str:
    """Refuse QEMU < 10: Debian 12's 7.2 corrupts guests that write memory while they migrate."""
    try:
        version = qemu_version(binary)
    except (OSError, subprocess.CalledProcessError) as error:
        raise QemuTooOld(
            f"QEMU not found ({binary}: {error}); install it with scripts/install_qemu.sh"
        ) from error
    text = ".".join(map(str, version))
    if version[0] < MIN_QEMU_MAJOR:
        raise QemuTooOld(
            f"QEMU {text} found at {binary}, but the qemu driver needs QEMU >= {MIN_QEMU_MAJOR}: older QEMU "
            "(Debian 12's 7.2) corrupts the memory of a guest that writes during live migration. "
            "Install QEMU 10 from bookworm-backports with scripts/install_qemu.sh."
        )
    return text


def pid_alive(pid: int) -> bool:
    """The process ``pid`` exists and is not a zombie (an adopted QEMU is not this process's child)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_qemu_of(pid: int, binary: str, name: str) -> bool:
    """``pid`` is a QEMU (``binary``) started for guest ``name`` (``-name <name>``): not a reused pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not argv or Path(argv[0].decode(errors="replace")).name != Path(binary).name:
        return False
    return any(argv[i] == b"-name" and argv[i + 1] == name.encode() for i in range(len(argv) - 1))


class QemuProcess:
    """A QEMU process for one guest; ``incoming`` ones start paused, waiting for a migration."""

    def __init__(
        self,
        config: QemuConfig,
        name: str,
        workload: Workload,
        instance: str,
        incoming: bool,
        machine: Machine | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.workload = workload
        self.incoming = incoming
        self.instance = instance
        self.machine = machine or Machine()
        stem = f"{name}.{instance}"
        self.qmp_path = config.run_dir / f"{stem}.qmp"
        self.serial_path = config.run_dir / f"{stem}.serial"
        self.log_path = config.run_dir / f"{stem}.log"
        self.trace_path = config.run_dir / f"{stem}.trace"
        self.command_path = config.run_dir / f"{stem}.cmd"  # the OS image guest's command port (ttyS1)
        self.guest_config_path = config.run_dir / f"{stem}.guestload.conf"
        self.process: asyncio.subprocess.Process | None = None
        self.adopted_pid: int | None = None  # a QEMU started by an earlier run of the agent
        self.qmp: QmpClient | None = None

    @classmethod
    async def adopt(
        cls,
        config: QemuConfig,
        name: str,
        workload: Workload,
        instance: str,
        incoming: bool,
        pid: int,
        machine: Machine | None = None,
    ) -> QemuProcess:
        """The QEMU an earlier run of the agent started (its pid and QMP socket in ``run_dir``), with a
        new QMP connection. Raises ``RuntimeError`` if it is gone or is not that guest's QEMU."""
        process = cls(config, name, workload, instance, incoming, machine)
        if not (pid_alive(pid) and is_qemu_of(pid, config.binary, name)):
            raise RuntimeError(f"QEMU of {name} (pid {pid}) is no longer running")
        process.adopted_pid = pid
        try:
            process.qmp = await QmpClient.connect(str(process.qmp_path), timeout=5.0)
        except Exception as error:
            raise RuntimeError(f"QEMU of {name} (pid {pid}): no QMP on {process.qmp_path}: {error}") from None
        return process

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return self.adopted_pid

    async def wait(self) -> None:
        """Until QEMU exited (an adopted one is polled: it is not this process's child)."""
        if self.process is not None:
            await self.process.wait()
            return
        while self.adopted_pid is not None and pid_alive(self.adopted_pid):
            await asyncio.sleep(0.2)

    def command(self, tap_fds: tuple[int, ...] = ()) -> list[str]:
        """QEMU's command line; ``tap_fds``: one open tap per bridged network card, in card order."""
        command = [
            self.config.binary,
            "-name", self.name,
            "-machine", "q35",
            "-accel", self.config.accel,
            "-m", str(self.workload.memory_mib),
            "-smp", str(self.workload.vcpus),
            "-nodefaults", "-nographic", "-no-reboot",
            "-display", "none",
            "-monitor", "none",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-msg", "timestamp=on",
            "-D", str(self.trace_path),
        ]  # fmt: skip
        for event in LAUNCH_TRACE_EVENTS:
            command += ["-trace", f"enable={event}"]
        machine = self.machine
        if machine.boots_from_disk:
            command += ["-serial", f"unix:{self.command_path},server=on,wait=off"]  # ttyS1: commands
            config_file = qemu_escape(str(self.guest_config_path))
            command += ["-fw_cfg", f"name={GUESTLOAD_FW_CFG},file={config_file}"]
        else:
            cmdline = (
                f"console=ttyS0 panic=-1 quiet memwriter.mib={self.workload.written_mib} "
                f"memwriter.rate={self.workload.dirty_pages_per_s}"
            )
            command += ["-kernel", str(self.config.kernel), "-initrd", str(self.config.initramfs)]
            command += ["-append", cmdline]
        for disk in machine.disks:
            command += disk.args()
        taps = iter(tap_fds)
        for index, nic in enumerate(machine.nics):
            command += nic.args(index, next(taps) if isinstance(nic.network, BridgeNetwork) else None)
        if self.incoming:
            command += ["-incoming", "defer", "-S"]
        return command

    def _open_taps(self) -> list[int]:
        """A tap on its bridge for each bridged card (``network.open_tap``); the caller closes them."""
        fds: list[int] = []
        try:
            for index, nic in enumerate(self.machine.nics):
                if isinstance(nic.network, BridgeNetwork):
                    name = tap_name(self.name, self.instance, index)
                    fds.append(open_tap(name, nic.network.bridge, nic.network.netns, nic.mac))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    async def launch(self) -> QmpClient:
        for stale in (self.qmp_path, self.serial_path, self.command_path, self.trace_path):
            stale.unlink(missing_ok=True)
        if self.machine.boots_from_disk:
            self.guest_config_path.write_text(self.machine.guest_config_text())
        tap_fds = await asyncio.to_thread(self._open_taps)
        try:
            with self.log_path.open("wb") as log:
                self.process = await asyncio.create_subprocess_exec(
                    *self.command(tuple(tap_fds)),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=tap_fds,
                )
        finally:
            for fd in tap_fds:  # QEMU holds its own copies; the taps live as long as QEMU
                os.close(fd)
        try:
            self.qmp = await QmpClient.connect(str(self.qmp_path), timeout=10.0)
        except Exception:
            await self.kill()
            raise RuntimeError(f"QEMU for {self.name} did not start: {self.log_tail()}") from None
        return self.qmp

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return self.adopted_pid is not None and pid_alive(self.adopted_pid)

    async def power_down(self, timeout: float) -> bool:
        """Press the ACPI power button (``system_powerdown``) and wait up to ``timeout`` s for the guest
        to power off, which ends QEMU; True if it did. The caller quits or kills it otherwise."""
        if not self.running or self.process is None:
            return True
        if self.qmp is None or self.qmp.closed.is_set():
            return False
        with contextlib.suppress(QmpError, QmpClosed):
            await self.qmp.execute("system_powerdown")
        try:
            await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout)
        except TimeoutError:
            return False
        return True

    async def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to quit, kill it if it does not."""
        if self.running and self.qmp is not None and not self.qmp.closed.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), timeout)
        if self.pid is not None:
            try:
                await asyncio.wait_for(self.wait(), timeout)
            except TimeoutError:
                await self.kill()
        await self._close_qmp()

    async def kill(self) -> None:
        pid = self.pid
        if self.running and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await self.wait()
        await self._close_qmp()

    async def _close_qmp(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        self.qmp_path.unlink(missing_ok=True)

    def serial_text(self, limit: int = 1_000_000) -> bytes:
        try:
            with self.serial_path.open("rb") as serial:
                serial.seek(0, 2)
                size = serial.tell()
                serial.seek(max(0, size - limit))
                return serial.read()
        except FileNotFoundError:
            return b""

    async def request_selfcheck(self, tag: str, timeout: float = 60.0) -> guestload.SelfCheck:
        """The OS image guest's self-check, now (``guestload.request_selfcheck``). Raises
        ``guestload.SelfCheckError`` (also for the test guest, which has no command port)."""
        if not self.machine.boots_from_disk:
            raise guestload.SelfCheckError(f"{self.name} runs the test guest, which has no command port")
        return await guestload.request_selfcheck(self.command_path, tag, timeout)

    def workload_report(self) -> dict[str, object]:
        """What the guest's own workload last said on its serial console."""
        text = self.serial_text()
        if self.machine.boots_from_disk:
            report = guestload.workload_report(text)
            report.update(written_mib=self.workload.written_mib, serial_log=str(self.serial_path))
            report.update(dirty_pages_per_s=self.workload.dirty_pages_per_s, pid=self.pid)
            report.update(command_port=str(self.command_path), trace_log=str(self.trace_path))
            return report
        alive = _ALIVE.findall(text)
        return {
            "kind": "memwriter",
            "written_mib": self.workload.written_mib,
            "dirty_pages_per_s": self.workload.dirty_pages_per_s,
            "booted": b"memwriter: filled" in text or bool(alive),
            "alive_lines": len(alive),
            "last_alive_s": int(alive[-1][0]) if alive else None,
            "pages_written": int(alive[-1][1]) if alive else 0,
            "selfchecks_passed": len(_CHECK_OK.findall(text)),
            "selfchecks_failed": len(_CHECK_FAIL.findall(text)),
            "serial_log": str(self.serial_path),
            "pid": self.pid,
        }

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-500:].strip()
        except FileNotFoundError:
            return ""
