"""Link probes between two real agents over real sockets (``hostagent/probe.py``, issue 12 item 1).

The strangers are plain sockets opened by the test: what anyone who reaches the API or a probe
listener can do. No timed assertions: rates are only checked to be positive and consistent.
"""

from __future__ import annotations

import json
import socket
import ssl

import httpx
import pytest

from agentprotocol import MAX_PROBE_BYTES, PreparedProbe, ProbeRequest
from devtools import pki
from hostagent.drivers.simulated.wire import ACCEPT, FILLER, HEADER, HELLO, READY, REFUSE
from hostagent.probe import FILLER_CHUNK
from tests.hostagent.conftest import (
    converged_or_ended,
    define_running_guest,
    follow,
    outgoing,
    prepare,
    session_pki_dir,
    unique,
)
from tests.hostagent.test_migration import commit
from vms.agent_client import AgentRefused

pytestmark = pytest.mark.faults


def frame(kind: int, body: bytes) -> bytes:
    return HEADER.pack(kind, len(body), 0) + body


def tls_insider(name: str = "insider") -> ssl.SSLContext:
    """A data-plane client with a certificate from the deployment's CA (an insider, not the agent)."""
    issued = pki.ensure_agent_cert(session_pki_dir(), name)
    context = ssl.create_default_context(cafile=str(issued.ca))
    context.check_hostname = False
    context.load_cert_chain(str(issued.cert), str(issued.key))
    return context


