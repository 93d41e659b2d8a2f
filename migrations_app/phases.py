"""The four phases of an online migration, in order, each a small object the engine runs.

Contract: the engine records the phase (transition into ``state``) before calling ``run``; ``run``
returns when the phase is done or raises ``MigrationFailed``; ``cleanup`` always runs after it.
The phase's time limit is the VM's; the agents enforce it and the engine's watchdog backs it up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from agentprotocol import (
    FailureKind,
    GuestSpec,
    IncomingRequest,
    MigrationParams,
    OutgoingRequest,
    PhaseLimits,
    ProgressSnapshot,
)
from agentprotocol import Phase as AgentPhase
from vms.inventory import learn_driver
from vms.models import PairEncryption

from .checks import check_target, is_running
from .dataplane import route_data_plane
from .errors import MigrationFailed
from .models import Migration

State = Migration.State


class PhaseRun(Protocol):
    """What a phase uses of the engine's run (``engine.MigrationRun``); a protocol, so that this module
    does not import the engine that imports it."""

    migration: Migration
    agent_id: str

    def guest_spec(self) -> GuestSpec: ...
    def limits(self) -> PhaseLimits: ...
    def agent_params(self) -> MigrationParams: ...
    def check_stop(self) -> None: ...
    def call(self, side: str, method: str, *args: Any) -> Any: ...
    def source_guest_running(self) -> bool | None: ...
    def follow_progress(self, until: Callable[[ProgressSnapshot], bool]) -> None: ...
    def command_with_progress(self, command: str) -> ProgressSnapshot: ...
    def digests(self, snapshot: ProgressSnapshot) -> tuple[str, str]: ...
    def absorb(self, snapshot: Any, *, force: bool = False) -> ProgressSnapshot: ...


class Phase:
    state: ClassVar[Migration.State]
    limit_field: ClassVar[str]  # the VM's time limit for this phase, in seconds (None = unlimited)

    @property
    def label(self) -> str:
        return str(self.state.label)

    def limit_s(self, migration: Migration) -> int | None:
        return getattr(migration.vm, self.limit_field)

    def run(self, run: PhaseRun) -> None:
        raise NotImplementedError

    def cleanup(self, run: PhaseRun) -> None:
        """Called after ``run`` whether it succeeded or not."""


class Init(Phase):
    """Checks again in the database, then the target prepares and the source connects to it."""

    state = State.INIT
    limit_field = "init_limit_s"

    def run(self, run: PhaseRun) -> None:
        migration = run.migration
        vm = migration.require_vm()
        reason = check_target(vm, migration.target, ignoring=migration)
        if reason:
            # Off in the database: it was not running. On: the source is asked (its host may have died).
            raise MigrationFailed(self.state, reason, source_running=None if is_running(vm) else False)
        source = migration.require_source()
        encryption = PairEncryption.policy_between(source, migration.target)
        streams = PairEncryption.streams_between(source, migration.target)
        incoming = IncomingRequest(
            migration_id=run.agent_id,
            guest=run.guest_spec(),
            limits=run.limits(),
            encryption=encryption,
            streams=streams,
        )
        prepared = run.call("target", "prepare_incoming", incoming)
        endpoint = route_data_plane(prepared.endpoint())
        run.check_stop()
        outgoing = OutgoingRequest(
            migration_id=run.agent_id,
            guest=str(vm.guest_id),
            target=endpoint,
            params=run.agent_params(),
            encryption=encryption,
            streams=streams,
        )
        try:
            run.call("source", "start_outgoing", outgoing)
        except MigrationFailed:
            if run.source_guest_running() is not False:
                raise
            raise MigrationFailed(
                self.state,
                f"VM is not running on {migration.require_source().name}: "
                "online migration moves running guests only",
                source_running=False,
            ) from None
        learn_driver(source)  # once per VSP: which rescues its running migrations can be offered
        run.follow_progress(until=lambda snapshot: snapshot.state != "init")


class Copy(Phase):
    """Pre-copy rounds run on the agents until what is left fits the allowed downtime."""

    state = State.COPY
    limit_field = "copy_limit_s"

    def run(self, run: PhaseRun) -> None:
        run.follow_progress(until=lambda snapshot: snapshot.converged or snapshot.state != "copy")


class IOQuiesce(Phase):
    """Outstanding guest I/O completes on the source; new requests queue for the target."""

    state = State.IO_QUIESCE
    limit_field = "quiesce_limit_s"

    def run(self, run: PhaseRun) -> None:
        run.absorb(run.command_with_progress("quiesce"), force=True)


class Frozen(Phase):
    """vCPUs stop, the rest goes across; done when the target is ready with a matching digest."""

    state = State.FROZEN
    limit_field = "frozen_limit_s"

    def run(self, run: PhaseRun) -> None:
        snapshot = run.absorb(run.command_with_progress("freeze"), force=True)
        if snapshot.state != "ready":
            raise MigrationFailed(self.state, f"the source host answered {snapshot.state!r} instead of ready")
        source_digest, target_digest = run.digests(snapshot)
        if not source_digest or source_digest != target_digest:
            raise MigrationFailed(
                self.state,
                "the target's memory digest does not match the source's",
                kind=FailureKind.DIGEST_MISMATCH,
            )


PHASES: tuple[Phase, ...] = (Init(), Copy(), IOQuiesce(), Frozen())
# The agent's phase names (``agentprotocol.PHASES``) -> this console's states.
PHASE_BY_AGENT_NAME: dict[AgentPhase, Migration.State] = {
    "init": State.INIT,
    "copy": State.COPY,
    "quiesce": State.IO_QUIESCE,
    "frozen": State.FROZEN,
}
