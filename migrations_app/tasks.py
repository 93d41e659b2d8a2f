"""Celery tasks of the control plane: thin wrappers taking primary keys (JSON only)."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from django.conf import settings

from vms.inventory import collect_vsp, start_round

from .engine import drive_migration
from .link_probes import probe_now
from .recovery import recover_orphans

logger = logging.getLogger(__name__)


@shared_task(bind=True, ignore_result=True)
def run_migration(self: Any, migration_id: int) -> None:
    """Drive one migration; a no-op if it is not (or no longer) its source's turn.

    The broker may deliver this task again while its first delivery still runs (acks-late: its message
    stays unacknowledged until the end, and the Redis transport hands it out again after its visibility
    timeout). The second delivery finds the migration claimed and changes nothing; it says so in the log.
    """
    claimed = drive_migration(migration_id)
    if not claimed and (self.request.delivery_info or {}).get("redelivered"):
        logger.info(
            "Migration %s: its task was delivered again (the broker's visibility timeout passed, or a "
            "worker was lost) and found it no longer waiting to start: this delivery changed nothing",
            migration_id,
        )


@shared_task(ignore_result=True)
def collect_inventory() -> int:
    """Beat's periodic collection: one ``collect_vsp_inventory`` task per VSP (so a slow or dead agent
    holds up only its own), on ``INVENTORY_QUEUE``; a task not started before the next round is due
    skips its agent, so a backlog drains rather than piles up. Returns the round's id
    (``vms.InventoryRound``)."""
    round_id, vsp_ids = start_round()
    deadline = time.time() + settings.INVENTORY_INTERVAL_S
    for vsp_id in vsp_ids:
        collect_vsp_inventory.apply_async((vsp_id, round_id, deadline), queue=settings.INVENTORY_QUEUE)
    return round_id


@shared_task(ignore_result=True)
def collect_vsp_inventory(vsp_id: int, round_id: int | None = None, deadline: float | None = None) -> bool:
    """Collect one VSP's guests (``vms.inventory.collect_vsp``); whether its agent answered."""
    return collect_vsp(vsp_id, round_id, deadline=deadline)


@shared_task(ignore_result=True)
def recover_migrations(stale_after_s: float | None = None) -> list[int]:
    """Decide migrations whose worker died (no heartbeat for ``stale_after_s``)."""
    return recover_orphans(
        stale_after_s if stale_after_s is not None else settings.MIGRATION_HEARTBEAT_STALE_S
    )


@shared_task(ignore_result=True)
def probe_link(source_id: int, target_id: int) -> None:
    """Probe the link from one VSP to another and store the rate (``link_probes.probe_now``, a few s)."""
    probe_now(source_id, target_id)
