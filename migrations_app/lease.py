"""The decider's lease on a migration: exactly one decider (a worker or recovery) at a time.

A lease is two columns of the migration row: ``lease_owner`` (who decides: ``new_owner``) and
``heartbeat_at`` (its last renewal). It expires ``MIGRATION_HEARTBEAT_STALE_S`` after its last renewal
(the recovery pass's ``stale_after_s``). Every step of the lease is a compare-and-set on the row:

1. The worker takes it with its claim (``scheduling.do_claim_source``: QUEUED -> INIT sets the owner).
2. Its holder renews it (``Lease.renew``: ``heartbeat_at`` := now where ``lease_owner`` is still its own)
   with the worker's heartbeat, and before every agent command that changes something (``confirm``).
3. Recovery takes over only an expired lease (``take_over_expired``: owner := recovery's own id where the
   heartbeat is still older than the limit), so a worker that renewed in between keeps it.
4. A holder whose renewal matched no row lost its lease: it stands down at once (``LeaseLost``): no
   further agent command, no database write except the event saying so (``record_stood_down``).
   Every state change of a decider also carries ``lease_owner`` in its compare (``where``), so a write
   racing the loss (a process resumed after SIGSTOP) matches no row either.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, connection
from django.db.models import Q
from django.utils import timezone

from .errors import Superseded
from .models import Migration, MigrationEvent

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What a query raises when the database dropped this thread's connection (a restart, a failover).
DATABASE_GONE = (OperationalError, InterfaceError)


def reconnecting(query: Callable[[], T]) -> T:
    """``query()``, and once more on a new connection if the database had dropped this thread's.

    Django reconnects only between requests (or tasks); a worker's threads live for a whole migration,
    so after a database restart each of their queries failed until the migration was over (QA: the
    cluster profile's PostgreSQL restarted mid-Copy: the heartbeat stopped and recovery aborted the
    migration). Only for idempotent queries, outside a transaction; raises the second error.
    """
    try:
        return query()
    except DATABASE_GONE:
        if connection.in_atomic_block:
            raise
        connection.close()
        return query()


class LeaseLost(Superseded):
    """This decider's lease was taken over (it was silent past the limit): it must stop deciding."""


def new_owner(kind: str) -> str:
    """A lease owner id, unique per decision run: "worker:host:pid:8-hex" (``kind``: worker, recovery)."""
    return f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"[:100]


class Lease:
    """One decider's hold on one migration; thread-safe (the watchdog renews, the driving thread checks)."""

    def __init__(self, migration_id: int, owner: str) -> None:
        self.migration_id = migration_id
        self.owner = owner
        self.lost = threading.Event()
        self._lock = threading.Lock()

    @property
    def where(self) -> dict[str, Any]:
        """The compare a state change by this holder adds (``transitions.transition(where=...)``)."""
        return {"lease_owner": self.owner}

    def renew(self) -> bool:
        """Renew by compare-and-set; False (and ``lost`` set for good) when another decider holds it.

        Raises ``DATABASE_GONE`` errors while the database does not answer (on a new connection).
        """
        with self._lock:
            if self.lost.is_set():
                return False
            rows = Migration.objects.filter(pk=self.migration_id, lease_owner=self.owner)
            if not reconnecting(lambda: rows.update(heartbeat_at=timezone.now())):
                self.lost.set()
                logger.warning("Migration %s: %s lost its lease", self.migration_id, self.owner)
        return not self.lost.is_set()

    def check(self) -> None:
        """Raise ``LeaseLost`` if a renewal already found the lease gone (no database access)."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.owner} lost its lease on migration {self.migration_id}")

    def confirm(self) -> None:
        """Renew now, before an agent command that changes something; ``LeaseLost`` if it is gone."""
        self.renew()
        self.check()

    def superseded(self) -> Superseded:
        """Why a compare-and-set of this holder matched no row: ``LeaseLost`` if the lease went, else
        ``Superseded`` (the state moved under a lease still its own, e.g. a cancel of a queued one)."""
        if not Migration.objects.filter(pk=self.migration_id, lease_owner=self.owner).exists():
            self.lost.set()
            return LeaseLost(f"{self.owner} lost its lease on migration {self.migration_id}")
        return Superseded()


def take_over_expired(migration: Migration, stale_after_s: float, owner: str) -> Lease | None:
    """Take ``migration``'s lease for ``owner`` if it expired (no renewal for ``stale_after_s``) and the
    state is still the one read; None when its holder renewed meanwhile or another decider won."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=stale_after_s)
    expired = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, state_changed_at__lt=cutoff)
    rows = Migration.objects.filter(expired, pk=migration.pk, state=migration.state)
    if not rows.update(lease_owner=owner, heartbeat_at=now):
        return None
    logger.warning(
        "Migration %s: %s took over the expired lease of %s",
        migration.pk,
        owner,
        migration.lease_owner or "-",
    )
    migration.lease_owner, migration.heartbeat_at = owner, now
    return Lease(migration.pk, owner)


def record_stood_down(lease: Lease) -> None:
    """The one write of a decider that lost its lease: an event on the timeline (the state unchanged)."""
    current = Migration.objects.filter(pk=lease.migration_id).values_list("state", "lease_owner").first()
    if current is None:
        return
    state, holder = current
    message = (
        f"The decider driving this migration ({lease.owner}) was silent past the heartbeat limit and found "
        f"its lease taken over by {holder or 'another decider'}: it stood down and changed nothing more"
    )
    MigrationEvent.objects.create(
        migration_id=lease.migration_id, from_state=state, to_state=state, message=message
    )
    logger.warning("Migration %s: %s", lease.migration_id, message)
