"""Migrations over several parallel data-plane streams, between two real agent processes.

A page always travels on the stream of its 4 MiB block, so its latest version wins on the target
whatever order the streams deliver in; the whole-memory digest compared at Frozen proves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agentprotocol import Encryption, Endpoint, GuestInfo, ProgressSnapshot, auto_streams
from devtools.tcp_proxy import CONTROL_ENV, DataPlaneProxy, route_via_proxy
from hostagent.drivers.simulated.wire import PARTITION_PAGES, split_by_stream, stream_of
from tests.conftest import wait_until
from tests.hostagent.conftest import (
    converged_or_ended,
    define_running_guest,
    follow,
    guest_id_for,
    outgoing,
    prepare,
    raw_post,
    unique,
    wait_for_state,
    workload_advances,
)


def start_with_streams(
    source: Any,
    target: Any,
    guest: GuestInfo,
    migration_id: str,
    streams: int | None,
    *,
    encryption: Encryption = "required",
    route: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **params: Any,
) -> ProgressSnapshot:
    """Prepare ``target`` and start ``source`` with the pair's stream policy, as the Init phase does;
    ``route``: a ``MIGRATION_DATA_ENDPOINT_HOOK`` the endpoint goes through."""
    endpoint = prepare(target, guest, migration_id, encryption, streams=streams).endpoint()
    if route is not None:
        endpoint = Endpoint.model_validate(route(endpoint.model_dump()))
    request = outgoing(guest.guest_id, migration_id, endpoint, encryption, streams=streams, **params)
    return source.client.start_outgoing(request)


def migrate_and_commit(source: Any, target: Any, guest: GuestInfo, migration_id: str) -> ProgressSnapshot:
    """Follow Copy until converged, quiesce, freeze, commit; returns the freeze answer."""
    stream = follow(source, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    source.client.quiesce(migration_id)
    frozen = source.client.freeze(migration_id)
    assert frozen.state == "ready", (frozen.error, target.log()[-3000:])
    assert target.client.resume(migration_id).state == "completed"
    assert source.client.release(migration_id).state == "released"
    return frozen


def test_it_migrates_a_busy_guest_over_four_streams_with_equal_digests(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("streams4"), unique("m")
    # 16 MiB written (4 blocks, one per stream), dirtied while a capped first pass runs: several rounds.
    guest = define_running_guest(vsp1, name, memory_mib=32, dirty_pages_per_s=600, fill_percent=50)
    start_with_streams(vsp1, vsp2, guest, migration_id, 4, bandwidth_mbps=64, downtime_ms=50)
    frozen = migrate_and_commit(vsp1, vsp2, guest, migration_id)
    assert frozen.streams == 4 and frozen.round >= 2
    assert frozen.source_digest == frozen.target_digest
    assert vsp2.client.snapshot(migration_id).streams == 4
    assert workload_advances(vsp2, name)


def test_pages_rewritten_while_in_flight_on_different_streams_end_equal(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("rewrites"), unique("m")
    # The whole 64 MiB (16 blocks over 3 streams) is the working set, rewritten 20,000 pages a second
    # while the rounds are in flight: pages of every stream get newer versions round after round.
    guest = define_running_guest(vsp1, name, memory_mib=64, dirty_pages_per_s=20_000, fill_percent=100)
    start_with_streams(vsp1, vsp2, guest, migration_id, 3, encryption="off", downtime_ms=300)
    frozen = migrate_and_commit(vsp1, vsp2, guest, migration_id)
    assert frozen.streams == 3 and frozen.round >= 2
    assert frozen.source_digest == frozen.target_digest
    assert workload_advances(vsp2, name)


@pytest.mark.faults
def test_a_stream_dropped_mid_copy_aborts_with_the_guest_running_on_the_source(agent_pair, monkeypatch):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("dropped"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=64, dirty_pages_per_s=200, fill_percent=100)
    proxy = DataPlaneProxy()
    monkeypatch.setenv(CONTROL_ENV, f"127.0.0.1:{proxy.start()}")
    try:
        # 64 MiB at 40 Mbit/s: a first pass of ~13 s, long enough to cut one stream in the middle.
        start_with_streams(vsp1, vsp2, guest, migration_id, 4, route=route_via_proxy, bandwidth_mbps=40)
        follow(
            vsp1,
            migration_id,
            until=lambda s: s.percent["copy"] >= 10 or s.state not in ("init", "copy"),
        )
        assert len(proxy.arrivals) == 4
        assert proxy.cut_one(2)  # stream 2 only
        ended = wait_for_state(vsp1, migration_id, "aborted")
    finally:
        proxy.stop()
    assert ended.failure_kind == "unreachable" and ended.failed_phase == "copy", ended
    assert "connection" in ended.error or "stream" in ended.error, ended.error
    assert workload_advances(vsp1, name)
    assert vsp1.guest(name).migrating is None and vsp1.guest(name).hardware_status == "on"
    assert wait_for_state(vsp2, migration_id, "aborted").state == "aborted"
    assert wait_until(lambda: vsp2.guest(name) is None)  # the target dropped its copy


@pytest.mark.parametrize(
    ("streams", "words"), [(0, "between 1 and 16, not 0"), (17, "between 1 and 16, not 17")]
)
def test_an_absurd_stream_count_is_refused_and_changes_nothing(agent_pair, streams, words):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("absurd"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=8, dirty_pages_per_s=0)
    # The console's requests refuse such a count before they leave; the agents refuse any caller's too.
    spec = {"guest_id": guest_id_for(name), "name": name, "memory_mib": 8, "vcpus": 1, "os_type": "linux"}
    body = {"migration_id": migration_id, "guest": spec, "encryption": "required", "streams": streams}
    refused = raw_post(vsp2, "/v1/migrations/incoming", body)
    assert (
        refused.status_code == 400
        and "streams" in refused.json()["error"]
        and words in refused.json()["error"]
    )
    assert vsp2.guest(name) is None
    endpoint = {"host": "127.0.0.1", "port": 9, "token": "x" * 20}
    body = {"migration_id": migration_id, "guest": guest.guest_id, "target": endpoint, "streams": streams}
    refused = raw_post(vsp1, "/v1/migrations/outgoing", body)
    assert refused.status_code == 400 and words in refused.json()["error"]
    assert vsp1.guest(name).migrating is None


def test_automatic_streams_follow_the_cores_and_the_guest_size():
    assert auto_streams(256, 8) == 1  # a small guest gains nothing from more connections
    assert auto_streams(4096, 2) == 2  # two cores: two streams
    assert auto_streams(4096, 64) == 8  # one per 512 MiB
    assert auto_streams(1 << 20, 64) == 16  # never more than 16
    assert auto_streams(4096, None) == 1


def test_every_page_of_a_run_lands_on_its_own_blocks_stream():
    first, count = PARTITION_PAGES - 3, 2 * PARTITION_PAGES + 10
    pieces = split_by_stream(first, count, 3)
    covered = sorted(piece for stream in pieces for piece in stream)
    assert sum(n for _, n in covered) == count and covered[0][0] == first
    for index, stream in enumerate(pieces):
        for piece_first, piece_count in stream:
            assert {stream_of(page, 3) for page in range(piece_first, piece_first + piece_count)} == {index}
