"""The data-plane proxy the fault soak puts between agents, and the console's hook that routes through it."""

import socket
import threading

import pytest

from agentprotocol import Endpoint
from devtools.tcp_proxy import CONTROL_ENV, DataPlaneProxy, route_via_proxy
from migrations_app.dataplane import route_data_plane


@pytest.fixture
def echo_server():
    """A plain TCP echo server on a free loopback port (stands in for a target agent's data listener)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def proxy(monkeypatch):
    started = DataPlaneProxy()
    monkeypatch.setenv(CONTROL_ENV, f"127.0.0.1:{started.start()}")
    yield started
    started.stop()


def test_it_routes_an_endpoint_through_the_proxy_keeping_its_token(proxy, echo_server):
    routed = route_via_proxy({"host": "127.0.0.1", "port": echo_server, "token": "one-time"})
    assert routed["token"] == "one-time"  # noqa: S105 - a test value
    assert routed["port"] != echo_server
    with socket.create_connection((routed["host"], routed["port"]), timeout=5) as sock:
        sock.sendall(b"pages")
        assert sock.recv(100) == b"pages"


def test_it_cuts_every_forwarded_connection(proxy, echo_server):
    routed = route_via_proxy({"host": "127.0.0.1", "port": echo_server, "token": "t"})
    with socket.create_connection((routed["host"], routed["port"]), timeout=5) as sock:
        sock.sendall(b"x")
        assert sock.recv(10) == b"x"
        assert proxy.cut(hold_s=0.5) == 1
        assert sock.recv(10) == b""  # closed by the proxy


def test_it_holds_bytes_while_stalled_and_delivers_them_after(proxy, echo_server):
    routed = route_via_proxy({"host": "127.0.0.1", "port": echo_server, "token": "t"})
    with socket.create_connection((routed["host"], routed["port"]), timeout=5) as sock:
        proxy.stall(3.0)
        sock.sendall(b"late")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        sock.settimeout(5)
        assert sock.recv(10) == b"late"


def test_it_leaves_the_endpoint_alone_without_a_hook(settings):
    settings.MIGRATION_DATA_ENDPOINT_HOOK = ""
    endpoint = Endpoint.model_validate({"host": "127.0.0.1", "port": 4000, "token": "t"})
    assert route_data_plane(endpoint) == endpoint


def test_it_maps_the_endpoint_with_the_hook_named_in_settings(settings, proxy, echo_server):
    settings.MIGRATION_DATA_ENDPOINT_HOOK = "devtools.tcp_proxy:route_via_proxy"
    endpoint = Endpoint.model_validate({"host": "127.0.0.1", "port": echo_server, "token": "t"})
    routed = route_data_plane(endpoint)
    assert routed.port != echo_server
    assert proxy.routed == 1
