"""Periodic inventory collection through a real Celery worker: one task per VSP (issue 13, item 9).

A hung agent (a port that accepts and never answers, ``devtools.blackhole``) delays no other VSP; a VSP
turns unreachable only after ``INVENTORY_UNREACHABLE_AFTER`` (3) unanswered collections, shows since when,
and is reachable again at its first answer; ``/metrics`` tells how long collection took.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from devtools.blackhole import BlackHole
from tests.conftest import ManagedProcess, free_port, start_celery_worker
from tests.factories import make_vsp
from tests.migrations_app.guests import place_vm
from vms.inventory import collect_vsp, start_round
from vms.models import VSP, InventoryRound, Registration
from vms.tasks import collect_inventory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def _inventory_worker(django_db_setup, redis_url) -> Iterator[tuple[str, ManagedProcess]]:
    """A worker on a queue of its own whose agent time-out outlasts any test: a hung agent ends only when
    the test releases it, so what the other VSPs' tasks did meanwhile is not a race against a clock."""
    from django.conf import settings

    queue = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-inventory-{time.monotonic_ns()}"
    worker = start_celery_worker("inventory", 4, queue, INVENTORY_AGENT_TIMEOUT_S="600")
    yield queue, worker
    worker.stop()


@pytest.fixture
def inventory_worker(_inventory_worker, settings) -> ManagedProcess:
    """The worker, with this test's collection tasks routed to its queue."""
    queue, worker = _inventory_worker
    settings.INVENTORY_QUEUE = queue
    return worker


def finished_round(round_id: int, wait_for) -> InventoryRound:
    assert wait_for(lambda: InventoryRound.objects.get(pk=round_id).finished_at is not None, timeout=60)
    return InventoryRound.objects.get(pk=round_id)


def agent_shown(client: Client, url: str, vsp: str = "") -> str:
    """The Agent cell's text on a page (on the VSP list, in ``vsp``'s row)."""
    html = client.get(url).content.decode()
    if vsp:
        html = html[html.index(f'data-vsp="{vsp}"') :]
    cell = re.split(r"</td>|</dd>", html.split('data-field="agent">', 1)[1], maxsplit=1)[0]
    return " ".join(re.sub(r"<[^>]+>", " ", cell).split())


@pytest.fixture
def hung_vsp() -> Iterator[tuple[VSP, BlackHole]]:
    """A VSP whose agent accepts connections and never answers; asked before a test's ``fleet`` (its
    primary key is lower), so a collection that went VSP by VSP would be stuck on it first."""
    hung = BlackHole()
    try:
        yield make_vsp("stuck", agent_url=hung.urls()[0]), hung
    finally:
        hung.release()


def test_a_hung_agent_delays_no_other_vsp(hung_vsp, host_agents, fleet, inventory_worker, wait_for):
    stuck, hung = hung_vsp
    others = [vsp.pk for vsp in fleet.values()]
    VSP.objects.filter(pk__in=others).update(agent_reachable=False, agent_failures=3)
    vm = place_vm(host_agents, fleet, on="hostb")
    Registration.objects.filter(vm=vm).update(hardware_status="off")

    round_id = collect_inventory()

    assert wait_for(lambda: VSP.objects.filter(pk__in=others, agent_reachable=True).count() == 3, timeout=60)
    assert Registration.objects.get(vm=vm).hardware_status == "on"
    # ... while the hung agent's call still waits: nothing recorded for it, the round not over
    assert VSP.objects.values_list("agent_checked_at", "agent_failures").get(pk=stuck.pk) == (None, 0)
    assert InventoryRound.objects.get(pk=round_id).finished_at is None

    hung.release()  # its waiting connection is reset: the call fails now

    done = finished_round(round_id, wait_for)
    assert (done.vsps, done.done, done.unanswered) == (4, 4, 1)
    assert VSP.objects.values_list("agent_reachable", "agent_failures").get(pk=stuck.pk) == (True, 1)


