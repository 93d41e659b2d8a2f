"""The agent's HTTP API against a real agent process: guests, credentials, and bad requests."""

from __future__ import annotations

import httpx
import pytest

from agentprotocol import Endpoint, GuestSpec
from tests.hostagent.conftest import (
    define_running_guest,
    follow,
    guest_id_for,
    outgoing,
    prepare,
    start,
    unique,
    wait_for_state,
    workload_advances,
)
from vms.agent_client import AgentClient, AgentRefused


def raw(agent, method: str, path: str, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {"Authorization": f"Bearer {agent.secret}"})
    return httpx.request(
        method, f"{agent.url}{path}", headers=headers, timeout=10, verify=agent.verify, **kwargs
    )


def test_it_reports_health(agent_pair):
    vsp1, _ = agent_pair
    health = vsp1.client.health()
    assert health.name == "vsp1"
    assert health.driver == "simulated"
    assert isinstance(health.guests, int)


def test_it_defines_starts_stops_and_deletes_a_guest(agent_pair):
    vsp1, _ = agent_pair
    name = unique("life")
    guest = vsp1.client.define_guest(
        GuestSpec(guest_id=guest_id_for(name), name=name, memory_mib=32, vcpus=2, os_type="hpux")
    )
    assert (guest.hardware_status, guest.os_status, guest.memory_mib, guest.vcpus) == (
        "off",
        "down",
        32,
        2,
    )
    assert vsp1.client.start_guest(guest_id_for(name)).hardware_status == "on"
    assert workload_advances(vsp1, name)
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.delete_guest(guest_id_for(name))
    assert refused.value.status == 409 and "running" in refused.value.message
    assert vsp1.client.stop_guest(guest_id_for(name)).os_status == "down"
    vsp1.client.delete_guest(guest_id_for(name))
    assert vsp1.guest(name) is None


def test_a_booting_guest_is_reported_on_and_initializing_never_off(agent_pair):
    """Soak seed 40: an inventory taken while a guest booted (its OS filling memory) said Off, and stored
    that over the copy the admin had just started; the migration was then refused "VM is not running"."""
    import threading

    vsp1, _ = agent_pair
    name = unique("boot")
    spec = {"guest_id": guest_id_for(name), "name": name, "memory_mib": 1024, "fill_percent": 100}
    defined = threading.Event()
    seen: list[tuple[str, str]] = []

    def define() -> None:
        try:
            with AgentClient(vsp1.url, vsp1.secret, trust=vsp1.trust, timeout_s=60) as client:
                client.define_guest(GuestSpec.model_validate({**spec, "running": True}))
        finally:
            defined.set()

    threading.Thread(target=define, daemon=True).start()
    while not defined.is_set():
        guest = vsp1.guest(name)
        if guest is not None:
            seen.append((guest.hardware_status, guest.os_status))
    assert seen and ("off", "down") not in seen, seen
    assert ("on", "initializing") in seen, seen
    assert (vsp1.guest(name).hardware_status, vsp1.guest(name).os_status) == ("on", "up")
    vsp1.client.stop_guest(guest_id_for(name))
    vsp1.client.delete_guest(guest_id_for(name))


def test_it_defines_a_guest_idempotently(agent_pair):
    vsp1, _ = agent_pair
    name = unique("same")
    first = define_running_guest(vsp1, name)
    again = define_running_guest(vsp1, name)
    assert again.name == first.name and again.hardware_status == "on"
    with pytest.raises(AgentRefused) as refused:
        define_running_guest(vsp1, name, memory_mib=64)
    assert refused.value.status == 409


@pytest.mark.parametrize(
    "headers, why",
    [({}, "missing credential"), ({"Authorization": "Bearer not-the-secret-at-all"}, "wrong credential")],
)
def test_it_refuses_requests_without_the_right_credential(agent_pair, headers, why):
    vsp1, _ = agent_pair
    response = raw(vsp1, "GET", "/v1/guests", headers=headers)
    assert response.status_code == 401
    assert why in response.json()["error"]
    with pytest.raises(AgentRefused) as refused:
        AgentClient(vsp1.url, "not-the-secret-at-all", trust=vsp1.trust).list_guests()
    assert refused.value.status == 401
    log = vsp1.log()
    assert f"refused GET /v1/guests from 127.0.0.1: {why.split()[0]} credential" in log
    assert "not-the-secret-at-all" not in log and vsp1.secret not in log


