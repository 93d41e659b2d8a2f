"""Link probes: the link rate of a pair of VSPs that has no migration history yet.

The source agent sends filler to the target agent's data plane for at most ``PROBE_SECONDS`` or
``PROBE_BYTES`` (``hostagent/probe.py``: authenticated like a migration's stream, under the pair's
encryption policy) and reports the bytes/s the target received. The last result per pair (source ->
target) is a ``LinkProbe`` row with its time.

- ``fresh_probe`` reads it (never waits); a result older than ``PROBE_FRESH_S`` is stale.
- ``request_probe`` queues a probe in the background (the Celery task ``probe_link`` on the inventory
  queue: short agent calls) at most once per ``PROBE_INTERVAL_S`` per pair: the claim is a
  compare-and-set on ``requested_at``. A probe takes a few seconds (its agent calls time out well
  within the interval), so at most one per pair is in flight.
- ``probe_now`` is the task's body: it asks the target to open a probe listener, the source to probe
  it, and stores the rate, or the refusal's words (an agent busy migrating refuses: probe later); then
  it tells the General tabs of the source's guests (``progress.publish_link_probed``), so an open
  migrate dialog shows the result at once (its 3 s poll stays the fallback).
- ``probe_unmeasured_pairs`` (the periodic task ``probe_unmeasured_links``, every
  ``LINK_SWEEP_INTERVAL_S``) requests a probe for every pair that could migrate and has neither
  history nor a fresh probe, so the first dialog opened already has its links measured (issue 21.4:
  a fresh console said "not known yet: measuring it" for every target).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agentprotocol import ProbeRequest
from vms.agent_client import AgentClient, AgentError
from vms.models import VSP, PairEncryption

from .models import LinkProbe
from .progress import publish_link_probed

log = logging.getLogger(__name__)

PROBE_FRESH_S = 3600  # a probe older than this is measured again when the forecast needs it
PROBE_INTERVAL_S = 60  # at most one probe per pair in this time
PROBE_BYTES = 64 << 20  # filler per probe, at most (the agent's bound: agentprotocol.MAX_PROBE_BYTES)
PROBE_SECONDS = 0.5  # sending time per probe, at most
PROBE_TASK = "migrations_app.tasks.probe_link"
SWEEP_MAX_PAIRS = 50  # probes a sweep requests at most (a big fleet's pairs are covered over several)


def latest_probe(source: VSP, target: VSP) -> LinkProbe | None:
    """The pair's last successful probe, however old, or None."""
    return LinkProbe.objects.filter(source=source, target=target, rate_bytes_s__gt=0).first()


def last_failure(source: VSP, target: VSP) -> str:
    """Why the pair's last probe failed, in words ('' when it worked or none was tried)."""
    errors = LinkProbe.objects.filter(source=source, target=target).values_list("error", flat=True)
    return errors.first() or ""


def is_fresh(probe: LinkProbe) -> bool:
    """Measured within ``PROBE_FRESH_S``."""
    return probe.measured_at is not None and timezone.now() - probe.measured_at <= timedelta(
        seconds=PROBE_FRESH_S
    )


def request_probe(source: VSP, target: VSP) -> bool:
    """Queue a probe of ``source`` -> ``target`` unless one was asked for within ``PROBE_INTERVAL_S``.

    Returns whether this call queued it (False: another request won the claim). The task is sent once
    the transaction commits.
    """
    probe, _ = LinkProbe.objects.get_or_create(source=source, target=target)
    now = timezone.now()
    due = Q(requested_at__isnull=True) | Q(requested_at__lt=now - timedelta(seconds=PROBE_INTERVAL_S))
    if not LinkProbe.objects.filter(Q(pk=probe.pk) & due).update(requested_at=now):
        return False
    source_id, target_id = source.pk, target.pk
    transaction.on_commit(
        lambda: current_app.send_task(PROBE_TASK, args=(source_id, target_id), queue=settings.INVENTORY_QUEUE)
    )
    log.info("queued a link probe %s -> %s", source.name, target.name)
    return True


def probe_now(source_id: int, target_id: int) -> LinkProbe | None:
    """Probe ``source`` -> ``target`` now (a few seconds) and store the result; None if a VSP is gone.

    Under the pair's encryption policy (``PairEncryption.policy_between``), the same as a migration's.
    A refusal or an unreachable agent is stored in ``error`` (the previous rate stays).
    """
    source = VSP.objects.filter(pk=source_id).first()
    target = VSP.objects.filter(pk=target_id).first()
    if source is None or target is None:
        return None
    probe, _ = LinkProbe.objects.get_or_create(source=source, target=target)
    encryption = PairEncryption.policy_between(source, target)
    try:
        with AgentClient.for_vsp(target) as receiver:
            request = ProbeRequest(encryption=encryption, max_bytes=PROBE_BYTES, seconds=PROBE_SECONDS)
            prepared = receiver.prepare_probe(request)
        with AgentClient.for_vsp(source) as sender:
            result = sender.probe(prepared.probe_run(encryption))
    except AgentError as error:
        log.info("link probe %s -> %s failed: %s", source.name, target.name, error)
        probe.error = str(error)[:500]
        probe.save(update_fields=["error"])
        publish_link_probed(source.pk)  # the dialog says why it failed at once
        return probe
    probe.rate_bytes_s = float(result.rate_bytes_s)
    probe.measured_at = timezone.now()
    probe.error = ""
    probe.save(update_fields=["rate_bytes_s", "measured_at", "error"])
    log.info("link probe %s -> %s: %.0f MB/s", source.name, target.name, probe.rate_bytes_s / 1e6)
    publish_link_probed(source.pk)  # an open migrate dialog forecasts with it at once
    return probe


def probe_unmeasured_pairs(limit: int = SWEEP_MAX_PAIRS) -> int:
    """Request a probe (``request_probe``) for each ordered pair of VSPs that may take part in a
    migration (agent reachable, migration enabled and licensed; the target not in maintenance) with no
    completed migration between them and no probe measured within ``PROBE_FRESH_S``; at most ``limit``
    pairs, the longest unprobed first. Returns how many were queued. Three reads whatever the fleet,
    then one claim per pair requested.
    """
    from .models import Migration

    usable = list(
        VSP.objects.filter(agent_reachable=True, migration_enabled=True, licensed=True).order_by("pk")
    )
    history = set(
        Migration.objects.filter(state=Migration.State.COMPLETED, throughput_bytes_s__gt=0)
        .values_list("source_id", "target_id")
        .distinct()
    )
    since = timezone.now() - timedelta(seconds=PROBE_FRESH_S)
    probes = {
        (probe.source_id, probe.target_id): probe
        for probe in LinkProbe.objects.filter(source__in=usable, target__in=usable)
    }
    due = []
    for source in usable:
        for target in usable:
            pair = (source.pk, target.pk)
            probe = probes.get(pair)
            fresh = probe is not None and probe.measured_at is not None and probe.measured_at >= since
            if source.pk != target.pk and not target.maintenance and pair not in history and not fresh:
                asked = probe.requested_at if probe is not None and probe.requested_at else None
                due.append((asked is not None, asked or since, source, target))
    due.sort(key=lambda row: (row[0], row[1]))
    return sum(request_probe(source, target) for _, _, source, target in due[:limit])
