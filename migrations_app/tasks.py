"""Celery tasks of the control plane: thin wrappers taking primary keys (JSON only)."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from vms.inventory import collect_all_inventory

from .engine import drive_migration
from .recovery import recover_orphans


@shared_task(ignore_result=True)
def run_migration(migration_id: int) -> None:
    """Drive one migration; a no-op if it is not (or no longer) its source's turn."""
    drive_migration(migration_id)


@shared_task(ignore_result=True)
def collect_inventory() -> None:
    """Re-collect guests from every agent; agents that do not answer are marked unreachable."""
    collect_all_inventory()


@shared_task(ignore_result=True)
def recover_migrations(stale_after_s: float | None = None) -> list[int]:
    """Decide migrations whose worker died (no heartbeat for ``stale_after_s``)."""
    return recover_orphans(
        stale_after_s if stale_after_s is not None else settings.MIGRATION_HEARTBEAT_STALE_S
    )
