"""Host groups in the REST API and the migration history: the same rights as the pages (``vms.access``).

Each user holds every global permission of the console, so the host-group role alone decides.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from migrations_app.models import Migration
from tests.api.conftest import WRITER, ApiClient
from tests.factories import grant_role, make_host_group, make_migration, make_user, make_vm, make_vsp
from vms.models import Role

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():
    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    p1, p2, l1 = make_vsp("vsp-p1", group=prod), make_vsp("vsp-p2", group=prod), make_vsp("vsp-l1", group=lab)
    web, box = make_vm("prod-web", p1), make_vm("lab-box", l1)
    prod_move = make_migration(web, p1, p2, state=Migration.State.COMPLETED)
    lab_move = make_migration(box, l1, l1, state=Migration.State.ABORTED)
    operator = make_user("prod-op", WRITER, role=Role.OPERATOR, group=prod)
    return {
        "p1": p1,
        "p2": p2,
        "l1": l1,
        "web": web,
        "prod_move": prod_move,
        "lab_move": lab_move,
        "op": operator,
    }


def api_for(user) -> ApiClient:
    return ApiClient(do_create_token(user, "tests")[1])


def names(response) -> set[str]:
    assert response.status_code == 200, response.content
    return {item.get("name") or item.get("vm") for item in response.json()["items"]}


def test_the_api_lists_and_finds_only_the_users_groups(world):
    api = api_for(world["op"])
    assert names(api.get("/vsps")) == {"vsp-p1", "vsp-p2"}
    assert names(api.get("/vms")) == {"prod-web"}
    assert api.get("/vms/lab-box").status_code == 404
    assert api.get("/vsps/vsp-l1").status_code == 404
    assert api.get(f"/migrations/{world['lab_move'].pk}").status_code == 404
    assert api.get(f"/migrations/{world['prod_move'].pk}").status_code == 200
    listed = {item["id"] for item in api.get("/migrations").json()["items"]}
    assert listed == {world["prod_move"].pk}


def test_the_api_refuses_a_migration_to_a_target_outside_the_users_operator_groups(world):
    api = api_for(world["op"])
    before = Migration.objects.count()
    assert api.post("/migrations", {"vm": "prod-web", "target": "vsp-l1"}).status_code == 404  # not seen
    grant_role(world["op"], "Lab", Role.VIEWER)
    response = api.post("/migrations", {"vm": "prod-web", "target": "vsp-l1"})
    assert response.status_code == 403
    assert "you are not an operator of its host group" in response.json()["detail"]
    # Nothing started; the refused attempt (the second, on a VSP the user sees) is kept in the history.
    assert Migration.objects.count() == before + 1
    refused = Migration.objects.latest("pk")
    assert (refused.state, refused.failure_kind, refused.target.name) == ("refused", "permission", "vsp-l1")


def test_the_history_and_reports_show_only_the_users_groups(world):
    client = Client()
    client.force_login(make_user("prod-viewer", WRITER, role=Role.VIEWER, group="Prod"))
    html = client.get(reverse("migration_history:list")).text
    assert "prod-web" in html and "lab-box" not in html and "vsp-l1" not in html
    assert client.get(reverse("migration_history:report", args=[world["lab_move"].pk])).status_code == 404
    assert client.get(reverse("migration_history:report", args=[world["prod_move"].pk])).status_code == 200
    csv_text = b"".join(client.get(reverse("migration_history:csv")).streaming_content).decode()
    assert "prod-web" in csv_text and "lab-box" not in csv_text
