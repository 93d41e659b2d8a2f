"""/metrics access rules (token, allowed addresses) and what it counts, from the database alone: the counts
of ended migrations as their outcome events are followed (``api.tallies``), exactly once each."""

from __future__ import annotations

import pytest
from django.test import Client

from api.tokens import do_create_token
from migrations_app.models import Migration
from migrations_app.transitions import transition
from tests.api.conftest import READ_ONLY
from tests.factories import grant_role, make_host_group, make_user, make_vm, make_vsp
from vms.models import Role

pytestmark = pytest.mark.django_db


def scrape(remote_addr: str = "192.0.2.10", token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(REMOTE_ADDR=remote_addr).get("/metrics", headers=headers)


def test_it_serves_metrics_to_an_allowed_address_without_a_token(settings):
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]

    assert scrape("10.1.2.3").status_code == 200
    assert scrape("192.0.2.10").status_code == 401


def test_it_refuses_a_token_of_a_user_who_may_not_view_migrations():
    nobody = do_create_token(make_user("nobody"), "t")[1]

    assert scrape(token=nobody).status_code == 403
    assert scrape(token="moe_wrong").status_code == 401  # noqa: S106 - not a real token


def test_it_refuses_a_token_of_a_user_limited_to_some_host_groups_since_metrics_name_every_vsp():
    production, lab = make_host_group("Production"), make_host_group("Lab")
    vsp1, vsp3 = make_vsp("vsp1", group=production), make_vsp("vsp3", group=lab)
    make_vm("web01", vsp1)
    lab_viewer = make_user("lab-viewer", permissions=READ_ONLY, role=Role.VIEWER, group=lab)
    token = do_create_token(lab_viewer, "t")[1]

    response = scrape(token=token)

    assert response.status_code == 403
    assert "vsp1" not in response.content.decode()
    grant_role(lab_viewer, production, Role.VIEWER)  # now sees every VSP: the whole inventory
    assert 'matrixoe_agent_reachable{vsp="vsp1"}' in scrape(token=token).content.decode()
    assert vsp3.name in scrape(token=token).content.decode()


def test_it_counts_outcomes_failed_phases_queue_and_downtime_as_their_outcome_events_are_followed(
    django_capture_on_commit_callbacks,
):
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb", agent_reachable=False)
    for state, end, failed_phase, downtime in (
        ("committing", "completed", "", 120),
        ("copy", "aborted", "copy", None),
        ("queued", None, "", None),
    ):
        migration = Migration.objects.create(
            vm=make_vm(vsp=hosta), source=hosta, target=hostb, state=state, downtime_ms=downtime
        )
        if end:
            with django_capture_on_commit_callbacks(execute=True):  # delivered on commit
                transition(migration.pk, state, end, message=end, failed_phase=failed_phase)
    token = do_create_token(make_user("olga", permissions=READ_ONLY), "t")[1]

    text = scrape(token=token).content.decode()

    assert 'matrixoe_migrations_total{failed_phase="",outcome="completed"} 1.0' in text
    assert 'matrixoe_migrations_total{failed_phase="copy",outcome="aborted"} 1.0' in text
    assert 'matrixoe_migrations_total{failed_phase="",outcome="cancelled"} 0.0' in text
    assert "matrixoe_migrations_queued 1.0" in text
    assert 'matrixoe_migration_downtime_seconds_bucket{le="0.25"} 1.0' in text
    assert 'matrixoe_migration_downtime_seconds_bucket{le="0.1"} 0.0' in text
    assert 'matrixoe_agent_reachable{vsp="hostb"} 0.0' in text


