"""Celery tasks of the inventory: thin wrappers taking primary keys (JSON only).

Beat runs ``collect_inventory`` every ``INVENTORY_INTERVAL_S`` (``CELERY_BEAT_SCHEDULE``).
"""

from __future__ import annotations

import time

from celery import shared_task
from django.conf import settings

from .inventory import collect_vsp, start_round


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
