"""The processes `make run` starts come up and behave as an admin would expect."""

import httpx
import pytest


@pytest.mark.django_db(transaction=True)
def test_it_serves_the_login_page_and_sends_anonymous_users_there(console_server):
    login = httpx.get(f"{console_server}/login/")
    assert login.status_code == 200
    assert 'name="password"' in login.text

    home = httpx.get(f"{console_server}/", follow_redirects=False)
    assert home.status_code == 302
    assert home.headers["location"].startswith("/login/")


@pytest.mark.django_db(transaction=True)
def test_it_serves_htmx_from_static_files(console_server):
    response = httpx.get(f"{console_server}/static/vendor/htmx-2.0.11.min.js")
    assert response.status_code == 200
    assert "htmx" in response.text[:2000]


def test_it_starts_a_celery_worker_that_answers_pings(celery_worker):
    from matrixoe.celery import app

    replies = app.control.ping(destination=[celery_worker.hostname], timeout=5.0)
    assert [celery_worker.hostname] == [name for reply in replies for name in reply]