G = "0b7e3c52-5d43-4a5e-9d5f-6f1c2b9a8e71"  # a guest id no test defines


@pytest.mark.parametrize(
    "method, path, body, status, words",
    [
        ("PUT", f"/v1/guests/{G}", b"{not json", 400, "not valid JSON"),
        (
            "PUT",
            f"/v1/guests/{G}",
            b'{"name": "g", "memory_mib": -5, "vcpus": 1}',
            400,
            "memory_mib must be between",
        ),
        (
            "PUT",
            f"/v1/guests/{G}",
            b'{"name": "g", "memory_mib": 99999999999, "vcpus": 1}',
            400,
            "memory_mib",
        ),
        (
            "PUT",
            f"/v1/guests/{G}",
            b'{"name": "g", "memory_mib": 16, "vcpus": "two"}',
            400,
            "vcpus must be a whole number",
        ),
        ("PUT", f"/v1/guests/{G}", b"[1, 2]", 400, "must be a JSON object"),
        (
            "PUT",
            "/v1/guests/bad%20id",
            b'{"name": "g", "memory_mib": 16}',
            400,
            "guest_id must be a guest id",
        ),
        ("PUT", f"/v1/guests/{G}", b'{"memory_mib": 16}', 400, "name is required"),
        (
            "PUT",
            f"/v1/guests/{G}",
            '{"name": "%s", "memory_mib": 16}' % ("x" * 65),
            400,
            "name must be 1-64 characters",
        ),
        (
            "PUT",
            f"/v1/guests/{G}",
            b'{"name": "bell\\u0007", "memory_mib": 16}',
            400,
            "without control characters",
        ),
        ("PUT", f"/v1/guests/{G}", b'{"name": "", "memory_mib": 16}', 400, "name must be 1-64 characters"),
        ("GET", f"/v1/guests/{G}", None, 404, f"no guest {G}"),
        ("POST", f"/v1/guests/{G}/start", None, 404, f"no guest {G}"),
        ("GET", "/v1/migrations/nothing", None, 404, "no migration nothing"),
        ("POST", "/v1/migrations/nothing/freeze", None, 404, "no migration nothing"),
        (
            "POST",
            "/v1/migrations/incoming",
            b'{"migration_id": "m", "guest": {"guest_id": "%s", "name": "g"}}' % G.encode(),
            400,
            "memory_mib",
        ),
        (
            "POST",
            "/v1/migrations/incoming",
            b'{"guest": {"guest_id": "%s", "name": "g", "memory_mib": 16}}' % G.encode(),
            400,
            "migration_id",
        ),
        (
            "POST",
            "/v1/migrations/outgoing",
            b'{"migration_id": "m", "guest": "%s", "target": {"host": "h", "port": 70000, "token": "t"}}'
            % G.encode(),
            400,
            "port must be between",
        ),
        (
            "POST",
            "/v1/migrations/outgoing",
            b'{"migration_id": "m", "guest": "%s", "target": {"host": "h", "port": 1, "token": "t"},'
            b' "params": {"downtime_ms": -1}}' % G.encode(),
            400,
            "downtime_ms",
        ),
        (
            "POST",
            "/v1/migrations/outgoing",
            b'{"migration_id": "m", "guest": "%s", "target": {"host": "h", "port": 1, "token": "t"},'
            b' "params": {"max_rounds": 1e9, "limits": {"copy_s": -3}}}' % G.encode(),
            400,
            "max_rounds",
        ),
        (
            "POST",
            "/v1/migrations/outgoing",
            b'{"migration_id": "m", "guest": "%s", "target": {"host": "h", "port": 1, "token": "t"}}'
            % G.encode(),
            404,
            f"no guest {G}",
        ),
    ],
)
def test_it_answers_malformed_requests_with_a_clear_4xx_and_changes_nothing(
    agent_pair, method, path, body, status, words
):
    vsp1, _ = agent_pair
    before = vsp1.client.list_guests()
    response = raw(vsp1, method, path, content=body)
    assert response.status_code == status
    assert words in response.json()["error"]
    after = vsp1.client.list_guests()
    assert [guest.name for guest in after] == [guest.name for guest in before]


