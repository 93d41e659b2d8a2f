"""Real host agent processes on free loopback ports, and helpers to migrate guests between them.

``agent_factory(name)`` starts ``python -m hostagent`` and returns a ``RunningAgent``
(url, secret, process, client, kill()); every agent it started is stopped when the
test ends. Other test packages may reuse it.

Agents run with TLS by default: one test CA per test session (``devtools.pki``, the module
``make run`` uses), one certificate per agent name; ``tls=False`` starts one with
``--insecure-http`` (its data plane then only works with the policy "off").
"""

from __future__ import annotations

import atexit
import functools
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentprotocol import (
    DiskSpec,
    Encryption,
    Endpoint,
    GuestInfo,
    GuestSpec,
    HostResources,
    IncomingRequest,
    MigrationParams,
    NicSpec,
    OutgoingRequest,
    PhaseLimits,
    PreparedIncoming,
    ProgressSnapshot,
)
from devtools import pki, processes
from devtools.processes import write_secret_file
from tests.conftest import ManagedProcess, free_port, log_path, subprocess_env, wait_until
from vms.agent_client import AgentClient


@dataclass
class RunningAgent:
    name: str
    url: str
    secret: str
    process: ManagedProcess
    client: AgentClient = field(repr=False)
    trust: str = ""  # what a VSP registers for it: the test CA's certificate (PEM)
    fingerprint: str | None = None

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What a raw ``httpx`` call to this agent verifies its certificate with (the test CA)."""
        return ssl.create_default_context(cadata=self.trust) if self.trust else True

    def kill(self) -> None:
        """SIGKILL: what a crashed host looks like."""
        self.process.kill()

    def stop(self) -> None:
        self.client.close()
        self.process.stop()

    def log(self) -> str:
        return Path(self.process.log_path).read_text(errors="replace")

    def guest(self, name: str) -> GuestInfo | None:
        """The guest whose display name is ``name`` (test names are unique), or None."""
        return next((guest for guest in self.client.list_guests() if guest.name == name), None)


@functools.cache
def session_pki_dir() -> Path:
    """This test session's deployment CA (created once, removed at exit)."""
    directory = Path(tempfile.mkdtemp(prefix="matrixoe-test-pki-"))
    atexit.register(shutil.rmtree, directory, True)
    pki.ensure_ca(directory)
    return directory


def start_agent(
    name: str,
    secret_dir: Path,
    *extra_args: str,
    driver: str = "simulated",
    tls: bool = True,
    pki_dir: Path | None = None,
) -> RunningAgent:
    """An agent with a certificate from the session's CA, or from the CA in ``pki_dir`` if given
    (a host of another deployment), or none (``tls=False``: ``--insecure-http``)."""
    port = free_port()
    secret_file = secret_dir / f"{name}-{port}.secret"
    write_secret_file(secret_file)
    started = processes.start_agent(
        name,
        port,
        secret_file,
        driver,
        extra_args,
        log_path=log_path(f"agent-{name}"),
        env=subprocess_env(),
        pki_dir=(pki_dir or session_pki_dir()) if tls else None,
    )
    trust = started.ca.read_text() if started.ca else ""
    client = AgentClient(started.url, started.secret, trust=trust, timeout_s=30)
    return RunningAgent(
        name, started.url, started.secret, started.process, client, trust, started.fingerprint
    )


class AgentFactory:
    def __init__(self, secret_dir: Path) -> None:
        self.secret_dir = secret_dir
        self.started: list[RunningAgent] = []

    def __call__(
        self,
        name: str,
        *extra_args: str,
        driver: str = "simulated",
        tls: bool = True,
        pki_dir: Path | None = None,
    ) -> RunningAgent:
        agent = start_agent(name, self.secret_dir, *extra_args, driver=driver, tls=tls, pki_dir=pki_dir)
        self.started.append(agent)
        return agent

    def stop_all(self) -> None:
        for agent in self.started:
            agent.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[AgentFactory]:
    factory = AgentFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def agent_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAgent, RunningAgent]]:
    """Two agents shared by a module's tests (each test uses guests of its own names)."""
    factory = AgentFactory(tmp_path_factory.mktemp("agents"))
    yield factory("vsp1"), factory("vsp2")
    factory.stop_all()


# -- guests and migrations ------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def guest_id_for(name: str) -> str:
    """The id agents know a test guest by: derived from its (unique) test name, so tests can say names."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"matrixoe-test-guest:{name}"))


def define_running_guest(agent: RunningAgent, name: str, **spec: Any) -> GuestInfo:
    defaults = {"memory_mib": 16, "vcpus": 1, "dirty_pages_per_s": 200, "running": True}
    wanted = {"guest_id": guest_id_for(name), "name": name, **defaults, **spec}
    return agent.client.define_guest(GuestSpec.model_validate(wanted))


def resources(agent: RunningAgent) -> HostResources:
    """``GET /v1/resources`` of ``agent``: its pools, networks and volume writers."""
    headers = {"Authorization": f"Bearer {agent.secret}"}
    response = httpx.get(f"{agent.url}/v1/resources", headers=headers, verify=agent.verify, timeout=30)
    response.raise_for_status()
    return HostResources.model_validate_json(response.content)


def raw_post(agent: RunningAgent, path: str, body: Any) -> httpx.Response:
    """``body`` as it is, to ``agent``'s API with its secret: what any caller of the API may send (the
    console's typed client refuses a bad value before it leaves)."""
    headers = {"Authorization": f"Bearer {agent.secret}"}
    return httpx.post(f"{agent.url}{path}", json=body, headers=headers, verify=agent.verify, timeout=30)


