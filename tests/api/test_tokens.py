"""Personal API tokens: the user's own page (create shown once, last use, revoke), the management
command, and what a token can and cannot do."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.test import Client

from api.models import ApiToken
from api.tokens import digest_of, do_create_token
from tests.api.conftest import READ_ONLY, ApiClient
from tests.factories import make_user

pytestmark = pytest.mark.django_db

TOKEN = re.compile(r"moe_[A-Za-z0-9_-]{43}")


@pytest.fixture
def browser():
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("olga", permissions=READ_ONLY))
    return client


def csrf(client: Client) -> str:
    client.get("/account/tokens/")
    return client.cookies["csrftoken"].value


def test_it_creates_a_token_on_the_users_page_and_shows_it_once(browser):
    created = browser.post("/account/tokens/", {"name": "cron", "csrfmiddlewaretoken": csrf(browser)})

    plain = TOKEN.search(created.content.decode()).group(0)
    stored = ApiToken.objects.get()
    assert stored.digest == digest_of(plain) and plain not in (stored.digest, stored.prefix)
    assert created["Cache-Control"] == "no-store"
    later = browser.get("/account/tokens/").content.decode()
    assert plain not in later and stored.prefix in later and "never" in later
    assert ApiClient(plain).get("/vsps").status_code == 200
    stored.refresh_from_db()
    assert stored.last_used_at is not None


def test_it_refuses_a_form_without_the_csrf_token(browser):
    response = browser.post("/account/tokens/", {"name": "cron"})

    assert response.status_code == 403
    assert not ApiToken.objects.exists()


def test_it_refuses_a_token_without_a_name(browser):
    response = browser.post("/account/tokens/", {"name": "  ", "csrfmiddlewaretoken": csrf(browser)})

    assert response.status_code == 400
    assert "Give the token a name" in response.content.decode()
    assert not ApiToken.objects.exists()


def test_it_revokes_a_token_which_then_stops_working(browser):
    user = User.objects.get(username="olga")
    token, plain = do_create_token(user, "cron")

    browser.post(f"/account/tokens/{token.pk}/revoke/", {"csrfmiddlewaretoken": csrf(browser)})

    token.refresh_from_db()
    assert token.revoked_at is not None
    assert ApiClient(plain).get("/vsps").status_code == 401


def test_revoke_is_a_danger_button_that_asks_for_confirmation_first(browser):
    """The QA case: "Revoke" was near-invisible link text that revoked at once."""
    user = User.objects.get(username="olga")
    token, plain = do_create_token(user, "cron")
    page = browser.get("/account/tokens/").content.decode()
    assert f'class="button button-small button-danger" href="/account/tokens/{token.pk}/revoke/"' in page

    confirm = browser.get(f"/account/tokens/{token.pk}/revoke/")

    html = confirm.content.decode()
    assert confirm.status_code == 200 and "Revoke API token “cron”?" in html
    assert 'id="confirm-revoke"' in html and 'id="keep-token"' in html and "onclick" not in html
    token.refresh_from_db()
    assert token.revoked_at is None and ApiClient(plain).get("/vsps").status_code == 200  # not yet
    browser.post(f"/account/tokens/{token.pk}/revoke/", {"csrfmiddlewaretoken": csrf(browser)})
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert browser.get(f"/account/tokens/{token.pk}/revoke/").status_code == 404  # nothing left to confirm


def test_it_never_revokes_another_users_token(browser):
    other, plain = do_create_token(make_user("mallory", permissions=READ_ONLY), "theirs")

    browser.post(f"/account/tokens/{other.pk}/revoke/", {"csrfmiddlewaretoken": csrf(browser)})

    other.refresh_from_db()
    assert other.revoked_at is None
    assert ApiClient(plain).get("/vsps").status_code == 200
    assert "theirs" not in browser.get("/account/tokens/").content.decode()
    assert browser.get(f"/account/tokens/{other.pk}/revoke/").status_code == 404  # nor names it


def test_it_sends_anonymous_visitors_of_the_tokens_page_to_the_login_page(client):
    response = client.get("/account/tokens/")

    assert response.status_code == 302 and "/login/" in response["Location"]


def test_it_refuses_the_token_of_a_deactivated_user():
    user = make_user("gone", permissions=READ_ONLY)
    plain = do_create_token(user, "old")[1]
    user.is_active = False
    user.save()

    assert ApiClient(plain).get("/vsps").status_code == 401


def test_it_creates_a_token_with_the_management_command():
    make_user("alice")
    out = StringIO()

    call_command("create_api_token", "alice", "--name", "ci", stdout=out)

    plain = out.getvalue().strip()
    assert TOKEN.fullmatch(plain)
    assert ApiToken.objects.get().digest == digest_of(plain)
    with pytest.raises(CommandError, match="No user named 'nobody'"):
        call_command("create_api_token", "nobody")
