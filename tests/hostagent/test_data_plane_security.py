"""The data plane and the agent API under strangers: TLS, mutual authentication, bounded handshakes.

Real agent processes, real sockets. The strangers are plain sockets opened by the test: what
anyone who can reach a target's data-plane port can do (issue 9, fault 2, and the TLS build).
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agentprotocol import Endpoint
from devtools import pki
from hostagent.drivers.simulated.wire import ACCEPT, HEADER, HELLO, PROGRESS
from tests.hostagent.conftest import (
    define_running_guest,
    follow,
    guest_id_for,
    outgoing,
    prepare,
    session_pki_dir,
    unique,
    wait_for_state,
    workload_advances,
)
from tests.hostagent.test_migration import commit
from vms.agent_client import AgentClient, AgentUntrusted

pytestmark = pytest.mark.faults

NESTED = b"[" * 5000


def connect(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    return sock


def tls_client(issued: pki.Issued) -> ssl.SSLContext:
    """A data-plane client context with ``issued``'s certificate, trusting the test CA."""
    context = ssl.create_default_context(cafile=str(session_pki_dir() / "ca.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(issued.cert), str(issued.key))
    return context


def frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body), 0) + body


def finish(source, target, guest, migration_id, endpoint, encryption="required"):
    """Start the source towards ``endpoint`` and drive the migration to completion."""
    source.client.start_outgoing(outgoing(guest.guest_id, migration_id, endpoint, encryption))
    ended = follow(source, migration_id, until=lambda s: s.converged or s.state not in ("init", "copy"))
    assert ended[-1].converged, ended[-1]
    source.client.quiesce(migration_id)
    frozen = source.client.freeze(migration_id)
    assert frozen.state == "ready", frozen
    commit(source, target, migration_id)


