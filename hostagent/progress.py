"""One migration side's progress, for every driver: a snapshot that only moves forward, and waiting for it.

The snapshot is ``agentprotocol.ProgressSnapshot``. Rules (``driver.py``, "Rules every driver keeps"):
each phase's percent never goes backwards, a phase is 100 % once a later one starts, ``seq`` grows
on every change, and ``next_change`` lets a slow reader still see every phase, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from agentprotocol import PHASES, FailureKind, MigrationState, Phase, ProgressSnapshot, Role

TRANSITIONS_KEPT = 32  # state/phase changes remembered for slow readers (a migration has ~10)


class Progress:
    """Holds one side's snapshot; every change bumps ``seq`` and wakes ``next_change`` waiters."""

    def __init__(self, migration_id: str, role: Role, guest_id: str, bytes_total: int = 0) -> None:
        self._snapshot = ProgressSnapshot(
            migration_id=migration_id,
            role=role,
            guest=guest_id,
            state="init",
            phase="init",
            bytes_total=bytes_total,
            bytes_remaining=bytes_total,
            seq=1,
        )
        self._changed = asyncio.Event()
        self._transitions: deque[ProgressSnapshot] = deque(maxlen=TRANSITIONS_KEPT)
        self.phase_started = time.monotonic()  # when the current phase began (monotonic s)

    @property
    def state(self) -> MigrationState:
        return self._snapshot.state

    @property
    def phase(self) -> Phase | None:
        return self._snapshot.phase

    @property
    def seq(self) -> int:
        return self._snapshot.seq

    @property
    def current(self) -> ProgressSnapshot:
        """The live snapshot, to read (never change it: use ``update``); ``snapshot()`` for a copy."""
        return self._snapshot

    def snapshot(self) -> ProgressSnapshot:
        """A copy that later changes do not touch."""
        return self._snapshot.model_copy(update={"percent": self._snapshot.percent.copy()})

    def update(self, percent: dict[Phase, float] | None = None, **fields: Any) -> None:
        """Set ``fields`` (snapshot field names) and raise ``percent`` per phase; no change, no bump.

        A new ``phase`` completes the phases before it (100 %) and restarts the phase clock.
        """
        current = self._snapshot
        before = (current.state, current.phase)
        changed = False
        phase = fields.get("phase", current.phase)
        raised: dict[Phase, float] = dict(percent or {})
        if phase in PHASES:
            for earlier in PHASES[: PHASES.index(phase)]:
                raised[earlier] = 100
        for phase_name, value in raised.items():
            wanted = max(0, min(100, int(value)))
            if wanted > current.percent[phase_name]:
                current.percent[phase_name] = wanted
                changed = True
        for key, value in fields.items():
            if getattr(current, key) != value:
                setattr(current, key, value)
                changed = True
        if not changed:
            return
        if fields.get("phase", before[1]) != before[1] and current.phase is not None:
            self.phase_started = time.monotonic()
        self._bump(transition=(current.state, current.phase) != before)

    def enter(self, state: MigrationState) -> None:
        """Move to ``state``: an active state is also the phase; ready/completed/released end all phases."""
        if state == self._snapshot.state:
            return
        if state in PHASES:
            self.update(state=state, phase=state)
        elif state in ("ready", "completed", "released"):
            self.update(state=state, phase="frozen", percent=dict.fromkeys(PHASES, 100))
        else:
            self.update(state=state)

    def raise_percent(self, phase: Phase, percent: float) -> None:
        self.update(percent={phase: percent})

    def fail(
        self,
        state: MigrationState,
        error: str,
        kind: FailureKind,
        *,
        side: Role | None = None,
        keep_phase: bool = False,
    ) -> None:
        """End before the decision: why (``error`` in words, ``kind``), where, which side, after how long.

        ``side`` is the host that noticed the failure (default: this one). The phase is cleared
        unless ``keep_phase`` (the QEMU driver keeps it, as it always did).
        """
        current = self._snapshot
        failed_phase = current.phase if current.state in PHASES else current.failed_phase
        fields: dict[str, Any] = {
            "state": state,
            "error": error,
            "failure_kind": kind,
            "failed_side": side or current.role,
            "failed_phase": failed_phase,
        }
        if failed_phase is not None and current.state in PHASES:
            fields["failed_after_s"] = round(time.monotonic() - self.phase_started, 3)
        if not keep_phase:
            fields["phase"] = None
        self.update(**fields)

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        """The first state/phase change after ``after_seq`` if one happened, else the latest snapshot.

        Waits until ``seq`` > ``after_seq``. So a reader that was slow still sees every phase, in order.
        """
        while self._snapshot.seq <= after_seq:
            await self._changed.wait()
        for transition in self._transitions:
            if transition.seq > after_seq:
                return transition.model_copy(update={"percent": transition.percent.copy()})
        return self.snapshot()

    def _bump(self, *, transition: bool) -> None:
        self._snapshot.seq += 1
        if transition:
            self._transitions.append(self.snapshot())
        self._changed.set()
        self._changed = asyncio.Event()
