"""The progress websockets open only from the console's own pages: scheme, host and port (issue 18 item 18).

QA: ``Origin: http://127.0.0.1:9999`` was accepted by a console on another port (Channels'
``AllowedHostsOriginValidator`` compares the host only), so any local program serving a page could
open an admin's sockets with the admin's cookie. Tried again as the tester did: a real uvicorn, a real
websocket client carrying the logged-in admin's session cookie, only the Origin changing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import start_console_server
from tests.factories import make_admin, make_vm, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def server(redis_url) -> Iterator[str]:
    process, url = start_console_server(CSRF_TRUSTED_ORIGINS="https://console.example.com")
    try:
        yield url
    finally:
        process.stop()


def handshake(url: str, path: str, origin: str | None, cookie: str) -> int:
    """The HTTP status of the websocket handshake: 101 accepted, 403 refused."""
    ws_url = url.replace("http://", "ws://") + path
    try:
        with connect(ws_url, origin=origin, additional_headers={"Cookie": f"sessionid={cookie}"}) as socket:
            socket.recv(timeout=10)  # the page's state, sent at once to a socket that may watch
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_only_the_consoles_own_origin_or_a_trusted_one_opens_a_progress_socket(server):
    port = server.rsplit(":", 1)[1]
    cookie = session_cookie(make_admin())
    path = f"/ws/vms/{make_vm('web01').pk}/"

    assert handshake(server, path, f"http://127.0.0.1:{port}", cookie) == 101
    for foreign in (
        "http://127.0.0.1:9999",  # another program on this machine: the tester's page
        f"https://127.0.0.1:{port}",  # another scheme
        f"http://localhost:{port}",  # another host, although one the console answers to
        "http://127.0.0.1",  # port 80
        "https://console.example.com:8443",
        "https://evil.console.example.com",
        "null",
        None,
    ):
        assert handshake(server, path, foreign, cookie) == 403, foreign
    # Behind a proxy: the address browsers use, as CSRF_TRUSTED_ORIGINS gives it for form posts.
    assert handshake(server, path, "https://console.example.com", cookie) == 101