def test_it_refuses_a_guest_that_does_not_fit(agent_factory):
    small = agent_factory("small", "--driver-option", "capacity_mib=64")
    define_running_guest(small, "fits", memory_mib=48)
    with pytest.raises(AgentRefused) as refused:
        define_running_guest(small, "too-big", memory_mib=32)
    assert refused.value.status == 409 and "no room" in refused.value.message
    with pytest.raises(AgentRefused) as refused:
        prepare(small, {"name": "incoming", "memory_mib": 32, "vcpus": 1, "os_type": "linux"}, "room-1")
    assert refused.value.status == 409 and "no room" in refused.value.message
    with pytest.raises(AgentRefused) as refused:
        small.client.define_guest(
            GuestSpec(guest_id=guest_id_for("never-fits"), name="never-fits", memory_mib=1024 * 1024, vcpus=1)
        )
    assert refused.value.status == 409 and "no room" in refused.value.message
    assert [guest.name for guest in small.client.list_guests()] == ["fits"]


def test_it_refuses_a_second_migration_of_a_migrating_guest(agent_pair):
    vsp1, vsp2 = agent_pair
    name = unique("twice")
    guest = define_running_guest(vsp1, name, memory_mib=16, fill_percent=100)
    first_id, second_id = unique("first"), unique("second")
    start(vsp1, vsp2, guest, first_id, bandwidth_mbps=20)
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.start_outgoing(
            outgoing(guest_id_for(name), second_id, Endpoint(host="127.0.0.1", port=9, token="t"))  # noqa: S106
        )
    assert refused.value.status == 409 and "already migrating" in refused.value.message
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.delete_guest(guest_id_for(name))
    assert refused.value.status == 409
    with pytest.raises(AgentRefused):
        vsp1.client.snapshot(second_id)
    assert vsp1.client.snapshot(first_id).state in ("init", "copy")
    vsp1.client.cancel(first_id)
    wait_for_state(vsp2, first_id, "aborted")
    vsp2.client.discard(first_id)


def test_it_refuses_a_wrong_data_plane_token(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("token"), unique("tok")
    guest = define_running_guest(vsp1, name)
    endpoint = prepare(vsp2, guest, migration_id).endpoint()
    forged = endpoint.model_copy(update={"token": "forged-token-" + "x" * 30})
    vsp1.client.start_outgoing(outgoing(guest_id_for(name), migration_id, forged))
    ended = follow(vsp1, migration_id, until=lambda s: s.state == "aborted")[-1]
    assert "wrong data-plane token" in ended.error
    assert ended.failed_phase == "init"
    assert workload_advances(vsp1, name)
    assert vsp2.client.snapshot(migration_id).state == "init"  # still waiting for the real source
    assert "refused data-plane connection" in vsp2.log() and "forged-token" not in vsp2.log()
    assert vsp2.client.discard(migration_id).state == "discarded"
    assert vsp2.guest(name) is None


@pytest.mark.parametrize("name", ["name with spaces", "测试", "web 🚀 01", "x" * 64])
def test_it_keeps_any_printable_name_as_given(agent_pair, name):
    vsp1, _ = agent_pair
    guest_id = guest_id_for(unique("printable"))
    defined = vsp1.client.define_guest(GuestSpec(guest_id=guest_id, name=name, memory_mib=16, running=True))
    assert (defined.guest_id, defined.name) == (guest_id, name)
    assert vsp1.client.get_guest(guest_id).name == name
    vsp1.client.stop_guest(guest_id)
    vsp1.client.delete_guest(guest_id)
