"""Prometheus metrics at ``/metrics``, computed from the database at scrape time.

A custom collector (no counters kept in process memory): every web process answers the same numbers, and
a restart loses nothing. Readable with an API token of a user who may view migrations and sees every VSP
(the metrics name every VSP and running guest: a user limited to some host groups is refused, 403), or
without one from the addresses in ``METRICS_ALLOWED_IPS`` (IPs or networks, e.g. ``127.0.0.1,10.0.0.0/8``).

Metrics (units in the names, per the Prometheus naming conventions):
- ``matrixoe_migrations_total{outcome,failed_phase}``: ended migrations (completed, aborted, cancelled);
- ``matrixoe_migration_refusals_total{kind}``: refused attempts, whatever path asked, by kind: the user's
  rights (``permission``), the pre-checks (``precheck``), a migration already queued or running
  (``already_migrating``); see ``migrations_app.refusals``;
- ``matrixoe_migration_phase_duration_seconds{phase}``: histogram of each finished phase's duration;
- ``matrixoe_migration_downtime_seconds``: histogram of measured downtime (Frozen) of completed migrations;
- ``matrixoe_migration_sent_bytes_total``: guest memory bytes sent by every migration (the data plane);
- ``matrixoe_migration_outcomes_undelivered`` and ``matrixoe_migration_outcome_undelivered_age_seconds``:
  migration outcome events (``migrations_app.outcomes``) no follower has taken yet, and the oldest's wait
  (a growing one: a follower keeps failing, or recovery's beat does not run);
- ``matrixoe_migrations_active`` (in a phase) and ``matrixoe_migrations_queued`` (waiting, the hourglass);
- ``matrixoe_migration_phase_age_seconds{migration,vm,phase}``: time each running migration has spent
  in its current phase (the "stuck in one phase" alert);
- ``matrixoe_websocket_watchers``: live-progress sockets open on the web process that answers (the one
  per-process figure: scrape every web process);
- ``matrixoe_agent_reachable{vsp}`` (1/0) and ``matrixoe_agent_checked_timestamp_seconds{vsp}`` (the
  last inventory collection from that host's agent, Unix time); ``matrixoe_agent_unanswered_calls{vsp}``
  (unanswered in a row: the VSP turns unreachable at ``INVENTORY_UNREACHABLE_AFTER``);
- ``matrixoe_agent_collection_duration_seconds{vsp}``: the last periodic inventory call to that agent,
  answered or timed out;
- ``matrixoe_inventory_collection_duration_seconds``: the last finished collection round over every VSP
  (fan-out to the last answer or time-out; it should stay under the collection interval),
  ``matrixoe_inventory_collection_finished_timestamp_seconds`` (when it finished, Unix time) and
  ``matrixoe_inventory_collection_vsps{outcome}`` (answered / unanswered / skipped in that round;
  skipped: its task did not start before the next round was due, the workers are too few).
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from migrations_app import refusals
from migrations_app.fanout import watcher_count
from migrations_app.models import PHASE_FIELD_PREFIX, Migration
from migrations_app.outcomes import undelivered_count
from vms.access import visible_vsps
from vms.models import VSP, InventoryRound, StoragePool

from .problems import problem_response
from .tokens import user_for_token

logger = logging.getLogger(__name__)

VIEW_MIGRATION = "migrations_app.view_migration"
PHASE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DOWNTIME_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def histogram(
    name: str,
    documentation: str,
    samples: dict[str, list[float]],
    label: str | None,
    buckets: tuple[float, ...],
) -> HistogramMetricFamily:
    """A histogram family from raw observations, one series per label value (``label`` None: one series)."""
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for value, observations in samples.items():
        cumulative = [(str(bound), float(sum(1 for o in observations if o <= bound))) for bound in buckets]
        cumulative.append(("+Inf", float(len(observations))))
        family.add_metric([value] if label else [], cumulative, sum(observations))
    return family


class MigrationCollector:
    """Reads migrations and VSPs from the database on every ``collect()`` (each scrape)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "matrixoe_websocket_watchers",
            "Live-progress sockets open on this web process",
            value=watcher_count(),
        )
        yield self._outcomes()
        yield self._refusals()
        yield from self._undelivered_outcomes()
        yield self._phase_durations()
        yield self._downtime()
        yield from self._in_flight()
        yield from self._agents()

    def _outcomes(self) -> Metric:
        family = CounterMetricFamily(
            "matrixoe_migrations",
            "Ended migrations by outcome and failed phase",
            labels=["outcome", "failed_phase"],
        )
        rows = (
            Migration.objects.filter(state__in=Migration.TERMINAL_STATES)
            .values("state", "failed_phase")
            .annotate(n=Count("pk"))
        )
        counts: Counter[tuple[str, str]] = Counter()
        for row in rows:
            counts[(row["state"], row["failed_phase"])] += row["n"]
        for state in Migration.TERMINAL_STATES:  # every outcome present, zero or not, so rate() works
            counts.setdefault((state, ""), 0)
        for (outcome, phase), n in sorted(counts.items()):
            family.add_metric([outcome, phase], n)
        return family

    def _refusals(self) -> Metric:
        """Refused attempts by kind (``migrations_app.refusals.KINDS``); rows kept before kinds were
        (only pre-checks and "already migrating" were kept then) count as pre-checks."""
        family = CounterMetricFamily(
            "matrixoe_migration_refusals",
            "Refused migration attempts by kind: permission, precheck, already_migrating",
            labels=["kind"],
        )
        counts: Counter[str] = Counter({kind: 0 for kind in refusals.KINDS})
        rows = (
            Migration.objects.filter(state=Migration.State.REFUSED)
            .values("failure_kind")
            .annotate(n=Count("pk"))
        )
        for row in rows:
            counts[row["failure_kind"] or refusals.PRECHECK] += row["n"]
        for kind, n in sorted(counts.items()):
            family.add_metric([kind], n)
        return family

    def _undelivered_outcomes(self) -> Iterable[Metric]:
        count, oldest = undelivered_count()
        yield GaugeMetricFamily(
            "matrixoe_migration_outcomes_undelivered",
            "Migration outcome events not yet taken by every follower (e.g. an evacuation)",
            value=count,
        )
        age = (timezone.now() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "matrixoe_migration_outcome_undelivered_age_seconds",
            "How long the oldest undelivered outcome event has waited (0: none waits)",
            value=max(age, 0.0),
        )

    def _phase_durations(self) -> Metric:
        samples: dict[str, list[float]] = {phase: [] for phase in Migration.PHASES}
        fields = [f"{p}_{edge}" for p in PHASE_FIELD_PREFIX.values() for edge in ("started_at", "ended_at")]
        for row in Migration.objects.exclude(init_ended_at=None).values(*fields).iterator():
            for phase, prefix in PHASE_FIELD_PREFIX.items():
                started, ended = row[f"{prefix}_started_at"], row[f"{prefix}_ended_at"]
                if started and ended:
                    samples[phase].append(max((ended - started).total_seconds(), 0.0))
        return histogram(
            "matrixoe_migration_phase_duration_seconds",
            "Duration of each finished migration phase",
            samples,
            "phase",
            PHASE_BUCKETS_S,
        )

    def _downtime(self) -> Metric:
        observations = [
            ms / 1000
            for ms in Migration.objects.filter(state=Migration.State.COMPLETED)
            .exclude(downtime_ms=None)
            .values_list("downtime_ms", flat=True)
            if ms is not None
        ]
        return histogram(
            "matrixoe_migration_downtime_seconds",
            "Measured guest downtime (Frozen) of completed migrations",
            {"": observations},
            None,
            DOWNTIME_BUCKETS_S,
        )

    def _in_flight(self) -> Iterable[Metric]:
        sent = Migration.objects.aggregate(total=Sum("bytes_sent"))["total"] or 0
        yield CounterMetricFamily(
            "matrixoe_migration_sent_bytes", "Guest memory bytes sent by migrations", value=sent
        )
        running = Migration.objects.filter(state__in=Migration.ACTIVE_STATES).exclude(
            state=Migration.State.QUEUED
        )
        queued = Migration.objects.filter(state=Migration.State.QUEUED).count()
        yield GaugeMetricFamily(
            "matrixoe_migrations_active", "Migrations in a phase now", value=running.count()
        )
        yield GaugeMetricFamily(
            "matrixoe_migrations_queued", "Migrations waiting for their source", value=queued
        )
        age = GaugeMetricFamily(
            "matrixoe_migration_phase_age_seconds",
            "Seconds each running migration has spent in its current phase",
            labels=["migration", "vm", "phase"],
        )
        now = timezone.now()
        for pk, vm, state, changed in running.values_list("pk", "vm__name", "state", "state_changed_at"):
            age.add_metric([str(pk), vm, state], max((now - changed).total_seconds(), 0.0))
        yield age

    def _agents(self) -> Iterable[Metric]:
        reachable = GaugeMetricFamily(
            "matrixoe_agent_reachable", "1 if the VSP's host agent answered", labels=["vsp"]
        )
        checked = GaugeMetricFamily(
            "matrixoe_agent_checked_timestamp_seconds",
            "When the VSP's agent was last asked (Unix time)",
            labels=["vsp"],
        )
        failures = GaugeMetricFamily(
            "matrixoe_agent_unanswered_calls",
            "Calls to the VSP's agent left unanswered in a row",
            labels=["vsp"],
        )
        took = GaugeMetricFamily(
            "matrixoe_agent_collection_duration_seconds",
            "How long the last periodic inventory call to the VSP's agent took, answered or timed out",
            labels=["vsp"],
        )
        rows = VSP.objects.values_list(
            "name", "agent_reachable", "agent_checked_at", "agent_failures", "agent_collect_ms"
        )
        for name, ok, at, failed, collect_ms in rows:
            reachable.add_metric([name], 1 if ok else 0)
            failures.add_metric([name], failed)
            if at is not None:
                checked.add_metric([name], at.timestamp())
            if collect_ms is not None:
                took.add_metric([name], collect_ms / 1000)
        yield from (reachable, checked, failures, took)
        yield from self._inventory_round()
        yield from self._pools()

    def _pools(self) -> Iterable[Metric]:
        """Each storage pool's free and total bytes as its agent last reported them (a shared pool once per
        VSP that mounts it: ``identity`` says which rows are the same storage)."""
        labels = ["vsp", "pool", "kind", "identity"]
        free = GaugeMetricFamily(
            "matrixoe_storage_pool_free_bytes", "Free bytes of a VSP's storage pool", labels=labels
        )
        capacity = GaugeMetricFamily(
            "matrixoe_storage_pool_capacity_bytes", "Capacity of a VSP's storage pool (bytes)", labels=labels
        )
        rows = StoragePool.objects.values_list(
            "vsp__name", "name", "kind", "identity", "free_bytes", "capacity_bytes"
        )
        for vsp, name, kind, identity, free_bytes, capacity_bytes in rows:
            free.add_metric([vsp, name, kind, identity], free_bytes)
            capacity.add_metric([vsp, name, kind, identity], capacity_bytes)
        yield from (free, capacity)

    def _inventory_round(self) -> Iterable[Metric]:
        """The last finished collection round (none yet: the families are empty)."""
        last = InventoryRound.objects.exclude(finished_at=None).order_by("-finished_at").first()
        duration = GaugeMetricFamily(
            "matrixoe_inventory_collection_duration_seconds",
            "The last finished inventory collection over every VSP, fan-out to the last answer or time-out",
        )
        finished = GaugeMetricFamily(
            "matrixoe_inventory_collection_finished_timestamp_seconds",
            "When the last inventory collection finished (Unix time)",
        )
        vsps = GaugeMetricFamily(
            "matrixoe_inventory_collection_vsps",
            "VSPs of the last finished inventory collection by outcome (skipped: not started in time)",
            labels=["outcome"],
        )
        if last is not None and last.finished_at is not None:
            duration.add_metric([], last.duration_s or 0.0)
            finished.add_metric([], last.finished_at.timestamp())
            vsps.add_metric(["answered"], last.vsps - last.unanswered - last.skipped)
            vsps.add_metric(["unanswered"], last.unanswered)
            vsps.add_metric(["skipped"], last.skipped)
        yield from (duration, finished, vsps)


