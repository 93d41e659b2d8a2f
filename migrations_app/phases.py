"""The four phases of an online migration, in order, each a small object the engine runs.

Contract: the engine records the phase (transition into ``state``) before calling ``run``; ``run``
returns when the phase is done or raises ``MigrationFailed``; ``cleanup`` always runs after it.
The phase's time limit is the VM's; the agents enforce it and the engine's watchdog backs it up.
A phase talks to the agents through ``run.agents`` (``agents.MigrationAgents``) and records what the
source reports through ``run.progress`` (``records.ProgressRecord``), with the helpers at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from typing import ClassVar, Literal, Protocol

from agentprotocol import FailureKind, ProgressSnapshot
from vms.inventory import learn_abilities, learn_driver, refresh_resources
from vms.models import PairEncryption

from . import alerts, records
from .agents import MigrationAgents
from .checks import check_target, is_running
from .dataplane import route_data_plane
from .errors import MigrationFailed
from .limits import phase_limits_of
from .models import Migration
from .placement import local_disks
from .records import PHASE_BY_AGENT_NAME, ProgressRecord

State = Migration.State


class PhaseRun(Protocol):
    """What a phase uses of the engine's run (``engine.MigrationRun``): the migration, its agents, the
    progress it records; a protocol, so that this module does not import the engine that imports it."""

    migration: Migration
    agents: MigrationAgents
    progress: ProgressRecord


class Phase:
    state: ClassVar[Migration.State]
    limit_field: ClassVar[str]  # the VM's time limit for this phase, in seconds (None = unlimited)

    @property
    def label(self) -> str:
        return str(self.state.label)

    def limit_s(self, migration: Migration) -> int | None:
        """The phase's limit (s; None: unlimited) as ``migration`` was requested with (``limits``)."""
        return phase_limits_of(migration).of(self.state)

    def run(self, run: PhaseRun) -> None:
        raise NotImplementedError

    def cleanup(self, run: PhaseRun) -> None:
        """Called after ``run`` whether it succeeded or not."""


class Init(Phase):
    """Checks again in the database (the target's pools and, for a guest with a local disk, what both
    agents can do, asked again first), then the target prepares and the source connects to it; a local
    disk goes with ``local_disks="mirror"`` in both requests (``agents.MigrationAgents.local_disks_mode``).
    """

    state = State.INIT
    limit_field = "init_limit_s"

    def run(self, run: PhaseRun) -> None:
        migration = run.migration
        vm = migration.require_vm()
        if vm.disks.exists() or vm.nics.exists():  # a pool or network gone since the click: seen now
            refresh_resources(migration.target)
        if local_disks(vm, migration.source):  # mirrored: what both agents can do now, not when last asked
            for vsp in (migration.source, migration.target):
                if vsp is not None:
                    learn_abilities(vsp)
        reason = check_target(vm, migration.target, ignoring=migration)
        if reason:
            # Off in the database: it was not running. On: the source is asked (its host may have died).
            raise MigrationFailed(self.state, reason, source_running=None if is_running(vm) else False)
        source = migration.require_source()
        encryption = PairEncryption.policy_between(source, migration.target)
        streams = PairEncryption.streams_between(source, migration.target)
        prepared = run.agents.prepare_target(encryption, streams)
        endpoint = route_data_plane(prepared.endpoint())
        run.agents.check_stop()
        try:
            run.agents.start_source(endpoint, encryption, streams)
        except MigrationFailed:
            if source_guest_running(run) is not False:
                raise
            raise MigrationFailed(
                self.state,
                f"VM is not running on {migration.require_source().name}: "
                "online migration moves running guests only",
                source_running=False,
            ) from None
        learn_driver(source)  # once per VSP: which rescues its running migrations can be offered
        # Whether the source's driver commits at the switchover decides how Frozen checks the arrival
        # and how a stop that comes after the switchover ends (``endings.committed_by_source``).
        run.agents.learn_switchover_commits()
        follow_progress(run, until=lambda snapshot: snapshot.state != "init")


class Copy(Phase):
    """Pre-copy rounds run on the agents until what is left fits the allowed downtime."""

    state = State.COPY
    limit_field = "copy_limit_s"

    def run(self, run: PhaseRun) -> None:
        follow_progress(run, until=lambda snapshot: snapshot.converged or snapshot.state != "copy")


class IOQuiesce(Phase):
    """Outstanding guest I/O completes on the source; new requests queue for the target."""

    state = State.IO_QUIESCE
    limit_field = "quiesce_limit_s"

    def run(self, run: PhaseRun) -> None:
        command(run, "quiesce")


class Frozen(Phase):
    """vCPUs stop, the rest goes across; done when the target is ready with a matching digest.

    A source whose driver commits at the switchover (libvirt, ``Health.switchover_commits``) gives no
    memory digests (libvirt and QEMU check the stream themselves): its check is ``check_switched_over``.
    """

    state = State.FROZEN
    limit_field = "frozen_limit_s"

    def run(self, run: PhaseRun) -> None:
        snapshot = command(run, "freeze")
        if snapshot.state != "ready":
            raise MigrationFailed(self.state, f"the source host answered {snapshot.state!r} instead of ready")
        if run.agents.source_commits_at_switchover():  # as learnt in Init, else asked now
            check_switched_over(run)
            return
        source_digest, target_digest = store_digests(run, snapshot)
        if not source_digest or source_digest != target_digest:
            raise MigrationFailed(
                self.state,
                "the target's memory digest does not match the source's",
                kind=FailureKind.DIGEST_MISMATCH,
            )


PHASES: tuple[Phase, ...] = (Init(), Copy(), IOQuiesce(), Frozen())


# --- what the phases do with the source's progress ----------------------------------------------------


