"""QEMU's migration states and figures, mapped onto the agent's progress snapshot.

States come from QEMU's MIGRATION events; numbers from ``query-migrate`` (QEMU QAPI schema,
``MigrationInfo`` / ``MigrationStats``). The snapshot and its rules are ``hostagent.progress``.
"""

from __future__ import annotations

from typing import Any

from agentprotocol import MigrationState
from hostagent.progress import Progress

# QEMU migration status -> the agent's state.
QEMU_STATES: dict[str, MigrationState] = {
    "setup": "init",
    "active": "copy",
    "pre-switchover": "quiesce",
    "device": "frozen",
    "completed": "ready",
}


def apply_query_migrate(progress: Progress, info: dict[str, Any]) -> None:
    """Take QEMU's numbers from ``query-migrate``; Copy's (and Frozen's) percent from what is left to send.

    ``ram.mbps`` is megabits per second; ``dirty-pages-rate`` pages per second of ``page-size`` bytes.
    """
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
    progress.update(**fields)
    if total and progress.state == "copy":
        progress.raise_percent("copy", min(99, 100 * (total - remaining) / total))
    elif total and progress.state == "frozen":
        progress.raise_percent("frozen", min(99, 100 * (total - remaining) / total))
