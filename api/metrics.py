"""Prometheus metrics at ``/metrics``, read from the database at scrape time.

A custom collector (no counters kept in process memory): every web process answers the same numbers, and
a restart loses nothing. The counts of ended migrations (outcomes, refusals, the phase-duration and
downtime histograms) are tallies kept by following migration outcome events (``api.tallies``): a scrape
reads a few dozen rows for them, whatever the length of the history; a count moves once the outcome is
delivered (``matrixoe_migration_outcomes_undelivered`` counts the outcomes still waiting).

Readable with an API token of a user who may view migrations and sees every VSP
(the metrics name every VSP and running guest: a user limited to some host groups is refused, 403), or
without one from the addresses in ``METRICS_ALLOWED_IPS`` (IPs or networks, e.g. ``127.0.0.1,10.0.0.0/8``).

Metrics (units in the names, per the Prometheus naming conventions):
- ``matrixoe_migrations_total{outcome,failed_phase}``: ended migrations (completed, aborted, cancelled);
- ``matrixoe_migration_refusals_total{kind}``: refused attempts, whatever path asked, by kind: the user's
  rights (``permission``), the pre-checks (``precheck``), a migration already queued or running
  (``already_migrating``); see ``migrations_app.refusals``;
- ``matrixoe_migration_phase_duration_seconds{phase}``: histogram of the duration of each phase an ended
  migration finished (observed when the migration ends);
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
from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db.models import Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from migrations_app import refusals
from migrations_app.fanout import watcher_count
from migrations_app.models import Migration
from migrations_app.outcomes import undelivered_count
from vms.access import visible_vsps
from vms.models import VSP, InventoryRound, StoragePool

from . import tallies
from .problems import problem_response
from .tallies import DOWNTIME_BUCKETS_S, INF, PHASE_BUCKETS_S, SUM, Key
from .tokens import user_for_token

logger = logging.getLogger(__name__)

VIEW_MIGRATION = "migrations_app.view_migration"


def histogram(
    name: str,
    documentation: str,
    totals: dict[Key, float],
    family: str,
    values: Iterable[str],
    buckets: tuple[float, ...],
    label: str | None = None,
) -> HistogramMetricFamily:
    """A histogram family from the tallies of ``family`` (``api.tallies``: per label value, the count of
    each bucket alone and the sum of the observations): one series per value of ``values``, under the
    label ``label`` (None: a single series, ``values`` is ``[""]``)."""
    metric = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for value in values:
        cumulative, seen = [], 0.0
        for bound in buckets:
            seen += totals.get((family, value, str(bound)), 0.0)
            cumulative.append((str(bound), seen))
        cumulative.append(("+Inf", seen + totals.get((family, value, INF), 0.0)))
        metric.add_metric([value] if label else [], cumulative, totals.get((family, value, SUM), 0.0))
    return metric


class MigrationCollector:
    """Reads migrations and VSPs from the database on every ``collect()`` (each scrape)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "matrixoe_websocket_watchers",
            "Live-progress sockets open on this web process",
            value=watcher_count(),
        )
        totals = tallies.totals()
        yield self._outcomes(totals)
        yield self._refusals(totals)
        yield from self._undelivered_outcomes()
        yield self._phase_durations(totals)
        yield self._downtime(totals)
        yield from self._in_flight()
        yield from self._agents()

    def _outcomes(self, totals: dict[Key, float]) -> Metric:
        family = CounterMetricFamily(
            "matrixoe_migrations",
            "Ended migrations by outcome and failed phase",
            labels=["outcome", "failed_phase"],
        )
        counts = {(str(state), ""): 0.0 for state in Migration.TERMINAL_STATES}  # every outcome, for rate()
        for (name, outcome, phase), n in totals.items():
            if name == tallies.MIGRATIONS:
                counts[(outcome, phase)] = counts.get((outcome, phase), 0.0) + n
        for (outcome, phase), n in sorted(counts.items()):
            family.add_metric([outcome, phase], n)
        return family

    def _refusals(self, totals: dict[Key, float]) -> Metric:
        """Refused attempts by kind (``migrations_app.refusals.KINDS``); refusals kept before kinds were
        (only pre-checks and "already migrating" were kept then) count as pre-checks."""
        family = CounterMetricFamily(
            "matrixoe_migration_refusals",
            "Refused migration attempts by kind: permission, precheck, already_migrating",
            labels=["kind"],
        )
        counts = dict.fromkeys(refusals.KINDS, 0.0)
        for (name, kind, _), n in totals.items():
            if name == tallies.REFUSALS:
                counts[kind] = counts.get(kind, 0.0) + n
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

    def _phase_durations(self, totals: dict[Key, float]) -> Metric:
        return histogram(
            "matrixoe_migration_phase_duration_seconds",
            "Duration of each phase an ended migration finished",
            totals,
            tallies.PHASE_SECONDS,
            [str(phase) for phase in Migration.PHASES],
            PHASE_BUCKETS_S,
            "phase",
        )

    def _downtime(self, totals: dict[Key, float]) -> Metric:
        return histogram(
            "matrixoe_migration_downtime_seconds",
            "Measured guest downtime (Frozen) of completed migrations",
            totals,
            tallies.DOWNTIME_SECONDS,
            [""],
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
