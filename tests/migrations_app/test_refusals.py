"""Every refused migration attempt is kept in the history, whatever path asked (issue 18 item 5).

QA found a refusal through the API or the CLI rolled back with the request's transaction (the API's
create route runs the action inside its own), and a permission refusal kept by no path at all. Each
path is tried here through the real views and routes (Django's test client, committed transactions),
and the metrics count the refusals by kind. No worker or agent is needed: nothing gets to start.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from migrations_app.models import Migration
from tests.api.conftest import ApiClient
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    grant_role,
    make_host_group,
    make_user,
    make_vm,
    make_vsp,
)
from vms.models import Role

pytestmark = pytest.mark.django_db(transaction=True)

VIEWER_PERMISSIONS = ("vms.view_vsp", "vms.view_virtualmachine", "migrations_app.view_migration")


@pytest.fixture
def fleet():
    """Production (vsp1, vsp2) and Lab (vsp3); web01 runs on vsp1; a full VSP in Production."""
    vsp1, vsp2 = vsp_in("Production", "vsp1"), vsp_in("Production", "vsp2")
    vsp3 = vsp_in("Lab", "vsp3")
    full = vsp_in("Production", "full", memory_mib=100)
    return {"vsp1": vsp1, "vsp2": vsp2, "vsp3": vsp3, "full": full, "web01": make_vm("web01", vsp1)}


def vsp_in(group: str, name: str, **fields):
    return make_vsp(name, group=make_host_group(group), **fields)


@pytest.fixture
def alice():
    """An operator of Production, a viewer of Lab."""
    user = make_user("alice", MIGRATION_ADMIN_PERMISSIONS, role=Role.OPERATOR, group="Production")
    grant_role(user, "Lab", Role.VIEWER)
    return user


@pytest.fixture
def viewer():
    """A viewer of Production without the permission to migrate."""
    return make_user("victor", VIEWER_PERMISSIONS, role=Role.VIEWER, group="Production")


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def refusals() -> list[tuple[str, str, str, str, str]]:
    """(vm, target, who, kind, why) of every refused attempt kept, oldest first."""
    return [
        (m.vm_name, m.target.name, m.requested_by.username if m.requested_by else "", m.failure_kind, m.alert)
        for m in Migration.objects.filter(state=Migration.State.REFUSED).order_by("pk")
    ]


def test_a_refusal_through_the_api_is_kept_although_the_route_rolls_its_transaction_back(fleet, alice):
    api = ApiClient(do_create_token(alice, "cli")[1])

    same_host = api.post("/migrations", {"vm": "web01", "target": "vsp1"}, headers={"Idempotency-Key": "k1"})
    no_room = api.post("/migrations", {"vm": "web01", "target": "full"})

    assert same_host.status_code == no_room.status_code == 409
    assert refusals() == [
        ("web01", "vsp1", "alice", "precheck", "web01 cannot migrate to vsp1: same host."),
        ("web01", "full", "alice", "precheck", no_room.json()["detail"]),
    ]
    assert "not enough free memory" in no_room.json()["detail"]
    # The API lists them as the history page does, for scripts and the CLI.
    listed = api.get("/migrations", vm="web01").json()["items"]
    assert [row["state"]["value"] for row in listed] == ["refused", "refused"]


def test_an_idempotent_retry_is_answered_with_the_first_migration_and_kept_as_no_refusal(fleet, alice):
    api = ApiClient(do_create_token(alice, "cli")[1])
    body, key = {"vm": "web01", "target": "vsp2"}, {"Idempotency-Key": "retry-1"}

    first, retry = api.post("/migrations", body, headers=key), api.post("/migrations", body, headers=key)

    assert (first.status_code, retry.status_code) == (201, 200)
    assert refusals() == []


def test_permission_refusals_are_kept_from_the_page_the_selection_and_the_api(fleet, alice, viewer):
    web01 = fleet["web01"]
    migrate_url = reverse("migrations_app:migrate", args=[web01.pk])

    # A viewer without the permission to migrate, from the dialog's POST and from the API.
    page = logged_in(viewer).post(migrate_url, {"target": fleet["vsp2"].pk})
    api = ApiClient(do_create_token(viewer, "cli")[1]).post("/migrations", {"vm": "web01", "target": "vsp2"})
    # An operator of Production to a Lab VSP they only view: the dialog's POST, "migrate selected".
    forged = logged_in(alice).post(migrate_url, {"target": fleet["vsp3"].pk})
    selected = logged_in(alice).post(
        reverse("migrations_app:migrate_selected", args=[fleet["vsp1"].pk]),
        {"target": fleet["vsp3"].pk, "vm": [web01.pk]},
    )

    assert (page.status_code, api.status_code, forged.status_code, selected.status_code) == (
        403,
        403,
        403,
        302,
    )
    kept = refusals()
    assert [(vm, target, who, kind) for vm, target, who, kind, _ in kept] == [
        ("web01", "vsp2", "victor", "permission"),
        ("web01", "vsp2", "victor", "permission"),
        ("web01", "vsp3", "alice", "permission"),
        ("web01", "vsp3", "alice", "permission"),
    ]
    assert (
        kept[0][4]
        == kept[1][4]
        == "You may look but not change: your account lacks the permission to do this."
    )
    assert kept[2][4] == (
        "You may not migrate web01 to vsp3: you are not an operator of its host group. Nothing was changed."
    )
    assert not Migration.objects.exclude(state=Migration.State.REFUSED).exists()


def test_opening_the_dialog_is_no_attempt_and_a_post_without_a_target_is_none_either(fleet, viewer):
    client = logged_in(viewer)
    url = reverse("migrations_app:migrate", args=[fleet["web01"].pk])

    assert client.get(url).status_code == 403
    assert client.post(url, {}).status_code == 403
    assert refusals() == []


def test_an_evacuation_refused_for_a_guest_keeps_that_guests_refusal(fleet, alice):
    """The plan is re-checked at Start, inside the evacuation's transaction: a target that went into
    maintenance meanwhile refuses the whole start, and that guest's refusal outlives the rollback."""
    vsp2 = fleet["vsp2"]
    client = logged_in(alice)
    url = reverse("evacuations:evacuate", args=[fleet["vsp1"].pk])
    vsp2.maintenance = True
    vsp2.save(update_fields=["maintenance"])

    refused = client.post(url, {f"target_{fleet['web01'].pk}": vsp2.pk})

    assert refused.status_code == 400
    assert "The plan no longer fits: web01 cannot go to vsp2: host in maintenance" in refused.content.decode()
    assert refusals() == [
        ("web01", "vsp2", "alice", "precheck", "web01 cannot go to vsp2: host in maintenance."),
    ]
    fleet["vsp1"].refresh_from_db()
    assert not fleet["vsp1"].maintenance  # the start itself changed nothing


