"""Celery tasks of the control plane: thin wrappers taking primary keys (JSON only)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from django.conf import settings

from vms import tasks as inventory_tasks

from .engine import drive_migration
from .link_probes import probe_now, probe_unmeasured_pairs
from .outcomes import deliver_pending
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


@shared_task(ignore_result=True)
def probe_unmeasured_links() -> int:
    """Periodic (beat): probe the pairs no migration or fresh probe measured yet, before a dialog asks
    (``link_probes.probe_unmeasured_pairs``); returns how many probes were queued."""
    return probe_unmeasured_pairs()


# The inventory's tasks were defined here until they moved to ``vms.tasks``: tasks queued under these
# names (a broker of a running deployment, a beat schedule of that time) still run, as the new ones.
@shared_task(name="migrations_app.tasks.collect_inventory", ignore_result=True)
def collect_inventory_by_its_old_name() -> int:
    """``vms.tasks.collect_inventory``, under the name it was queued with before it moved."""
    return inventory_tasks.collect_inventory()


@shared_task(name="migrations_app.tasks.collect_vsp_inventory", ignore_result=True)
def collect_vsp_inventory_by_its_old_name(
    vsp_id: int, round_id: int | None = None, deadline: float | None = None
) -> bool:
    """``vms.tasks.collect_vsp_inventory``, under the name it was queued with before it moved."""
    return inventory_tasks.collect_vsp_inventory(vsp_id, round_id, deadline)
