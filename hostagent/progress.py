"""One migration side's progress: a snapshot that only moves forward, and a way to wait for it."""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from typing import Any

from hostagent.driver import PHASES, Phase, ProgressSnapshot, Role


def new_snapshot(migration_id: str, role: Role, guest: str, bytes_total: int) -> ProgressSnapshot:
    return {
        "migration_id": migration_id,
        "role": role,
        "guest": guest,
        "state": "init",
        "phase": "init",
        "percent": {"init": 0, "copy": 0, "quiesce": 0, "frozen": 0},
        "bytes_total": bytes_total,
        "bytes_sent": 0,
        "bytes_remaining": bytes_total,
        "round": 0,
        "dirty_rate_bytes_s": 0,
        "throughput_bytes_s": 0,
        "expected_downtime_ms": None,
        "downtime_ms": None,
        "converged": False,
        "source_digest": None,
        "target_digest": None,
        "error": None,
        "failed_phase": None,
        "seq": 1,
    }


class Progress:
    """Holds the snapshot; every ``update`` bumps ``seq`` and wakes ``next_change`` waiters.

    Percentages are merged with ``max`` so no phase ever goes backwards, and a
    phase's percent is raised to 100 when a later phase starts.
    """

    def __init__(self, migration_id: str, role: Role, guest: str, bytes_total: int) -> None:
        self._snapshot = new_snapshot(migration_id, role, guest, bytes_total)
        self._changed = asyncio.Event()
        self._transitions: deque[ProgressSnapshot] = deque(maxlen=32)

    @property
    def state(self) -> str:
        return self._snapshot["state"]

    @property
    def phase(self) -> Phase | None:
        return self._snapshot["phase"]

    @property
    def seq(self) -> int:
        return self._snapshot["seq"]

    def snapshot(self) -> ProgressSnapshot:
        return copy.deepcopy(self._snapshot)

    def update(self, **fields: Any) -> None:
        percent = fields.pop("percent", None) or {}
        phase = fields.get("phase", self._snapshot["phase"])
        if phase in PHASES:
            for earlier in PHASES[: PHASES.index(phase)]:
                percent.setdefault(earlier, 100)
                percent[earlier] = 100
        for name, value in percent.items():
            current = self._snapshot["percent"][name]
            self._snapshot["percent"][name] = max(current, min(100, int(value)))
        before = (self._snapshot["state"], self._snapshot["phase"])
        self._snapshot.update(fields)  # type: ignore[typeddict-item]
        self._snapshot["seq"] += 1
        if (self._snapshot["state"], self._snapshot["phase"]) != before:
            self._transitions.append(self.snapshot())
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_change(self, after_seq: int) -> ProgressSnapshot:
        """The first state/phase change after ``after_seq`` if one happened, else the latest snapshot.

        So a reader that was slow still sees every phase, in order.
        """
        while self._snapshot["seq"] <= after_seq:
            await self._changed.wait()
        for transition in self._transitions:
            if transition["seq"] > after_seq:
                return copy.deepcopy(transition)
        return self.snapshot()