def test_the_metrics_count_refusals_by_kind(fleet, alice, viewer, settings):
    settings.METRICS_ALLOWED_IPS = ["127.0.0.1"]
    ApiClient(do_create_token(alice, "a")[1]).post("/migrations", {"vm": "web01", "target": "vsp1"})
    ApiClient(do_create_token(viewer, "v")[1]).post("/migrations", {"vm": "web01", "target": "vsp2"})
    ApiClient(do_create_token(alice, "a2")[1]).post("/migrations", {"vm": "web01", "target": "vsp2"})
    ApiClient(do_create_token(alice, "a3")[1]).post("/migrations", {"vm": "web01", "target": "vsp2"})

    text = Client(REMOTE_ADDR="127.0.0.1").get("/metrics").content.decode()

    assert 'matrixoe_migration_refusals_total{kind="precheck"} 1.0' in text
    assert 'matrixoe_migration_refusals_total{kind="permission"} 1.0' in text
    assert 'matrixoe_migration_refusals_total{kind="already_migrating"} 1.0' in text


def test_a_refusal_inside_any_callers_transaction_is_kept_once_whether_it_rolls_back_or_commits(fleet, alice):
    """The mechanism every path relies on (an evacuation's start turns the refusal into its own error
    and rolls back; a batch may go on and commit): kept once, after the transaction, never twice."""
    from django.db import transaction

    from migrations_app.actions import MigrationRefused, do_request_migration
    from migrations_app.refusals import refusals_recorded

    class Rollback(Exception):
        pass

    with refusals_recorded(), pytest.raises(Rollback):
        with transaction.atomic():
            try:
                do_request_migration(fleet["web01"], fleet["vsp1"], alice)
            except MigrationRefused:
                assert refusals() == []  # not yet: this transaction may still roll back
                raise Rollback from None
    assert [why for *_, why in refusals()] == ["web01 cannot migrate to vsp1: same host."]

    with refusals_recorded():
        with transaction.atomic():
            with pytest.raises(MigrationRefused):
                do_request_migration(fleet["web01"], fleet["full"], alice)
        assert len(refusals()) == 2  # written at the commit
    assert len(refusals()) == 2  # and not again when the work ends
