"""Stopping a guest on a real agent (simulated driver): graceful within a timeout, forced, refused.

A graceful stop asks the guest's OS to shut down: its writes stop, its I/O in flight completes, then the
rest of its shutdown takes ``shutdown_ms``; a guest that needs longer than the timeout is forced off. A
forced stop cuts the power: the I/O in flight is lost, and the guest's report counts it.
"""

from __future__ import annotations

import httpx
import pytest

from agentprotocol import StoppedGuest, StopRequest, parse
from tests.conftest import wait_until
from tests.hostagent.conftest import InBackground, define_running_guest, guest_id_for, unique

SLOW_IO = {"io_latency_ms": 2000}  # 50 I/O a second, each 2 s in flight: ~100 in flight at any time


def in_flight(agent, name: str) -> int:
    return int(agent.client.get_guest(guest_id_for(name)).workload["io_in_flight"])


def test_it_shuts_a_guest_down_within_its_timeout_and_loses_no_io(agent_pair):
    vsp1, _ = agent_pair
    name = unique("graceful")
    define_running_guest(vsp1, name, shutdown_ms=300, **SLOW_IO)
    assert wait_until(lambda: in_flight(vsp1, name) > 0)

    stopped = vsp1.client.stop_guest(guest_id_for(name), StopRequest(graceful_timeout_s=30))

    assert (stopped.stop, stopped.hardware_status, stopped.os_status) == ("shut_down", "off", "down")
    assert stopped.workload["io_lost_at_stop"] == 0
    assert stopped.workload["io_in_flight"] == 0


def test_it_forces_off_a_guest_that_does_not_shut_down_in_time(agent_pair):
    vsp1, _ = agent_pair
    name = unique("slow-os")
    define_running_guest(vsp1, name, shutdown_ms=60_000)

    stopped = vsp1.client.stop_guest(guest_id_for(name), StopRequest(graceful_timeout_s=0.5))

    assert (stopped.stop, stopped.hardware_status) == ("timed_out", "off")
    assert vsp1.client.start_guest(guest_id_for(name)).hardware_status == "on"  # it starts again


def test_it_cuts_the_power_at_once_when_forced_and_counts_the_lost_io(agent_pair):
    vsp1, _ = agent_pair
    name = unique("forced")
    define_running_guest(vsp1, name, shutdown_ms=60_000, **SLOW_IO)
    assert wait_until(lambda: in_flight(vsp1, name) > 0)

    stopped = vsp1.client.stop_guest(guest_id_for(name))

    assert (stopped.stop, stopped.hardware_status) == ("forced", "off")
    assert stopped.workload["io_lost_at_stop"] > 0
    again = vsp1.client.stop_guest(guest_id_for(name), StopRequest(graceful_timeout_s=5))
    assert again.stop == "already_off"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"force": true, "graceful_timeout_s": 5}', "either force or graceful_timeout_s, not both"),
        (b'{"graceful_timeout_s": -1}', "graceful_timeout_s must be from 0 to 3600 seconds, not -1"),
        (b'{"graceful_timeout_s": "30"}', "graceful_timeout_s must be a number"),
        (b'{"force": "yes"}', "force must be true or false"),
        (b"[]", "must be a JSON object"),
    ],
)
def test_it_refuses_a_bad_stop_request_and_leaves_the_guest_running(agent_pair, body, words):
    vsp1, _ = agent_pair
    name = unique("bad-stop")
    define_running_guest(vsp1, name)
    response = httpx.post(
        f"{vsp1.url}/v1/guests/{guest_id_for(name)}/stop",
        content=body,
        headers={"Authorization": f"Bearer {vsp1.secret}"},
        timeout=10,
        verify=vsp1.verify,
    )
    assert response.status_code == 400
    assert words in response.json()["error"]
    assert vsp1.client.get_guest(guest_id_for(name)).hardware_status == "on"


def test_an_empty_stop_request_forces_the_stop_as_the_first_agents_did(agent_pair):
    vsp1, _ = agent_pair
    name = unique("empty-stop")
    define_running_guest(vsp1, name, shutdown_ms=60_000)
    response = httpx.post(
        f"{vsp1.url}/v1/guests/{guest_id_for(name)}/stop",
        headers={"Authorization": f"Bearer {vsp1.secret}"},
        timeout=10,
        verify=vsp1.verify,
    )
    assert response.status_code == 200
    assert (response.json()["stop"], response.json()["hardware_status"]) == ("forced", "off")


def test_a_force_stop_cuts_a_graceful_stop_short(agent_pair):
    vsp1, _ = agent_pair
    name = unique("cut-short")
    define_running_guest(vsp1, name, shutdown_ms=60_000)
    graceful = InBackground(
        lambda: vsp1.client.stop_guest(guest_id_for(name), StopRequest(graceful_timeout_s=120))
    )
    assert wait_until(lambda: vsp1.client.get_guest(guest_id_for(name)).workload["shutting_down"])

    forced = vsp1.client.stop_guest(guest_id_for(name))

    assert (forced.stop, forced.hardware_status) == ("forced", "off")
    assert graceful.join().stop == "forced"  # the graceful stop says it did not end by itself


def test_a_stop_reply_from_an_agent_older_than_the_stop_request_still_reads():
    older = {
        "guest_id": guest_id_for("older"),
        "name": "older",
        "os_type": "linux",
        "os_status": "down",
        "hardware_status": "off",
        "memory_mib": 16,
        "vcpus": 1,
    }
    assert parse(StoppedGuest, older).stop is None  # it stopped the guest at once, and does not say