def wanted_spec(guest: GuestInfo | dict[str, Any]) -> GuestSpec:
    """What a target prepares for ``guest`` (as its source reports it, or a dict of its fields: an id is
    derived from the name when it has none)."""
    fields = guest.model_dump() if isinstance(guest, GuestInfo) else guest
    disks = [
        DiskSpec.model_validate({**disk, "create": False, "allocated_bytes": None, "backing": None})
        for disk in fields.get("disks", [])
    ]
    return GuestSpec(
        guest_id=fields.get("guest_id") or guest_id_for(fields["name"]),
        name=fields["name"],
        memory_mib=fields["memory_mib"],
        vcpus=fields["vcpus"],
        os_type=fields["os_type"],
        disks=disks,
        nics=[NicSpec.model_validate(nic) for nic in fields.get("nics", [])],
    )


def prepare(
    target: RunningAgent,
    guest: GuestInfo | dict[str, Any],
    migration_id: str,
    encryption: Encryption = "required",
    *,
    streams: int | None = None,
    **limits: Any,
) -> PreparedIncoming:
    request = IncomingRequest(
        migration_id=migration_id,
        guest=wanted_spec(guest),
        limits=PhaseLimits.model_validate(limits),
        encryption=encryption,
        streams=streams,
    )
    return target.client.prepare_incoming(request)


def outgoing(
    guest_id: str,
    migration_id: str,
    target: Endpoint,
    encryption: Encryption = "required",
    *,
    streams: int | None = None,
    **params: Any,
) -> OutgoingRequest:
    """The source's request: ``params`` are ``MigrationParams`` fields (``limits`` a dict of its own)."""
    return OutgoingRequest(
        migration_id=migration_id,
        guest=guest_id,
        target=target,
        params=MigrationParams.model_validate(params),
        encryption=encryption,
        streams=streams,
    )


def start(
    source: RunningAgent,
    target: RunningAgent,
    guest: GuestInfo,
    migration_id: str,
    encryption: Encryption = "required",
    *,
    streams: int | None = None,
    **params: Any,
) -> ProgressSnapshot:
    """Prepare ``target`` and start ``source``; ``encryption`` and ``streams`` are the pair's data-plane
    policy, ``params`` the migration's (``MigrationParams`` fields)."""
    prepared = prepare(target, guest, migration_id, encryption, streams=streams, **params.get("limits", {}))
    endpoint = prepared.endpoint()
    return source.client.start_outgoing(
        outgoing(guest.guest_id, migration_id, endpoint, encryption, streams=streams, **params)
    )


def follow(
    agent: RunningAgent, migration_id: str, until: Callable[[ProgressSnapshot], bool]
) -> list[ProgressSnapshot]:
    """Progress snapshots from the stream, up to and including the first one ``until`` accepts."""
    seen = []
    for snapshot in agent.client.iter_progress(migration_id):
        seen.append(snapshot)
        if until(snapshot):
            break
    return seen


def converged_or_ended(snapshot: ProgressSnapshot) -> bool:
    return snapshot.converged or snapshot.state not in ("init", "copy")


def in_phase(phase: str) -> Callable[[ProgressSnapshot], bool]:
    return lambda snapshot: snapshot.phase == phase or snapshot.state not in ("init", "copy", phase)


def workload_advances(agent: RunningAgent, name: str) -> bool:
    """The guest runs on ``agent`` and its workload goes on: pages written (if it writes any), I/O done."""

    def progress() -> tuple[int, int]:
        guest = agent.client.get_guest(guest_id_for(name))
        assert guest.hardware_status == "on" and guest.os_status == "up", guest
        workload = guest.workload
        return workload["pages_written"], workload["io_completed"]

    pages_before, io_before = progress()
    writes = agent.client.get_guest(guest_id_for(name)).workload["dirty_pages_per_s"] > 0

    def advanced() -> bool:
        pages, io = progress()
        return (pages > pages_before or not writes) and io > io_before

    return wait_until(advanced, timeout=10)


def wait_for_state(
    agent: RunningAgent, migration_id: str, *states: str, timeout: float = 20
) -> ProgressSnapshot:
    assert wait_until(lambda: agent.client.snapshot(migration_id).state in states, timeout=timeout), (
        agent.client.snapshot(migration_id)
    )
    return agent.client.snapshot(migration_id)


class InBackground:
    """Runs a blocking call (a command that answers when its phase ends) in a thread."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self.result = function()
        except BaseException as error:
            self.error = error

    def join(self, timeout: float = 30) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not answer"
        if self.error is not None:
            raise self.error
        return self.result


class SilentListener:
    """A TCP port that accepts connections and never says a word: a hung target host."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.closed = False
        self.port = self.sock.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted.append(connection)

    def endpoint(self) -> Endpoint:
        return Endpoint(host="127.0.0.1", port=self.port, token="whatever")  # noqa: S106 - no listener checks it

    def close(self) -> None:
        self.closed = True
        self._thread.join(5)
        self.sock.close()
        for connection in self._accepted:
            connection.close()


@pytest.fixture
def silent_listener() -> Iterator[SilentListener]:
    listener = SilentListener()
    yield listener
    listener.close()


def mount_small_tmpfs(mount_point: Path, size_mib: int) -> None:
    """Mount a tmpfs of ``size_mib`` MiB at ``mount_point`` (made here): a real file system that fills up,
    for a pool that runs out of space. Mounting needs root; without it the calling test is skipped, saying
    so. The caller unmounts it (``umount``)."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)],  # noqa: S607 - the system's mount
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
