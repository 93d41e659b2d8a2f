"""A target's copy is discarded in any state, and every agent command answers (soak, seed 1, run 93).

The soak paused the target agent (SIGSTOP) during Frozen past the Frozen limit. The source aborted;
the console's discard reached the target while its run waited for the background hashing of the last
round. Cancelling the run cancelled that hashing task too, and the drop, awaiting the cancelled task,
raised CancelledError into the request: the agent closed every discard's connection without an answer
and kept the copy "migrating" for ever.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agentprotocol import GuestSpec, MigrationParams, PhaseLimits
from hostagent.driver import DriverSettings
from hostagent.drivers.simulated.driver import SimulatedDriver
from hostagent.server import MIGRATIONS_KEY, create_app
from tests.hostagent.conftest import (
    InBackground,
    define_running_guest,
    guest_id_for,
    start,
    unique,
    workload_advances,
)

GATE_WAIT_S = 60  # the gated hashing thread gives up after this, so a failing test cannot hang the run


async def test_discard_while_the_target_waits_for_its_background_hashing_frees_the_copy():
    """The exact state: the target's run in Frozen waits for a background hash that has not ended."""
    source_driver = SimulatedDriver(DriverSettings(agent_name="src"))
    target_driver = SimulatedDriver(DriverSettings(agent_name="dst"))
    name = unique("hashing")
    spec = GuestSpec(guest_id=guest_id_for(name), name=name, memory_mib=16, fill_percent=50, running=True)
    await source_driver.define_guest(spec)
    migration_id = unique("m")
    limits = PhaseLimits(frozen_s=3.0)  # longer than the source waits for the target's hashing (2 s)
    target, endpoint = await target_driver.prepare_incoming(spec, migration_id, limits, encryption="off")
    gate = threading.Event()  # the target's hashing waits here: a paused or starved host
    memory = target_driver.guests[spec.guest_id].memory
    hash_now = memory.refresh_digests

    def gated_refresh() -> int:
        gate.wait(GATE_WAIT_S)
        return hash_now()

    memory.refresh_digests = gated_refresh  # type: ignore[method-assign]
    try:
        source = await source_driver.start_outgoing(
            spec.guest_id, migration_id, endpoint, MigrationParams(limits=limits), encryption="off"
        )
        source.switchover_now()  # type: ignore[attr-defined]  # the target's hashing never judges Copy
        await source.quiesce()  # type: ignore[attr-defined]
        ended = await source.freeze()  # type: ignore[attr-defined]
        assert ended.state == "aborted" and "frozen phase ran over its limit" in (ended.error or "")
        assert target.snapshot().state == "frozen"  # waiting for its hashing, as in the soak
        discard = asyncio.ensure_future(target.discard())
        await asyncio.sleep(0.2)  # the discard has cancelled the run and waits for the hashing thread
        gate.set()
        discarded = await asyncio.wait_for(discard, 30)
        assert discarded.state == "discarded"
        assert spec.guest_id not in target_driver.guests
        assert (await target.discard()).state == "discarded"  # and again: the same answer
        assert (await source.resume()).state == "aborted"  # type: ignore[attr-defined]
        assert source_driver.guests[spec.guest_id].running
    finally:
        gate.set()
        await source_driver.close()
        await target_driver.close()


@pytest.mark.faults
def test_target_paused_in_frozen_past_the_limit_answers_the_discard_and_frees_the_copy(agent_factory):
    """The soak's run 93 through the agents' API: the target is paused (SIGSTOP) just after the freeze,
    the source aborts at the Frozen limit, a discard is sent while the target is still paused, and on
    SIGCONT the target answers it and holds no copy; the source's guest runs on."""
    vsp3, vsp1 = agent_factory("vsp3"), agent_factory("vsp1")
    name, migration_id = unique("paused"), unique("m")
    guest = define_running_guest(vsp3, name, memory_mib=64, fill_percent=100, io_latency_ms=20)
    start(vsp3, vsp1, guest, migration_id, limits={"frozen_s": 3.0})
    vsp3.client.quiesce(migration_id)
    group = vsp1.process.process.pid
    freeze = InBackground(lambda: vsp3.client.freeze(migration_id))
    os.killpg(group, signal.SIGSTOP)
    try:
        ended = freeze.join()
        assert (ended.state, ended.failed_phase) == ("aborted", "frozen"), ended
        discard = InBackground(lambda: vsp1.client.discard(migration_id))  # waits at the paused agent
    finally:
        os.killpg(group, signal.SIGCONT)
    assert discard.join().state == "discarded"
    assert vsp1.client.discard(migration_id).state == "discarded"
    assert vsp1.guest(name) is None
    assert vsp3.client.resume(migration_id).state == "aborted"
    assert workload_advances(vsp3, name)


class Interrupted:
    """A migration whose commands end with a CancelledError that is not the request's own."""

    migration_id = "m-interrupted"

    async def discard(self) -> None:
        never = asyncio.get_running_loop().create_future()
        never.cancel()
        await never


async def test_a_command_interrupted_by_a_cancelled_task_is_answered_not_dropped():
    """aiohttp closes the connection without a word when a handler raises CancelledError: the
    control plane then saw "Server disconnected" for ever. The agent answers 500 in plain words."""
    app = create_app(SimulatedDriver(DriverSettings(agent_name="vsp1")), "secret", "vsp1")
    app[MIGRATIONS_KEY][Interrupted.migration_id] = Interrupted()
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": "Bearer secret"}
        response = await client.post(f"/v1/migrations/{Interrupted.migration_id}/discard", headers=headers)
        assert response.status == 500
        assert (await response.json())["error"] == (
            f"internal error: POST /v1/migrations/{Interrupted.migration_id}/discard was interrupted"
        )
        health = await client.get("/v1/health", headers=headers)  # and the agent goes on answering
        assert health.status == 200
