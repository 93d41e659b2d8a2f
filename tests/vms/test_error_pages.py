"""Error pages a user can meet: friendly words in the console's layout, with a way back."""

import re

import pytest
from django.test import Client

from api.models import ApiToken
from tests.factories import make_viewer, make_vsp
from vms.templatetags.console import processor_name

pytestmark = pytest.mark.django_db


def assert_friendly_page(response, status: int, says: str) -> None:
    html = response.text
    assert response.status_code == status
    assert f'data-status="{status}"' in html
    assert says in html
    assert 'class="topbar"' in html and "/static/css/console.css" in html  # the console's layout
    assert 'id="back-to-console"' in html
    assert "Resolver404" not in html and "Http404" not in html


@pytest.mark.parametrize("url", ["/vms/abc/general/", "/nonsense/", "/vsps/999999/", "/vms/999999/general/"])
def test_a_wrong_address_is_a_friendly_not_found_page(vm_admin_client, url):
    assert_friendly_page(vm_admin_client.get(url), 404, "There is no page at this address")


def test_a_not_found_message_written_for_people_is_kept(vm_admin_client, fleet):
    response = vm_admin_client.get(f"/vms/{fleet['vpar'].pk}/general/?vsp={fleet['vsp_b'].pk}")
    assert_friendly_page(response, 404, "vpar1 has no configuration on VSP")


def test_a_refused_page_is_a_friendly_forbidden_page(client):
    client.force_login(make_viewer())
    assert_friendly_page(
        client.get("/migrations/vms/1/migrate/"), 403, "may look at the console but not do this"
    )


@pytest.mark.parametrize(
    "url", ["/migrations/1/cancel/", "/vms/1/online-migration/", "/registrations/1/runnable/"]
)
def test_visiting_a_post_only_address_is_a_friendly_405_page(vm_admin_client, url):
    response = vm_admin_client.get(url)
    assert_friendly_page(response, 405, "only takes a form submission")
    assert response["Allow"] == "POST"


@pytest.mark.parametrize("value", ["abc", "0", "1.5"])
def test_a_malformed_vsp_in_the_address_is_said_in_plain_words(vm_admin_client, fleet, value):
    response = vm_admin_client.get(f"/vms/{fleet['web'].pk}/general/?vsp={value}")
    assert_friendly_page(response, 400, "VSP: the address names no VSP")
    assert "Enter a whole number" not in response.text and "Vsp:" not in response.text


def test_the_favicon_is_linked_and_served(vm_admin_client):
    html = vm_admin_client.get("/").text
    assert re.search(r'<link rel="icon" href="/static/favicon.svg"', html)
    response = vm_admin_client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == "/static/favicon.svg"


def test_favicon_needs_no_login(client):
    assert client.get("/favicon.ico").status_code == 301


@pytest.mark.parametrize(
    ("family", "model", "shows"),
    [
        ("Intel Xeon", "Xeon Gold 6338", "Intel Xeon Gold 6338"),
        ("Intel Xeon", "Gold 6338", "Intel Xeon Gold 6338"),
        ("Intel", "Intel Xeon Gold", "Intel Xeon Gold"),
        ("", "", "—"),
    ],
)
def test_a_processor_name_never_repeats_a_word(family, model, shows):
    assert processor_name(make_vsp(processor_family=family, processor_model=model)) == shows


def test_the_vsp_pages_show_the_processor_once(vm_admin_client):
    vsp = make_vsp("h", processor_family="Intel Xeon", processor_model="Xeon Gold 6338")
    for url in ("/vsps/", f"/vsps/{vsp.pk}/"):
        assert "Intel Xeon Gold 6338" in vm_admin_client.get(url).text
        assert "Xeon Xeon" not in vm_admin_client.get(url).text


def test_a_form_with_an_expired_csrf_token_is_a_friendly_forbidden_page(admin_user):
    """The QA case: a stale form showed Django's unstyled "CSRF verification failed" page."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post("/account/tokens/", {"name": "cron", "csrfmiddlewaretoken": "stale" * 8})
    assert_friendly_page(
        response, 403, "form expired or came from another site; reload the page and try again"
    )
    assert "CSRF verification failed" not in response.text
    assert not ApiToken.objects.exists()


def test_a_failed_csrf_check_under_the_api_answers_a_problem_document(admin_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post("/api/v1/migrations/1/events")
    assert response.status_code == 403
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 403 and "reload the page and try again" in problem["detail"]
