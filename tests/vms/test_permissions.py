"""Who may do what: anonymous users go to login, read-only operators look but change nothing."""

import pytest

from tests.factories import make_user, make_viewer, make_vm_admin
from tests.vms.conftest import snapshot

pytestmark = pytest.mark.django_db


def page_urls(fleet) -> list[str]:
    web = fleet["web"]
    return [
        "/",
        "/vsps/",
        f"/vsps/{fleet['vsp_a'].pk}/",
        f"/vms/{web.pk}/general/",
        f"/vms/{web.pk}/general/?vsp={fleet['vsp_a'].pk}",
        f"/vms/{web.pk}/general/refresh/",
    ]


def change_requests(fleet) -> list[tuple[str, dict]]:
    return [
        (f"/vms/{fleet['web'].pk}/online-migration/", {"enabled": "false"}),
        (f"/registrations/{fleet['stopped_registration'].pk}/not-runnable/", {"reason": "maintenance"}),
        (f"/registrations/{fleet['web_copy'].pk}/runnable/", {}),
    ]


def test_it_sends_anonymous_users_to_login_from_every_page(client, fleet):
    for url in page_urls(fleet):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url


def test_it_sends_anonymous_changes_to_login_and_changes_nothing(client, fleet):
    before = snapshot()
    for url, data in change_requests(fleet):
        response = client.post(url, data)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url
    assert snapshot() == before


def test_an_operator_can_look_at_every_page(client, fleet):
    client.force_login(make_viewer())
    for url in page_urls(fleet):
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("htmx", [False, True])
def test_an_operator_is_refused_every_change_and_nothing_changes(client, fleet, htmx):
    client.force_login(make_viewer())
    headers = {"HX-Request": "true"} if htmx else {}
    before = snapshot()
    for url, data in change_requests(fleet):
        response = client.post(url, data, headers=headers)
        assert response.status_code == 403, url
        assert "lacks the permission" in response.text, url
    assert snapshot() == before


@pytest.mark.parametrize("htmx", [False, True])
def test_a_forbidden_post_answers_a_short_refusal_not_the_general_tab(client, fleet, htmx):
    client.force_login(make_viewer())
    headers = {"HX-Request": "true"} if htmx else {}
    for url, data in change_requests(fleet):
        response = client.post(url, data, headers=headers)
        assert response.status_code == 403, url
        assert 'id="general-tab"' not in response.text, url
        assert fleet["web"].name not in response.text, url
        if htmx:
            assert response["HX-Retarget"] == "#refusal", url
            assert len(response.text) < 200, url


def test_an_operator_sees_no_change_buttons(client, fleet):
    client.force_login(make_viewer())
    page = client.get(f"/vms/{fleet['web'].pk}/general/").text
    assert "Disable for VM" not in page
    assert "Mark Not Runnable" not in page
    assert "Mark Runnable" not in page
    assert "read-only" in page


def test_a_user_without_view_permission_sees_nothing(client, fleet):
    client.force_login(make_user("nobody"))
    for url in page_urls(fleet):
        assert client.get(url).status_code == 403, url


def test_a_vm_admin_with_model_permissions_may_change(client, fleet):
    client.force_login(make_vm_admin())
    stopped = fleet["stopped_registration"]
    assert client.post(f"/vms/{fleet['web'].pk}/online-migration/", {"enabled": "false"}).status_code == 302
    assert (
        client.post(f"/registrations/{stopped.pk}/not-runnable/", {"reason": "disk check"}).status_code == 302
    )
    stopped.refresh_from_db()
    assert (stopped.hardware_status, stopped.not_runnable_set_by) == ("not_runnable", "admin")
    assert client.post(f"/registrations/{stopped.pk}/runnable/").status_code == 302
    stopped.refresh_from_db()
    assert (stopped.hardware_status, stopped.not_runnable_reason) == ("off", "")
    fleet["web"].refresh_from_db()
    assert fleet["web"].online_migration_enabled is False


def test_it_refuses_changes_by_get(client, fleet):
    client.force_login(make_vm_admin())
    before = snapshot()
    for url, _ in change_requests(fleet):
        assert client.get(url).status_code == 405, url
    assert snapshot() == before
