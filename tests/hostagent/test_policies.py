"""Migration policies on the simulated driver, between two real agent processes over loopback.

A "hot" guest writes 12 MB/s into all of its 16 MiB while the link is capped at 5 MB/s: under the
default policy it never converges (see test_migration's round-limit test).
"""

from __future__ import annotations

import pytest

from agentprotocol import ParamsChange
from tests.hostagent.conftest import (
    converged_or_ended,
    define_running_guest,
    follow,
    raw_post,
    start,
    unique,
    wait_for_state,
    workload_advances,
)
from tests.hostagent.test_migration import commit
from vms.agent_client import AgentRefused

HOT = {"memory_mib": 16, "dirty_pages_per_s": 3000, "fill_percent": 10}


def finish(source, target, migration_id):
    source.client.quiesce(migration_id)
    frozen = source.client.freeze(migration_id)
    assert frozen.state == "ready", frozen
    assert frozen.source_digest == frozen.target_digest
    commit(source, target, migration_id)
    return frozen


def test_it_throttles_a_hot_guest_with_auto_converge_until_it_converges(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-ac"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    params = {"bandwidth_mbps": 40, "max_rounds": 30, "auto_converge": True, "throttle_initial_pct": 50}
    start(vsp1, vsp2, guest, migration_id, throttle_increment_pct=20, **params)
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    assert max(snapshot.throttle_pct for snapshot in stream) >= 50
    finish(vsp1, vsp2, migration_id)
    moved = vsp2.client.get_guest(guest.guest_id)
    assert moved.workload["dirty_pages_per_s"] == 3000  # the throttle stays behind on the source
    assert workload_advances(vsp2, name)


def test_it_escalates_the_allowed_downtime_while_stalled(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-esc"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    start(
        vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=30, downtime_step_ms=2000,
        downtime_max_ms=6000,
    )  # fmt: skip
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    assert stream[-1].allowed_downtime_ms > 300
    frozen = finish(vsp1, vsp2, migration_id)
    assert frozen.downtime_ms > 300


def test_it_switches_over_at_the_round_limit_when_the_policy_says_so(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-limit"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=3, at_limit="switchover")
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    frozen = finish(vsp1, vsp2, migration_id)
    assert frozen.downtime_ms > 300  # the longer freeze it accepted


def test_switch_over_now_ends_copy_at_once_and_completes(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-now"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=1000)
    follow(vsp1, migration_id, until=lambda s: s.round >= 2 or s.state not in ("init", "copy"))
    changed = vsp1.client.change_params(migration_id, ParamsChange(switchover_now=True))
    assert changed.converged
    frozen = finish(vsp1, vsp2, migration_id)
    assert frozen.downtime_ms > 300


def test_raising_the_allowed_downtime_while_it_runs_lets_it_converge(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-raise"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=1000)
    follow(vsp1, migration_id, until=lambda s: s.round >= 2 or s.state not in ("init", "copy"))
    changed = vsp1.client.change_params(migration_id, ParamsChange(downtime_ms=10_000))
    assert changed.allowed_downtime_ms == 10_000
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    finish(vsp1, vsp2, migration_id)


def test_a_bandwidth_cap_holds(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("capped"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0, fill_percent=100)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=64)  # 8 MB/s
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    assert stream[-1].throughput_bytes_s <= 8_000_000 * 1.1
    finish(vsp1, vsp2, migration_id)


def test_a_bandwidth_cap_holds_across_the_pauses_between_rounds(agent_pair):
    """A busy guest over two streams (the cap is split between them): every round's throughput stays
    within the cap plus 10%, the pauses between rounds (hashing, waiting for the target) included."""
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("bursty"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=128, dirty_pages_per_s=3000, fill_percent=100)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=320, max_rounds=30, streams=2)  # 40 MB/s
    stream = follow(vsp1, migration_id, until=lambda s: s.round >= 5 or s.state not in ("init", "copy"))
    rates = [s.throughput_bytes_s for s in stream if s.round >= 2]
    assert rates and max(rates) <= 40_000_000 * 1.1, max(rates)
    vsp1.client.cancel(migration_id)


def test_changing_a_finished_migration_is_refused_and_changes_nothing(agent_pair):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("done"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0, fill_percent=10)
    start(vsp1, vsp2, guest, migration_id)
    follow(vsp1, migration_id, until=converged_or_ended)
    finish(vsp1, vsp2, migration_id)
    with pytest.raises(AgentRefused) as refused:
        vsp1.client.change_params(migration_id, ParamsChange(downtime_ms=900))
    assert refused.value.status == 409 and "Copy is over" in refused.value.message
    assert vsp1.client.snapshot(migration_id).state == "released"
    with pytest.raises(AgentRefused) as refused:
        vsp2.client.change_params(migration_id, ParamsChange(downtime_ms=900))
    assert "change it on its source" in refused.value.message


@pytest.mark.parametrize(
    ("change", "words"),
    [({"downtime_ms": -5}, "downtime_ms"), ({"bandwidth_mbps": "fast"}, "bandwidth_mbps"),
     ({"downtime_ms": 10**9}, "downtime_ms")],
)  # fmt: skip
def test_bad_params_are_refused_in_plain_words(agent_pair, change, words):
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("bad"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=1000)
    # The console's ParamsChange refuses these before they leave; the agent must refuse any caller's too.
    refused = raw_post(vsp1, f"/v1/migrations/{migration_id}/params", change)
    assert refused.status_code == 400 and words in refused.json()["error"]
    assert vsp1.client.snapshot(migration_id).allowed_downtime_ms in (None, 300)
    vsp1.client.cancel(migration_id)
    wait_for_state(vsp1, migration_id, "cancelled")


def test_it_measures_a_guests_dirty_rate_without_migrating(agent_pair):
    vsp1, _ = agent_pair
    idle = define_running_guest(vsp1, unique("rate-idle"), memory_mib=16, dirty_pages_per_s=0)
    busy = define_running_guest(vsp1, unique("rate-busy"), **HOT)
    idle_rate = vsp1.client.dirty_rate(idle.guest_id, 0.5)
    busy_rate = vsp1.client.dirty_rate(busy.guest_id, 0.5)
    assert idle_rate.dirty_rate_bytes_s == 0
    # 3000 pages/s of 4 KiB within 16 MiB: about 10 MB/s of distinct pages over half a second.
    assert 5_000_000 < busy_rate.dirty_rate_bytes_s < 13_000_000
    assert busy_rate.working_set_bytes == 16 * 1024 * 1024


def test_the_rounds_before_the_pause_stop_once_they_no_longer_shrink_what_is_left(agent_pair):
    """QA: an allowed downtime raised to 24 s on a capped link let a guest writing faster than the cap
    converge; the source then sent round after round before pausing it (each as large as the last)
    until the Frozen phase's limit aborted the migration. It now pauses once a round stops shrinking."""
    vsp1, vsp2 = agent_pair
    name, migration_id = unique("hot-prepause"), unique("m")
    guest = define_running_guest(vsp1, name, **HOT)
    # 16 MiB all dirty at 5 MB/s: a freeze of ~3.4 s, within 5 s allowed but above its half.
    start(vsp1, vsp2, guest, migration_id, bandwidth_mbps=40, max_rounds=1000, downtime_ms=5000)
    stream = follow(vsp1, migration_id, until=converged_or_ended)
    assert stream[-1].converged, stream[-1]
    converged_round = stream[-1].round

    frozen = finish(vsp1, vsp2, migration_id)

    assert frozen.round <= converged_round + 2, (converged_round, frozen)
