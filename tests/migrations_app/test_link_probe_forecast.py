"""The migrate dialog's link rate for a pair with no migration history: a probe between the agents.

Real host agents (simulated driver, mutual TLS on the data plane) on loopback. Most tests call the probe
task directly in the test process (``migrations_app.tasks.probe_link``, the Celery task's own function):
what they check is that the dialog queues it, stays fast, and uses its result. The last one runs it
through Redis and a real Celery worker.
"""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app import estimates, link_probes
from migrations_app.models import LinkProbe, Migration
from migrations_app.tasks import probe_link
from tests.factories import make_migration
from tests.migrations_app.guests import place_vm
from tests.migrations_app.test_policies import HTMX, forecast_cells

pytestmark = pytest.mark.django_db(transaction=True)


def test_with_no_history_the_dialog_measures_the_link_and_then_shows_the_probe_with_its_age(
    host_agents, fleet, migration_admin_client
):
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hosta, hostc = fleet["hosta"], fleet["hostc"]

    before = forecast_cells(migration_admin_client, idle)["hostc"]
    assert "not known yet" in before and "measuring" in before, before
    queued = LinkProbe.objects.get(source=hosta, target=hostc)
    assert queued.requested_at is not None and queued.rate_bytes_s is None
    # The dialog asks again shortly (one loader, delayed) while the probe is on its way.
    html = migration_admin_client.get(f"/migrations/vms/{idle.pk}/forecast/", headers=HTMX).text
    assert re.search(r'id="forecast-loader"[^>]*hx-swap-oob="true"', html) and "load delay:3s" in html
    # At most one probe per pair per minute, however often the dialog asks.
    assert not link_probes.request_probe(hosta, hostc)

    probe_link(hosta.pk, hostc.pk)  # what the worker runs

    measured = LinkProbe.objects.get(source=hosta, target=hostc)
    assert measured.rate_bytes_s and measured.rate_bytes_s > 0 and measured.error == "", measured.error
    after = forecast_cells(migration_admin_client, idle)["hostc"]
    # An idle 8 MiB guest over a fast link: "under 1 s", the console's words (QA: "about 0.0 s").
    assert after.startswith(("Converges · about ", "Converges · under 1 s")), after
    assert "0.0 s" not in after
    said = re.search(r"the link to hostc carried ([\d.]+) MB/s in a probe (\d+ s ago|just now)", after)
    assert said and float(said.group(1)) > 0, after
    assert "measuring" not in after


def test_a_stale_probe_is_shown_with_its_age_and_measured_again(host_agents, fleet, migration_admin_client):
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hosta, hostb = fleet["hosta"], fleet["hostb"]
    two_hours_ago = timezone.now() - timedelta(hours=2)
    LinkProbe.objects.update_or_create(
        source=hosta,
        target=hostb,
        defaults={"rate_bytes_s": 300e6, "measured_at": two_hours_ago, "requested_at": two_hours_ago},
    )

    cell = forecast_cells(migration_admin_client, idle)["hostb"]

    assert "carried 300 MB/s in a probe 2 h ago" in cell, cell
    assert "being measured again" in cell
    assert LinkProbe.objects.get(source=hosta, target=hostb).requested_at > two_hours_ago  # queued again


def test_migration_history_wins_over_a_probe(host_agents, fleet, migration_admin_client):
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hosta, hostb = fleet["hosta"], fleet["hostb"]
    LinkProbe.objects.update_or_create(
        source=hosta, target=hostb, defaults={"rate_bytes_s": 900e6, "measured_at": timezone.now()}
    )
    make_migration(idle, hosta, hostb, state=Migration.State.COMPLETED, throughput_bytes_s=20e6)

    link, measuring = estimates.known_link_rate(hosta, hostb)
    assert link is not None and link.migrations == 1 and link.rate_bytes_s == 20e6 and not measuring
    cell = forecast_cells(migration_admin_client, idle)["hostb"]
    assert "carried 20 MB/s on its last migration" in cell, cell


def test_a_refused_probe_keeps_the_words_and_no_rate(host_agents, fleet):
    """An agent busy migrating (or unreachable) refuses the probe: the row says why, no rate is made up."""
    hosta, hostb = fleet["hosta"], fleet["hostb"]
    hostb.agent_url = "https://127.0.0.1:9"  # nobody listens there
    hostb.save(update_fields=["agent_url"])

    probe_link(hosta.pk, hostb.pk)

    probe = LinkProbe.objects.get(source=hosta, target=hostb)
    assert probe.rate_bytes_s is None and probe.error, probe.error