def test_unreachable_after_three_unanswered_rounds_with_since_when_then_reachable_again(
    host_agents, fleet, inventory_worker, wait_for, viewer_client
):
    hosta = fleet["hosta"]
    real_url = hosta.agent_url
    VSP.objects.filter(pk=hosta.pk).update(agent_url=f"https://127.0.0.1:{free_port()}")  # nobody there
    list_url, detail_url = reverse("vms:vsp_list"), reverse("vms:vsp_detail", args=[hosta.pk])

    shown = []
    for _ in range(3):
        finished_round(collect_inventory(), wait_for)
        shown.append(agent_shown(viewer_client, list_url, "hosta"))
    detail = agent_shown(viewer_client, detail_url)

    since = VSP.objects.get(pk=hosta.pk).unreachable_since
    assert since is not None
    assert shown[:2] == ["Reachable", "Reachable"]
    assert shown[2] == f"Unreachable since {timezone.localtime(since):%H:%M} UTC"
    assert detail.startswith(f"Unreachable since {timezone.localtime(since):%H:%M} UTC (last asked ")
    assert {name: agent_shown(viewer_client, list_url, name) for name in ("hostb", "hostc")} == {
        "hostb": "Reachable",
        "hostc": "Reachable",
    }

    VSP.objects.filter(pk=hosta.pk).update(agent_url=real_url)  # the agent is back
    finished_round(collect_inventory(), wait_for)

    assert VSP.objects.values_list("agent_reachable", "agent_failures", "unreachable_since").get(
        pk=hosta.pk
    ) == (True, 0, None)
    assert agent_shown(viewer_client, list_url, "hosta") == "Reachable"
    assert agent_shown(viewer_client, detail_url).startswith("Reachable (last asked ")


def test_metrics_tell_how_long_collection_took_and_which_agents_answer(
    host_agents, fleet, inventory_worker, wait_for, settings
):
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    silent = make_vsp("silent", agent_url=f"https://127.0.0.1:{free_port()}")
    VSP.objects.filter(pk=silent.pk).update(agent_failures=2)  # this round's failure is its third
    done = finished_round(collect_inventory(), wait_for)

    text = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()

    took = re.search(r"^matrixoe_inventory_collection_duration_seconds ([0-9.e+-]+)$", text, re.M)
    assert took and float(took[1]) == pytest.approx(done.duration_s, abs=1e-3)
    assert 'matrixoe_inventory_collection_vsps{outcome="answered"} 3.0' in text
    assert 'matrixoe_inventory_collection_vsps{outcome="unanswered"} 1.0' in text
    assert 'matrixoe_inventory_collection_vsps{outcome="skipped"} 0.0' in text
    assert "matrixoe_inventory_collection_finished_timestamp_seconds " in text
    for name in ("hosta", "hostb", "hostc", "silent"):
        series = rf'^matrixoe_agent_collection_duration_seconds{{vsp="{name}"}} [0-9.e+-]+$'
        assert re.search(series, text, re.M), name
    assert 'matrixoe_agent_reachable{vsp="silent"} 0.0' in text
    assert 'matrixoe_agent_reachable{vsp="hosta"} 1.0' in text
    assert 'matrixoe_agent_unanswered_calls{vsp="silent"} 3.0' in text


@pytest.mark.postgres  # the round's counting UPDATE again on PostgreSQL (integer + boolean is refused there)
def test_a_task_that_starts_after_the_next_round_was_due_skips_its_agent(host_agents, fleet):
    """A backlog (too few workers, a worker that was down) drains without asking anyone, and the round
    still finishes, saying how many it skipped."""
    round_id, vsp_ids = start_round()

    answered = [collect_vsp(pk, round_id, deadline=time.time() - 1) for pk in vsp_ids]

    assert answered == [False, False, False]
    done = InventoryRound.objects.get(pk=round_id)
    assert (done.done, done.unanswered, done.skipped, done.finished_at is not None) == (3, 0, 3, True)
    assert set(VSP.objects.values_list("agent_checked_at", "agent_failures", "agent_reachable")) == {
        (None, 0, True)
    }
