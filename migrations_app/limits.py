"""The phase time limits a migration runs under: the VM's, as they were when it was requested.

A migration keeps them on its row (``Migration.phase_limits``, written by ``snapshot`` when it is
created) so that raising or lowering a VM's limits later changes neither a migration already running
nor the report of one that ended: "Init 2.1 s | 2 s", not the VM's 10 s of today.

The stored form is ``{"init": int | None, "copy": ..., "io_quiesce": ..., "frozen": ...}`` (seconds;
None: unlimited), keyed by ``Migration.State`` values. A row recorded before limits were kept has ``{}``:
``phase_limits_of`` then falls back to the VM's limits of today and says so (``recorded=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentprotocol import PhaseLimits
from vms.models import VirtualMachine

from .models import Migration

State = Migration.State
# The VM's field of each phase's limit (s; None = unlimited).
VM_LIMIT_FIELD: dict[str, str] = {
    State.INIT: "init_limit_s",
    State.COPY: "copy_limit_s",
    State.IO_QUIESCE: "quiesce_limit_s",
    State.FROZEN: "frozen_limit_s",
}


def snapshot(vm: VirtualMachine) -> dict[str, int | None]:
    """``vm``'s phase limits now, in ``Migration.phase_limits``' form (seconds; None: unlimited)."""
    return {phase: getattr(vm, field) for phase, field in VM_LIMIT_FIELD.items()}


@dataclass(frozen=True)
class Limits:
    """A migration's phase limits by phase (``Migration.State`` value -> seconds, None: unlimited).

    ``recorded``: False when the row predates kept limits and these are the VM's of today (or none at
    all: the VM was deleted), so a page can say they are not the ones it ran under.
    """

    by_phase: dict[str, int | None]
    recorded: bool

    def of(self, phase: str) -> int | None:
        return self.by_phase.get(phase)

    def agent_form(self) -> PhaseLimits:
        """As both agents take them (``agentprotocol.PhaseLimits``)."""
        return PhaseLimits(
            init_s=self.of(State.INIT),
            copy_s=self.of(State.COPY),
            quiesce_s=self.of(State.IO_QUIESCE),
            frozen_s=self.of(State.FROZEN),
        )


def phase_limits_of(migration: Migration) -> Limits:
    """The limits ``migration`` runs (or ran) under: its own, else (an older row) its VM's of today."""
    stored: dict[str, Any] = migration.phase_limits or {}
    if stored:
        return Limits({phase: _seconds(stored.get(phase)) for phase in VM_LIMIT_FIELD}, recorded=True)
    vm = migration.vm
    today = snapshot(vm) if vm is not None else dict.fromkeys(VM_LIMIT_FIELD)
    return Limits(today, recorded=False)


def _seconds(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
