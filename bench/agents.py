"""Host agents for the benchmarks, and one migration driven through their API as the console drives it."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentprotocol import (
    Encryption,
    GuestSpec,
    IncomingRequest,
    MigrationParams,
    OutgoingRequest,
    ProgressSnapshot,
)
from devtools.processes import free_port, start_agent, write_secret_file
from vms.agent_client import AgentClient


def guest_id_for(name: str) -> str:
    """The id agents know a bench guest by (derived from its name, so the scripts can say names)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"matrixoe-bench-guest:{name}"))


class BenchAgent:
    """A real agent on a free loopback port; its secret and log go to ``scratch``."""

    def __init__(
        self,
        name: str,
        scratch: Path,
        driver: str = "simulated",
        *extra_args: str,
        timeout_s: float = 60,
        env: dict[str, str] | None = None,
    ) -> None:
        """TLS with a CA of the bench's own (``scratch/pki``); ``encryption`` is the data-plane policy
        ``migrate`` uses by default ("required": mutual TLS, QEMU's own migration TLS for QEMU).
        ``env``: the agent process's environment (None: ours)."""
        secret_file = scratch / f"{name}.secret"
        write_secret_file(secret_file)
        started = start_agent(
            name,
            free_port(),
            secret_file,
            driver,
            extra_args,
            log_path=scratch / f"{name}.log",
            pki_dir=scratch / "pki",
            env=env,
        )
        self.process = started.process
        self.secret = started.secret
        self.trust = started.ca.read_text() if started.ca else ""
        self.client = AgentClient(started.url, started.secret, trust=self.trust, timeout_s=timeout_s)
        self.encryption: Encryption = "required"

    def stop(self) -> None:
        self.client.close()
        self.process.stop(timeout=30)


@dataclass
class Moved:
    ready: ProgressSnapshot  # the source's snapshot in "ready"
    target_digest: str | None  # as the target reported it before resuming
    total_s: float  # start -> ready
    to_converged_s: float  # start -> converged (or ended)


def migrate(
    source: Any,
    target: Any,
    spec: dict[str, Any],
    encryption: Encryption | None = None,
    streams: int | None = None,
) -> Moved:
    """Prepare, start, quiesce once converged, freeze, resume, release: the console's order of commands.

    ``spec``: the guest's name, memory_mib, vcpus, os_type and, for a guest the agents know by another
    id than ``guest_id_for(name)`` (a console-defined guest), its ``guest_id``.

    ``encryption``: the data-plane policy ("required": mutual TLS, "off": plain TCP); by default the
    source's (``BenchAgent.encryption``), else "required". ``streams``: parallel data-plane connections
    (1..16, None: the source agent sizes them).
    """
    policy = encryption or getattr(source, "encryption", "required")
    migration_id = f"bench-{secrets.token_hex(3)}"
    wanted = GuestSpec(
        guest_id=spec.get("guest_id") or guest_id_for(spec["name"]),
        **{key: spec[key] for key in ("name", "memory_mib", "vcpus", "os_type")},
    )
    started = time.perf_counter()
    incoming = IncomingRequest(migration_id=migration_id, guest=wanted, encryption=policy, streams=streams)
    endpoint = target.client.prepare_incoming(incoming).endpoint()
    params = MigrationParams(downtime_ms=300, max_rounds=30)
    source.client.start_outgoing(
        OutgoingRequest(
            migration_id=migration_id,
            guest=wanted.guest_id,
            target=endpoint,
            params=params,
            encryption=policy,
            streams=streams,
        )
    )
    for snapshot in source.client.iter_progress(migration_id):
        if snapshot.converged or snapshot.state not in ("init", "copy"):
            break
    converged_s = time.perf_counter() - started
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    total_s = time.perf_counter() - started
    if ready.state != "ready":
        raise SystemExit(f"migration did not reach ready: {ready}")
    target_digest = target.client.snapshot(migration_id).target_digest
    target.client.resume(migration_id)
    source.client.release(migration_id)
    return Moved(ready, target_digest, total_s, converged_s)