def is_dropped(sock: socket.socket) -> bool:
    """The peer closed (or reset) this connection."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    finally:
        sock.close()


def test_it_drops_a_nested_json_frame_and_idle_connections_alone_during_a_real_migration(agent_pair):
    """Before: the nested frame's RecursionError aborted the migration ("internal error"), and two
    idle connections, served one at a time for 5 s each, made the source miss the 10 s Init limit."""
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("strangers"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=32, dirty_pages_per_s=0, fill_percent=50)
    endpoint = prepare(vsp2, guest, migration_id).endpoint()  # Init limit 10 s

    idle = [connect(endpoint), connect(endpoint)]  # strangers without a certificate: never a word
    # A peer with a certificate from the deployment CA, but no token: deeply nested JSON as HELLO.
    insider = tls_client(pki.ensure_agent_cert(session_pki_dir(), "insider"))
    nested = insider.wrap_socket(connect(endpoint))
    nested.sendall(frame(HELLO, NESTED))
    assert is_dropped(nested)

    finish(vsp1, vsp2, guest, migration_id, endpoint)
    assert workload_advances(vsp2, name)
    assert all(is_dropped(sock) for sock in idle)
    log = vsp2.log()
    assert "control message is not valid JSON" in log
    assert "still in their handshake" in log or "no HELLO within the handshake limit" in log


def test_a_peer_with_a_certificate_from_another_ca_is_refused_even_with_the_token(agent_pair, tmp_path):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("foreign"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0)
    endpoint = prepare(vsp2, guest, migration_id).endpoint()

    foreign = pki.ensure_agent_cert(tmp_path / "other-ca", "vsp1")  # same name, another CA
    context = ssl.create_default_context(cafile=str(foreign.ca))
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(str(foreign.cert), str(foreign.key))
    hello = {
        "token": endpoint.token,
        "migration_id": migration_id,
        "guest": guest.guest_id,
        "memory_mib": 16,
    }

    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        stolen = context.wrap_socket(connect(endpoint))
        stolen.sendall(frame(HELLO, json.dumps(hello).encode()))
        if stolen.recv(HEADER.size) in (b"",):
            raise ConnectionError("closed")
    # A plain-TCP peer is refused as well: the listener speaks TLS only.
    plain = connect(endpoint)
    plain.sendall(frame(HELLO, json.dumps(hello).encode()))
    assert is_dropped(plain)

    finish(vsp1, vsp2, guest, migration_id, endpoint)  # the right peer still gets in
    assert workload_advances(vsp2, name)
    assert "refused data-plane connection" in vsp2.log()


def test_a_token_holder_cannot_make_the_target_spin_with_absurd_figures(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("absurd"), unique("m")
    guest = {"guest_id": guest_id_for(name), "name": name, "memory_mib": 16, "vcpus": 1, "os_type": "linux"}
    endpoint = prepare(vsp2, guest, migration_id).endpoint()
    source = tls_client(pki.ensure_agent_cert(session_pki_dir(), "vsp1"))

    with source.wrap_socket(connect(endpoint)) as sock:
        hello = {"token": endpoint.token, "migration_id": migration_id, "guest": guest["guest_id"]}
        sock.sendall(frame(HELLO, json.dumps({**hello, "memory_mib": 16}).encode()))
        kind, _, _ = HEADER.unpack(sock.recv(HEADER.size))
        assert kind == ACCEPT
        absurd = {"round": 10**30, "percent": {"copy": 1e308}, "dirty_rate_bytes_s": -5}
        sock.sendall(frame(PROGRESS, json.dumps(absurd).encode()))
        ended = wait_for_state(vsp2, migration_id, "aborted")
    assert ended.failure_kind == "refused"
    assert "PROGRESS from the source" in ended.error
    assert vsp2.guest(name) is None  # the copy is dropped; the agent goes on serving
    assert vsp2.client.health().name == "vsp2"


def test_with_the_policy_off_the_plain_data_plane_still_works(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("plain"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0)
    endpoint = prepare(vsp2, guest, migration_id, encryption="off").endpoint()
    plain = connect(endpoint)
    plain.sendall(frame(HELLO, NESTED))  # garbage on the plain listener: dropped alone too
    assert is_dropped(plain)
    finish(vsp1, vsp2, guest, migration_id, endpoint, encryption="off")
    assert workload_advances(vsp2, name)


def test_the_source_refuses_a_target_without_a_certificate_from_the_ca(agent_pair):
    """Policies disagree (target prepared plain, source required TLS): no page leaves in clear."""
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("mismatch"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0)
    endpoint = prepare(vsp2, guest, migration_id, encryption="off").endpoint()
    vsp1.client.start_outgoing(
        outgoing(guest.guest_id, migration_id, endpoint, "required", limits={"init_s": 5})
    )
    ended = wait_for_state(vsp1, migration_id, "aborted")
    assert ended.failed_phase == "init"
    assert workload_advances(vsp1, name)


def test_the_agent_refuses_plain_http_and_nested_json_bodies(agent_pair):
    vsp1, _ = agent_pair
    plain_url = vsp1.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain_url}/v1/health", headers={"Authorization": f"Bearer {vsp1.secret}"}, timeout=5)
    response = httpx.post(
        f"{vsp1.url}/v1/migrations/incoming",
        content=NESTED,
        headers={"Authorization": f"Bearer {vsp1.secret}"},
        verify=vsp1.verify,
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json() == {"error": "the request body is not valid JSON"}
    assert vsp1.client.health().name == "vsp1"


def test_an_agent_without_tls_refuses_the_policy_required(agent_factory):
    insecure = agent_factory("plainhost", tls=False)
    assert insecure.url.startswith("http://")
    assert "INSECURE" in insecure.log()
    name = unique("nocert")
    guest = {"guest_id": guest_id_for(name), "name": name, "memory_mib": 16, "vcpus": 1, "os_type": "linux"}
    with pytest.raises(Exception, match="requires TLS on the data plane"):
        prepare(insecure, guest, unique("m"))


def test_the_agent_will_not_start_without_tls_or_insecure_http(tmp_path: Path):
    secret = tmp_path / "s.secret"
    secret.write_text("x" * 32)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hostagent",
            "--name",
            "n",
            "--listen",
            "127.0.0.1:1",
            "--secret-file",
            str(secret),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TLS is required" in result.stderr


def test_the_console_refuses_an_agent_whose_certificate_is_not_the_registered_one(agent_pair, tmp_path):
    vsp1, _ = agent_pair
    assert vsp1.fingerprint
    pinned = AgentClient(vsp1.url, vsp1.secret, trust=vsp1.fingerprint.replace(":", "").lower())
    assert pinned.health().name == "vsp1"

    wrong = "AA:" * 31 + "AA"
    with pytest.raises(AgentUntrusted, match=rf"{vsp1.url}.*not the registered {wrong}"):
        AgentClient(vsp1.url, vsp1.secret, trust=wrong).list_guests()
    other_ca = pki.ensure_ca(tmp_path / "other").read_text()
    with pytest.raises(AgentUntrusted, match="does not trust"):
        AgentClient(vsp1.url, vsp1.secret, trust=other_ca).list_guests()


def test_frames_pack_as_documented():
    assert HEADER.size == 13 and struct.calcsize("!BIQ") == 13