def render_metrics() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MigrationCollector())
    return generate_latest(registry)


def address_allowed(address: str, allowed: Iterable[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            logger.warning("METRICS_ALLOWED_IPS: %r is not an address or network; ignored", entry)
    return False


def sees_whole_inventory(user: Any) -> bool:
    """Whether ``user`` may view migrations and sees every VSP (``vms.access.visible_vsps``; one query)."""
    if not user.has_perm(VIEW_MIGRATION):
        return False
    return bool(user.is_superuser) or not VSP.objects.exclude(pk__in=visible_vsps(user).values("pk")).exists()


def may_scrape(request: HttpRequest) -> tuple[bool, int]:
    """(allowed, status if not): a token of a user who may view migrations and sees every VSP (the
    metrics are inventory-wide), or an allowed address."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        user = user_for_token(header[7:].strip())
        if user is None:
            return False, 401
        return (True, 200) if sees_whole_inventory(user) else (False, 403)
    if address_allowed(request.META.get("REMOTE_ADDR", ""), getattr(settings, "METRICS_ALLOWED_IPS", [])):
        return True, 200
    return False, 401


@login_not_required
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    allowed, status = may_scrape(request)
    if not allowed:
        detail = (
            "Send 'Authorization: Bearer <token>' of a user who may view migrations on every VSP, "
            "or scrape from an address in METRICS_ALLOWED_IPS."
        )
        return problem_response(status, detail)
    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE_LATEST)
