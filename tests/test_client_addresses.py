"""Who is asking: forwarded headers believed only from configured proxies (issue 18 item 15).

QA, against `make run`: its web server believed X-Forwarded-For from 127.0.0.1, where every client of
`make run` comes from, so 80 wrong passwords from rotating fake addresses locked nothing, and
``X-Forwarded-For: 10.0.0.5`` passed ``METRICS_ALLOWED_IPS=10.0.0.5``. Tried again here as the tester
did, against a real uvicorn started as `make run` starts it (``devtools.processes``). "Another address"
is a real one: Linux routes all of 127.0.0.0/8 to the loopback, so a client may connect from 127.0.0.2.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from devtools.processes import free_port
from tests.conftest import BASE_DIR, start_console_server, subprocess_env
from tests.factories import PASSWORD, make_admin

pytestmark = pytest.mark.django_db(transaction=True)

ATTACKER, ELSEWHERE = "127.0.0.1", "127.0.0.2"


def console(**settings: str) -> Iterator[str]:
    server, url = start_console_server(AXES_ENABLED="true", AXES_FAILURE_LIMIT="5", **settings)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def direct(redis_url) -> Iterator[str]:
    """Clients reach the console directly (no proxy configured: the default)."""
    yield from console(METRICS_ALLOWED_IPS=f"10.0.0.5,{ELSEWHERE}")


@pytest.fixture
def behind_a_proxy(redis_url) -> Iterator[str]:
    """A reverse proxy on 127.0.0.1 in front of the console."""
    yield from console(TRUSTED_PROXIES=ATTACKER, METRICS_ALLOWED_IPS="10.0.0.5")


def client_from(url: str, address: str) -> httpx.Client:
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30)


def log_in(client: httpx.Client, username: str, password: str, forwarded_for: str | None = None) -> int:
    """POST the login form as a browser would (CSRF cookie and token); the answer's status."""
    return login_answer(client, username, password, forwarded_for).status_code


def login_answer(
    client: httpx.Client, username: str, password: str, forwarded_for: str | None = None
) -> httpx.Response:
    page = client.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
    return client.post("/login/", data=form, headers=headers)


def test_eighty_wrong_passwords_from_rotating_fake_addresses_are_locked_out_but_the_admin_elsewhere_is_not(
    direct,
):
    admin = make_admin("root")
    with client_from(direct, ATTACKER) as attacker, client_from(direct, ELSEWHERE) as real_admin:
        answers = [log_in(attacker, "root", f"guess-{i}", forwarded_for=f"198.51.{i}.7") for i in range(80)]

        assert answers[:4] == [200] * 4  # the form again, "wrong password"
        assert set(answers[5:]) == {429}, answers  # locked from the 6th on, whatever address it names
        assert log_in(attacker, admin.username, PASSWORD, forwarded_for="203.0.113.1") == 429
        locked = login_answer(attacker, admin.username, PASSWORD).text
        assert (
            "from your address 127.0.0.1" in locked and "from other addresses the account logs in" in locked
        )
        # The account is locked from the attacker's address only: the admin elsewhere logs in.
        assert log_in(real_admin, admin.username, PASSWORD) == 302


def test_a_forwarded_address_from_loopback_does_not_pass_the_metrics_allow_list(direct):
    with client_from(direct, ATTACKER) as local, client_from(direct, ELSEWHERE) as listed:
        assert local.get("/metrics", headers={"X-Forwarded-For": "10.0.0.5"}).status_code == 401
        assert local.get("/metrics", headers={"Forwarded": "for=10.0.0.5"}).status_code == 401
        assert listed.get("/metrics").status_code == 200  # its own address is listed


def test_behind_a_configured_proxy_the_forwarded_address_counts_and_only_from_the_proxy(behind_a_proxy):
    admin = make_admin("root")
    with client_from(behind_a_proxy, ATTACKER) as proxy, client_from(behind_a_proxy, ELSEWHERE) as stranger:
        assert proxy.get("/metrics", headers={"X-Forwarded-For": "10.0.0.5"}).status_code == 200
        assert stranger.get("/metrics", headers={"X-Forwarded-For": "10.0.0.5"}).status_code == 401
        # Through the proxy, failures lock the attacker's own address, not the admin's.
        answers = [log_in(proxy, "root", f"guess-{i}", forwarded_for="203.0.113.9") for i in range(8)]
        assert answers[-1] == 429
        assert log_in(proxy, admin.username, PASSWORD, forwarded_for="203.0.113.9") == 429
        assert log_in(proxy, admin.username, PASSWORD, forwarded_for="198.51.100.7") == 302


def test_uvicorn_left_to_believe_proxy_headers_itself_refuses_to_serve_the_console():
    """Its default believes X-Forwarded-For from 127.0.0.1: the console must be started without that."""
    started = subprocess.run(
        [sys.executable, "-m", "uvicorn", "matrixoe.asgi:application", "--port", str(free_port())],
        cwd=BASE_DIR,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode != 0
    assert "Start uvicorn with --no-proxy-headers" in started.stderr


def test_a_bad_proxy_or_allow_list_entry_stops_the_server_with_a_clear_message():
    for name in ("TRUSTED_PROXIES", "METRICS_ALLOWED_IPS"):
        checked = subprocess.run(
            [sys.executable, "manage.py", "check"],
            cwd=BASE_DIR,
            env=subprocess_env(**{name: "10.0.0.1,proxy.example"}),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode != 0
        assert (
            f"{name} takes IP addresses or networks" in checked.stderr and "'proxy.example'" in checked.stderr
        )