@pytest.mark.django_db(transaction=True)
async def test_it_counts_the_live_progress_sockets_open_on_this_web_process(settings, redis_url):
    """Watchers joined through this process's fan-out, each counted once whatever groups it joined."""
    from asgiref.sync import sync_to_async

    from migrations_app.fanout import get_fanout

    class Watcher:
        def deliver(self, html: str) -> None:
            pass

    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    fanout = get_fanout()
    first, second = Watcher(), Watcher()
    await fanout.join("vm-metrics-1", first)
    await fanout.join("vsp-metrics-1", first)
    await fanout.join("vm-metrics-1", second)
    try:
        with_two = (await sync_to_async(scrape)("10.1.2.3")).content.decode()
        fanout.leave("vm-metrics-1", second)
        with_one = (await sync_to_async(scrape)("10.1.2.3")).content.decode()
    finally:
        fanout.leave("vm-metrics-1", first)
        fanout.leave("vsp-metrics-1", first)
        for task in fanout.tasks:
            task.cancel()

    assert "matrixoe_websocket_watchers 2.0" in with_two
    assert "matrixoe_websocket_watchers 1.0" in with_one


def test_it_counts_outcome_events_no_follower_has_taken_yet(settings):
    """A worker that died between its commit and its follow-up left an outcome undelivered (this test's
    transaction never commits, so its on-commit delivery never runs); the periodic pass delivers it."""
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.outcomes import deliver_pending
    from migrations_app.transitions import transition

    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    migration = Migration.objects.create(vm=make_vm(vsp=hosta), source=hosta, target=hostb)
    assert "matrixoe_migration_outcomes_undelivered 0.0" in scrape("10.1.2.3").content.decode()

    transition(migration.pk, "queued", "cancelled", message="cancelled while queued")

    assert "matrixoe_migration_outcomes_undelivered 1.0" in scrape("10.1.2.3").content.decode()
    deliver_pending(timezone.now() + timedelta(minutes=10))
    assert "matrixoe_migration_outcomes_undelivered 0.0" in scrape("10.1.2.3").content.decode()


def test_an_outcome_counts_once_its_event_is_followed_once_however_often_offered_and_never_if_rolled_back(
    settings, monkeypatch
):
    """The outcome counts follow the outcome events. An end rolled back with its transaction counts
    nothing. An end whose worker died after its commit (this test's transaction never commits, so the
    on-commit delivery never runs) counts once recovery's periodic pass delivers it, and no more when
    the outcome is offered again because another follower failed the first time."""
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from migrations_app import outcomes
    from migrations_app.outcomes import deliver_pending

    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8"]
    completed = 'matrixoe_migrations_total{failed_phase="",outcome="completed"}'
    hosta, hostb = make_vsp("hosta"), make_vsp("hostb")
    rolled_back = Migration.objects.create(vm=make_vm(vsp=hosta), source=hosta, target=hostb, state="copy")
    with pytest.raises(RuntimeError), transaction.atomic():
        transition(rolled_back.pk, "copy", "aborted", message="aborted", failed_phase="copy")
        raise RuntimeError("the transaction fails after the transition")
    migration = Migration.objects.create(
        vm=make_vm(vsp=hosta), source=hosta, target=hostb, state="committing"
    )
    failures = []

    def fails_once(outcome):
        if not failures:
            failures.append(outcome.migration_id)
            raise RuntimeError("another follower fails the first time")

    monkeypatch.setitem(outcomes._followers, "fails once", fails_once)
    transition(migration.pk, "committing", "completed", message="Completed")

    text = scrape("10.1.2.3").content.decode()
    assert f"{completed} 0.0" in text  # ended, but no follower took its outcome yet
    assert "matrixoe_migration_outcomes_undelivered 1.0" in text
    later = timezone.now() + timedelta(minutes=10)
    assert deliver_pending(later) == []  # one follower failed: offered again after a back-off
    assert f"{completed} 1.0" in scrape("10.1.2.3").content.decode()

    assert deliver_pending(later + timedelta(minutes=10)) == [migration.pk]

    text = scrape("10.1.2.3").content.decode()
    assert failures == [migration.pk]
    assert f"{completed} 1.0" in text
    assert "matrixoe_migration_outcomes_undelivered 0.0" in text
    assert 'failed_phase="copy",outcome="aborted"' not in text
