"""vms.agent_client: typed answers from a real agent, and its three errors."""

from __future__ import annotations

import httpx
import pytest

from agentprotocol import GuestSpec, IncomingRequest
from tests.conftest import free_port
from tests.hostagent.conftest import define_running_guest, guest_id_for, unique
from vms.agent_client import (
    AgentClient,
    AgentProtocolError,
    AgentRefused,
    AgentUnreachable,
    UnknownGuest,
    UnknownMigration,
)


def test_it_reads_guests_and_health_from_a_real_agent(agent_pair):
    vsp1, _ = agent_pair
    name = unique("client")
    define_running_guest(vsp1, name, memory_mib=32, vcpus=2)
    guests = {guest.name: guest for guest in vsp1.client.list_guests()}
    assert (guests[name].memory_mib, guests[name].vcpus, guests[name].os_status) == (32, 2, "up")
    assert vsp1.client.health().name == "vsp1"


def test_an_agent_that_does_not_answer_is_unreachable():
    client = AgentClient(f"http://127.0.0.1:{free_port()}", "secret", timeout_s=2)
    with pytest.raises(AgentUnreachable):
        client.health()
    with pytest.raises(AgentUnreachable):
        list(client.iter_progress("m1"))


def test_a_refusal_carries_the_agents_words(agent_pair):
    vsp1, _ = agent_pair
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.snapshot("no-such-migration")
    assert refused.value.status == 404
    assert str(refused.value) == "no migration no-such-migration on this host"
    with pytest.raises(AgentRefused) as refused:
        list(vsp1.client.iter_progress("no-such-migration"))
    assert refused.value.status == 404


def test_it_tells_an_unknown_migration_and_an_unknown_guest_by_their_code_not_their_words(agent_pair):
    """What roll forward decides by: a restarted agent's 404 is not a success, and not any refusal."""
    vsp1, _ = agent_pair
    with pytest.raises(UnknownMigration) as unknown:
        vsp1.client.resume("no-such-migration")
    assert unknown.value.kind == "unreachable"  # a peer that went away and came back empty
    with pytest.raises(UnknownMigration):
        list(vsp1.client.iter_progress("no-such-migration"))
    with pytest.raises(UnknownGuest):
        vsp1.client.get_guest("00000000-0000-4000-8000-000000000000")
    with pytest.raises(AgentRefused) as refused:  # another 404: no such command
        vsp1.client._command("no-such-migration", "explode")
    assert type(refused.value) is AgentRefused
    words_only = answering(404, b'{"error": "no migration m1 on this host"}')
    with pytest.raises(AgentRefused) as refused:  # the same words without the code: just a refusal
        words_only.resume("m1")
    assert type(refused.value) is AgentRefused


def answering(status: int, content: bytes) -> AgentClient:
    """A fake agent: a real one never sends these replies, so the transport is mocked."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=content))
    return AgentClient("http://agent.invalid", "secret", transport=transport)


@pytest.mark.parametrize(
    "content",
    [
        b"<html>proxy error</html>",
        b"[]",
        b'{"guests": "none"}',
        b'{"guests": [{"name": "g"}]}',
        b'{"guests": [{"name": "g", "os_status": "up", "hardware_status": "on",'
        b' "memory_mib": "lots", "vcpus": 1}]}',
    ],
)
def test_a_malformed_guest_list_is_a_protocol_error(content):
    with pytest.raises(AgentProtocolError):
        answering(200, content).list_guests()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"state": "copy"}',
        b'{"migration_id": "m", "role": "source", "guest": "g", "state": "copy", "percent": {"init": 1},'
        b' "bytes_sent": 0, "bytes_remaining": 0, "round": 1, "converged": false, "seq": 3}',
        b'{"migration_id": "m", "role": "source", "guest": "g", "state": "copy",'
        b' "percent": {"init": 1, "copy": 2, "quiesce": 0, "frozen": 0},'
        b' "bytes_sent": 0, "bytes_remaining": 0, "round": 1, "converged": "yes", "seq": 3}',
    ],
)
def test_a_malformed_snapshot_is_a_protocol_error(content):
    with pytest.raises(AgentProtocolError):
        answering(200, content).freeze("m")
    with pytest.raises(AgentProtocolError):
        list(answering(200, content + b"\n").iter_progress("m"))


def test_an_error_without_explanation_still_reads_plainly():
    with pytest.raises(AgentRefused) as refused:
        answering(502, b"Bad Gateway").health()
    assert (refused.value.status, refused.value.message) == (502, "HTTP 502 without an explanation")


def test_a_prepared_endpoint_missing_its_token_is_a_protocol_error():
    with pytest.raises(AgentProtocolError):
        guest = GuestSpec(guest_id=guest_id_for("g"), name="g", memory_mib=16)
        answering(200, b'{"migration_id": "m", "data_host": "h", "data_port": 1}').prepare_incoming(
            IncomingRequest(migration_id="m", guest=guest)
        )
