"""Progress of one side of a QEMU migration: the snapshot, its sequence, and waiting for changes.

QEMU's figures are mapped onto the agent's snapshot here, and every phase's percent is
only ever raised, so a new dirty-page round never makes Copy fall.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..driver import PHASES, MigrationState, Phase, ProgressSnapshot, Role
from ..progress import new_snapshot

# QEMU migration status -> the agent's state.
QEMU_STATES: dict[str, MigrationState] = {
    "setup": "init",
    "active": "copy",
    "pre-switchover": "quiesce",
    "device": "frozen",
    "completed": "ready",
}


class Progress:
    def __init__(self, migration_id: str, role: Role, guest: str) -> None:
        self._snapshot = new_snapshot(migration_id, role, guest, bytes_total=0)
        self._changed = asyncio.Event()
        self.phase_started = time.monotonic()

    @property
    def state(self) -> MigrationState:
        return self._snapshot["state"]

    @property
    def phase(self) -> Phase | None:
        return self._snapshot["phase"]

    def snapshot(self) -> ProgressSnapshot:
        copy = dict(self._snapshot)
        copy["percent"] = dict(self._snapshot["percent"])
        return copy  # type: ignore[return-value]

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        while self._snapshot["seq"] <= after_seq:
            await self._changed.wait()
        return self.snapshot()

    def update(self, **fields: Any) -> None:
        changed = False
        for key, value in fields.items():
            if self._snapshot.get(key) != value:
                self._snapshot[key] = value  # type: ignore[literal-required]
                changed = True
        if changed:
            self._bump()

    def enter(self, state: MigrationState) -> None:
        """Move to ``state``; the phases before an active state are complete."""
        if state == self._snapshot["state"]:
            return
        self._snapshot["state"] = state
        if state in PHASES:
            phase: Phase = state  # type: ignore[assignment]
            self._snapshot["phase"] = phase
            self.phase_started = time.monotonic()
            for earlier in PHASES[: PHASES.index(phase)]:
                self._snapshot["percent"][earlier] = 100
        elif state in ("ready", "completed", "released"):
            for every in PHASES:
                self._snapshot["percent"][every] = 100
            self._snapshot["phase"] = "frozen"
        self._bump()

    def raise_percent(self, phase: Phase, percent: float) -> None:
        value = max(0, min(100, int(percent)))
        if value > self._snapshot["percent"][phase]:
            self._snapshot["percent"][phase] = value
            self._bump()

    def fail(self, state: MigrationState, error: str | None) -> None:
        if self._snapshot["phase"] is not None and self._snapshot["failed_phase"] is None and error:
            self._snapshot["failed_phase"] = self._snapshot["phase"]
        self._snapshot["error"] = error
        self._snapshot["state"] = state
        self._bump()

    def apply_query_migrate(self, info: dict[str, Any]) -> None:
        """Take QEMU's numbers from ``query-migrate``; Copy's percent from what is left to send."""
        ram = info.get("ram") or {}
        total = int(ram.get("total", 0))
        remaining = int(ram.get("remaining", 0))
        fields: dict[str, Any] = {
            "bytes_total": total,
            "bytes_sent": int(ram.get("transferred", 0)),
            "bytes_remaining": remaining,
            "round": int(ram.get("dirty-sync-count", 0)),
            "dirty_rate_bytes_s": int(ram.get("dirty-pages-rate", 0)) * int(ram.get("page-size", 4096)),
            "throughput_bytes_s": int(float(ram.get("mbps", 0.0)) * 1_000_000 / 8),
        }
        if "expected-downtime" in info:
            fields["expected_downtime_ms"] = int(info["expected-downtime"])
        if "downtime" in info:
            fields["downtime_ms"] = int(info["downtime"])
        self.update(**fields)
        if total and self.state == "copy":
            self.raise_percent("copy", min(99, 100 * (total - remaining) / total))
        elif total and self.state == "frozen":
            self.raise_percent("frozen", min(99, 100 * (total - remaining) / total))

    def _bump(self) -> None:
        self._snapshot["seq"] += 1
        self._changed.set()
        self._changed = asyncio.Event()