def follow_progress(run: PhaseRun, until: Callable[[ProgressSnapshot], bool]) -> None:
    """Absorb the source's progress stream until ``until(snapshot)``; failures raise."""
    with closing(run.agents.progress(run.progress.seq)) as stream:
        for snapshot in stream:
            if until(absorb(run, snapshot)):
                return
    run.agents.check_stop()
    source = run.migration.require_source().name
    raise MigrationFailed(
        run.migration.state, alerts.progress_ended_early(source), kind=FailureKind.UNREACHABLE
    )


def command(run: PhaseRun, name: Literal["quiesce", "freeze"]) -> ProgressSnapshot:
    """A blocking source command, the source's progress absorbed while it runs; its answer, absorbed."""
    for answered, snapshot in run.agents.command_progress(name):
        absorb(run, snapshot, force=answered)
    return snapshot


def absorb(run: PhaseRun, snapshot: ProgressSnapshot, *, force: bool = False) -> ProgressSnapshot:
    """Take a progress snapshot into the record (percentages only rise); the source's own abort raises
    (``reported_failure``), a stop first. Returns the snapshot."""
    run.progress.take(snapshot)
    run.agents.check_stop()
    if snapshot.failed:
        raise blamed(run, reported_failure(run.migration, snapshot, run.progress.elapsed_s()), snapshot)
    run.progress.flush(force=force)
    return snapshot


def store_digests(run: PhaseRun, snapshot: ProgressSnapshot) -> tuple[str, str]:
    """Both memory digests (the source's snapshot, else the target's own), kept on the migration."""
    source_digest, target_digest = snapshot.source_digest, snapshot.target_digest
    if not target_digest:
        target_digest = run.agents.target_snapshot().target_digest
    run.migration.source_digest, run.migration.target_digest = source_digest or "", target_digest or ""
    return run.migration.source_digest, run.migration.target_digest


TARGET_READY_WAIT_S = 10.0  # the target's agent notices the arrived guest a moment after the source's job
TARGET_READY_POLL_S = 0.2


def check_switched_over(run: PhaseRun) -> None:
    """The arrival check of a source whose driver commits at the switchover, in place of the digests:
    the source's "ready" is its hypervisor's completed job (libvirt's job statistics, type completed,
    with the real downtime); the target must report that it runs the guest (within
    ``TARGET_READY_WAIT_S``) and the source that its copy no longer runs (libvirt: shut off, reason
    *migrated*, kept defined: ``not_runnable``). A failure raises ``MigrationFailed``; the hypervisor
    committed already, so the engine records it and rolls forward (``endings.committed_by_source``),
    where the target's resume decides.
    """
    target = run.migration.target.name
    deadline = time.monotonic() + TARGET_READY_WAIT_S
    while (state := run.agents.target_snapshot().state) not in ("ready", "completed"):
        if time.monotonic() >= deadline:
            said = f"the target host {target} does not run the guest ({state})"
            raise MigrationFailed(State.FROZEN, f"the source's job completed, but {said}")
        time.sleep(TARGET_READY_POLL_S)
    if run.agents.source_guest_status(attempts=1) != "stopped":
        source = run.migration.require_source().name
        raise MigrationFailed(State.FROZEN, f"the source host {source} still reports the guest running")


def source_guest_running(run: PhaseRun) -> bool | None:
    """Ask the source agent whether the guest runs (None if it cannot tell); a stopped one is stored Off.

    Used after the source refused to start: the inventory may be older than the guest's power-off.
    """
    status = run.agents.source_guest_status(attempts=1, timeout_s=None)
    if status == "stopped":
        records.store_source_guest_off(run.migration)
    return {"running": True, "stopped": False}.get(status)


def blamed(run: PhaseRun, failure: MigrationFailed, snapshot: ProgressSnapshot) -> MigrationFailed:
    """The source's report that it lost its peer (kind ``unreachable``) with the real cause: the target
    agent is asked (``MigrationAgents.peer_cause``). A target not running, hanging, restarted or
    untrusted is named as the cause; a target that still holds the migration leaves the link to blame.

    QA: a target agent killed mid-Copy read "the network failed (ConnectionError)".
    """
    if failure.kind is not FailureKind.UNREACHABLE or snapshot.failed_side not in (None, "source"):
        return failure
    source, target = run.migration.require_source().name, run.migration.target.name
    said = f"{alerts.host('source', source)} {failure.reason}"
    cause = run.agents.peer_cause("target")
    if cause is None:
        reason = (
            f"the data-plane link from {source} to {target} failed while both agents kept running ({said})"
        )
    else:
        reason = f"{cause} ({said})"
    return MigrationFailed(failure.phase, reason, kind=failure.kind, source_running=failure.source_running)


def reported_failure(migration: Migration, snapshot: ProgressSnapshot, elapsed_s: float) -> MigrationFailed:
    """The source agent's own abort (a snapshot in ``FAILED_STATES``), decided by its kind, blamed on the
    phase it names. A phase that ran over the VM's limit on the source reads "it ran over its time limit
    of N s (stopped after ``elapsed_s`` s)"."""
    failed = snapshot.failed_phase
    phase = PHASE_BY_AGENT_NAME[failed] if failed else migration.state
    kind = snapshot.failure_kind or FailureKind.INTERNAL
    if kind is FailureKind.TIME_LIMIT and snapshot.failed_side in (None, "source"):
        limit = next(p.limit_s(migration) for p in PHASES if p.state == phase)
        return MigrationFailed(phase, alerts.over_time_limit(limit, elapsed_s), kind=kind)
    error = snapshot.error or f"the source host reports {snapshot.state}"
    return MigrationFailed(phase, error, kind=kind)