def open_session(prepared: PreparedProbe, context: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection((prepared.data_host, prepared.data_port), timeout=30)
    return (context or tls_insider()).wrap_socket(sock) if context is not False else sock


def read_frame(sock: socket.socket) -> tuple[int, dict]:
    header = b""
    while len(header) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    kind, size, _ = HEADER.unpack(header)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return kind, json.loads(body)


def is_dropped(sock: socket.socket) -> bool:
    """The peer closed (or reset) this connection without answering a frame."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    finally:
        sock.close()


def probe_hello(prepared: PreparedProbe, **changes) -> bytes:
    hello = {
        "token": prepared.token,
        "session": "probe",
        "max_bytes": prepared.max_bytes,
        "seconds": 0.5,
    }
    hello.update(changes)
    return frame(HELLO, json.dumps(hello).encode())


def test_it_measures_a_positive_rate_between_two_real_agents(agent_pair):
    vsp1, vsp2 = agent_pair
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required"))
    assert prepared.max_bytes == MAX_PROBE_BYTES and prepared.seconds == 0.5

    result = vsp1.client.probe(prepared.probe_run("required"))

    assert result.bytes > 0 and result.rate_bytes_s > 0, result
    assert result.rate_bytes_s == pytest.approx(result.bytes / result.seconds, rel=0.01)
    assert result.bytes <= MAX_PROBE_BYTES and result.encryption == "required"
    assert "link probe on port" in vsp2.log()


def test_the_plain_policy_probes_too(agent_factory):
    vsp1, vsp2 = agent_factory("vsp1", tls=False), agent_factory("vsp2", tls=False)
    result = vsp1.client.probe(
        vsp2.client.prepare_probe(ProbeRequest(encryption="off", max_bytes=4 << 20)).probe_run("off")
    )
    assert 0 < result.bytes <= 4 << 20 and result.rate_bytes_s > 0


def test_the_probe_api_needs_the_agents_secret(agent_pair):
    vsp1, vsp2 = agent_pair
    for path in ("/v1/probes/incoming", "/v1/probes/outgoing"):
        for headers in ({}, {"Authorization": "Bearer not-the-secret-at-all"}):
            answer = httpx.post(f"{vsp2.url}{path}", json={}, headers=headers, verify=vsp2.verify, timeout=30)
            assert answer.status_code == 401, (path, answer.text)
    assert "refused POST /v1/probes/incoming" in vsp2.log()


def test_a_wrong_token_or_a_stranger_cannot_use_a_probe_listener_and_the_right_peer_still_can(agent_pair):
    vsp1, vsp2 = agent_pair
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required"))

    # An insider (a certificate from the CA) with a wrong token is refused in words.
    wrong = open_session(prepared)
    wrong.sendall(probe_hello(prepared, token="x" * 43))
    assert read_frame(wrong) == (REFUSE, {"error": "wrong data-plane token"})
    wrong.close()
    # A plain-TCP stranger never gets past TLS.
    plain = open_session(prepared, context=False)
    plain.sendall(probe_hello(prepared))
    assert is_dropped(plain)
    # A migration's HELLO with the right token is not a probe session.
    migration = open_session(prepared)
    migration.sendall(frame(HELLO, json.dumps({"token": prepared.token, "migration_id": "m1"}).encode()))
    assert read_frame(migration) == (REFUSE, {"error": "this listener is for a link probe"})
    migration.close()

    # A silent stranger holds its own handshake only: the real peer's runs beside it.
    silent = socket.create_connection((prepared.data_host, prepared.data_port), timeout=30)

    assert vsp1.client.probe(prepared.probe_run("required")).rate_bytes_s > 0
    assert "refused probe connection" in vsp2.log()
    assert is_dropped(silent)  # closed once the prober got in


def test_a_certificate_from_another_ca_cannot_probe(agent_pair, tmp_path):
    vsp1, vsp2 = agent_pair
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required"))
    foreign = pki.ensure_agent_cert(tmp_path / "other-ca", "vsp1")  # same name, another CA
    context = ssl.create_default_context(cafile=str(foreign.ca))
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(str(foreign.cert), str(foreign.key))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        stolen = open_session(prepared, context)
        stolen.sendall(probe_hello(prepared))
        read_frame(stolen)
    assert vsp1.client.probe(prepared.probe_run("required")).bytes > 0


def test_a_token_is_good_for_one_probe(agent_pair):
    vsp1, vsp2 = agent_pair
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required", max_bytes=2 << 20))
    assert vsp1.client.probe(prepared.probe_run("required")).bytes > 0
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.probe(prepared.probe_run("required"))
    assert refused.value.status == 409 and "link probe" in refused.value.message


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_bytes": 10 << 30}, "max_bytes must be between 1048576 and 67108864"),
        ({"max_bytes": "64"}, "max_bytes"),
        ({"seconds": 3600}, "seconds must be between 0.05 and 2"),
        ({"seconds": -1}, "seconds must be between 0.05 and 2"),
        ({"encryption": "sometimes"}, "encryption"),
    ],
)
def test_absurd_bounds_are_refused_with_a_clear_error(agent_pair, body, words):
    vsp1, vsp2 = agent_pair
    for path, extra in (
        ("/v1/probes/incoming", {}),
        ("/v1/probes/outgoing", {"target": {"host": "127.0.0.1", "port": 9, "token": "t"}}),
    ):
        answer = httpx.post(
            f"{vsp2.url}{path}",
            json={**extra, **body},
            headers={"Authorization": f"Bearer {vsp2.secret}"},
            verify=vsp2.verify,
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"], answer.json()


def test_a_probe_asking_more_than_the_listener_granted_is_refused(agent_pair):
    vsp1, vsp2 = agent_pair
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required", max_bytes=1 << 20, seconds=0.1))
    greedy = prepared.probe_run("required").model_copy(update={"max_bytes": 64 << 20, "seconds": 2.0})
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.probe(greedy)
    assert "may send at most 1048576 bytes" in refused.value.message


def test_a_token_holder_cannot_make_the_listener_hold_more_than_it_granted(agent_pair):
    """A peer with the token that sends a frame larger than the receiver's buffer, or more bytes than
    granted, is refused and dropped; the receiver never asks for more than ``FILLER_CHUNK`` at once."""
    vsp1, vsp2 = agent_pair
    for sizes in ([FILLER_CHUNK + 1], [FILLER_CHUNK, FILLER_CHUNK, 1]):
        prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required", max_bytes=2 * FILLER_CHUNK))
        session = open_session(prepared)
        session.sendall(probe_hello(prepared))
        assert read_frame(session)[0] == ACCEPT
        for size in sizes:
            session.sendall(HEADER.pack(FILLER, size, 0))
            if size <= FILLER_CHUNK:
                session.sendall(bytes(size))
        kind, answer = read_frame(session)
        assert kind == REFUSE and "more than the 2097152 bytes granted" in answer["error"], answer
        session.close()
    # An honest filler of what was granted is counted exactly.
    prepared = vsp2.client.prepare_probe(ProbeRequest(encryption="required", max_bytes=FILLER_CHUNK))
    session = open_session(prepared)
    session.sendall(probe_hello(prepared))
    assert read_frame(session)[0] == ACCEPT
    session.sendall(HEADER.pack(FILLER, FILLER_CHUNK, 0) + bytes(FILLER_CHUNK) + HEADER.pack(FILLER, 0, 0))
    kind, answer = read_frame(session)
    assert kind == READY and answer["bytes"] == FILLER_CHUNK
    session.close()


def test_no_probe_while_a_migration_runs_on_either_agent(agent_pair):
    """A probe would slow the migration and measure a shared link: both sides answer 409 meanwhile."""
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("probe-busy"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=64, dirty_pages_per_s=0)
    endpoint = prepare(vsp2, guest, migration_id).endpoint()
    with pytest.raises(AgentRefused) as refused:
        vsp2.client.prepare_probe(ProbeRequest(encryption="required"))
    assert refused.value.status == 409 and "is running here" in refused.value.message
    prepared = vsp1.client.prepare_probe(ProbeRequest(encryption="required"))
    with pytest.raises(AgentRefused) as refused:
        vsp2.client.probe(prepared.probe_run("required"))
    assert refused.value.status == 409 and "is running here" in refused.value.message

    vsp1.client.start_outgoing(outgoing(guest.guest_id, migration_id, endpoint, "required"))
    assert follow(vsp1, migration_id, until=converged_or_ended)[-1].converged
    vsp1.client.quiesce(migration_id)
    assert vsp1.client.freeze(migration_id).state == "ready"
    commit(vsp1, vsp2, migration_id)
    assert (
        vsp1.client.probe(
            vsp2.client.prepare_probe(ProbeRequest(encryption="required")).probe_run("required")
        ).bytes
        > 0
    )  # free again
