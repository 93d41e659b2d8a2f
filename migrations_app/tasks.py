"""Celery tasks of the control plane: thin wrappers taking primary keys (JSON only)."""

from __future__ import annotations

import time

from celery import shared_task
from django.conf import settings

from vms.inventory import collect_vsp, start_round

from .engine import drive_migration
from .link_probes import probe_now
from .outcomes import deliver_pending
from .recovery import recover_orphans


@shared_task(ignore_result=True)
def run_migration(migration_id: int) -> None:
    """Drive one migration; a no-op if it is not (or no longer) its source's turn."""
    drive_migration(migration_id)


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
    """Decide migrations whose worker died (no heartbeat for ``stale_after_s``), then deliver the
    outcomes their deciders did not (``outcomes.deliver_pending``)."""
    stale_s = stale_after_s if stale_after_s is not None else settings.MIGRATION_HEARTBEAT_STALE_S
    acted = recover_orphans(stale_s)
    deliver_pending()
    return acted


@shared_task(ignore_result=True)
def probe_link(source_id: int, target_id: int) -> None:
    """Probe the link from one VSP to another and store the rate (``link_probes.probe_now``, a few s)."""
    probe_now(source_id, target_id)