def test_the_dialog_says_why_the_last_probe_failed(host_agents, fleet, migration_admin_client):
    """A pair whose probe keeps failing does not say "measuring" forever with no reason."""
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hosta, hostb = fleet["hosta"], fleet["hostb"]
    real_url = hostb.agent_url
    hostb.agent_url = "https://127.0.0.1:9"  # nobody listens there
    hostb.save(update_fields=["agent_url"])
    probe_link(hosta.pk, hostb.pk)
    hostb.agent_url = real_url  # the target answers the dialog again; the probe failed meanwhile
    hostb.save(update_fields=["agent_url"])

    cell = forecast_cells(migration_admin_client, idle)["hostb"]

    assert "measuring" in cell and "The last link probe failed: " in cell, cell
    assert LinkProbe.objects.get(source=hosta, target=hostb).error in html.unescape(cell)


def test_a_real_worker_runs_the_probe_the_dialog_queued(
    host_agents, fleet, migration_admin_client, celery_worker, wait_for
):
    """End to end through Redis and a real Celery worker (the test run's queue, which is where
    ``INVENTORY_QUEUE`` sends when unset): the dialog's fetch queues the probe, the worker measures it,
    and the next fetch shows it."""
    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    hosta, hostb = fleet["hosta"], fleet["hostb"]
    assert "measuring" in forecast_cells(migration_admin_client, idle)["hostb"]

    def measured() -> bool:
        return LinkProbe.objects.filter(source=hosta, target=hostb, rate_bytes_s__gt=0).exists()

    assert wait_for(measured, timeout=120), LinkProbe.objects.filter(source=hosta, target=hostb).values()
    cell = forecast_cells(migration_admin_client, idle)["hostb"]
    assert re.search(r"the link to hostb carried [\d.]+ MB/s in a probe (\d+ s ago|just now)", cell), cell


def test_the_links_of_every_pair_are_measured_before_anyone_opens_the_dialog(
    host_agents, fleet, migration_admin_client
):
    """Issue 21.4: on a fresh console the first dialog said "not known yet: measuring it" for every target.
    The periodic sweep (``probe_unmeasured_links``, run here as the worker runs it) probes each pair that
    has no history; then the first dialog opened already forecasts every target."""
    from migrations_app.tasks import probe_unmeasured_links

    idle = place_vm(host_agents, fleet, dirty_pages_per_s=0, memory_mib=8)
    queued = probe_unmeasured_links()
    pairs = set(
        LinkProbe.objects.filter(requested_at__isnull=False).values_list("source__name", "target__name")
    )
    assert {("hosta", "hostb"), ("hosta", "hostc"), ("hostb", "hosta")} <= pairs, pairs
    assert queued == len(pairs)
    for source, target in pairs:  # what the worker runs for each queued probe
        probe_link(fleet[source].pk, fleet[target].pk)
    assert probe_unmeasured_links() == 0  # measured: nothing left to probe

    cells = forecast_cells(migration_admin_client, idle)
    assert "not known yet" not in cells["hostb"] and "not known yet" not in cells["hostc"], cells
    assert "in a probe" in cells["hostc"], cells["hostc"]


def test_a_migration_under_a_bandwidth_cap_of_its_own_is_not_taken_for_the_link_rate():
    """QA: one migration capped at 5 MB/s made the dialog say the pair's link "carried 6.0 MB/s on its
    last migration" (it carries ~150 MB/s), and the evacuation and return plans' times followed. A
    capped migration measured its cap: the link rate and the dirty rounds' cost skip it."""
    from migrations_app import migration_policy
    from tests.factories import make_vm, make_vsp

    source, target = make_vsp("capa"), make_vsp("capb")
    vm = make_vm("capped01", source)
    uncapped = migration_policy.effective({})
    capped = {**uncapped, "preset": "custom", "bandwidth_cap_mb_s": 5}
    now = timezone.now()
    for minutes_ago, throughput, policy in ((30, 150e6, uncapped), (1, 6e6, capped)):
        make_migration(
            vm, source, target, state=Migration.State.COMPLETED, throughput_bytes_s=throughput, policy=policy,
            state_changed_at=now - timedelta(minutes=minutes_ago),
        )  # fmt: skip

    link = estimates.link_rate(source, target)
    assert link is not None and link.rate_bytes_s == pytest.approx(150e6) and link.migrations == 1
    assert "30 min ago" in link.words()

    Migration.objects.filter(throughput_bytes_s=150e6).delete()
    assert estimates.link_rate(source, target) is None  # only a capped one: no history of the link
