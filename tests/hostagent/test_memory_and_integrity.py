"""Guest RAM on real agent processes (read from /proc) and the data plane's xxh3 integrity check.

RAM figures are the agents' own resident anonymous memory (RssAnon in /proc/PID/status): the
guests' pages are private anonymous maps, so this is where they show. Margins are a quarter of
the guest's size or more, far above the few MiB an agent's Python heap moves by.
"""

from __future__ import annotations

from pathlib import Path

from devtools.processes import wait_until
from tests.hostagent.conftest import (
    converged_or_ended,
    define_running_guest,
    follow,
    start,
    unique,
    wait_for_state,
    workload_advances,
)

MIB = 2**20


def rss_anon(agent) -> int:
    """The agent process's resident anonymous memory, bytes."""
    for line in Path(f"/proc/{agent.process.process.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc status")


def migrate_and_commit(source, target, guest, migration_id):
    start(source, target, guest, migration_id)
    assert follow(source, migration_id, until=converged_or_ended)[-1].converged
    source.client.quiesce(migration_id)
    ready = source.client.freeze(migration_id)
    assert ready.state == "ready", ready
    assert target.client.resume(migration_id).state == "completed"
    assert source.client.release(migration_id).state == "released"
    return ready


def test_it_ends_a_busy_guests_migration_with_equal_xxh3_digests(agent_factory):
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    name, migration_id = unique("busy"), unique("m")
    # 64 MiB written through; 4,000 pages/s rewritten while the pages travel, over several rounds.
    guest = define_running_guest(vsp1, name, memory_mib=64, dirty_pages_per_s=4000, fill_percent=100)
    ready = migrate_and_commit(vsp1, vsp2, guest, migration_id)
    assert ready.round > 1
    assert ready.source_digest.startswith("xxh3-128:")
    assert ready.source_digest == ready.target_digest
    assert vsp2.client.snapshot(migration_id).target_digest == ready.source_digest
    assert workload_advances(vsp2, name)


def test_it_gives_different_digests_to_different_memory(agent_factory):
    """The digest is of the contents: two guests written differently do not compare equal."""
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    digests = []
    for fill in (30, 60):
        name, migration_id = unique(f"fill{fill}"), unique("m")
        guest = define_running_guest(vsp1, name, memory_mib=16, dirty_pages_per_s=0, fill_percent=fill)
        ready = migrate_and_commit(vsp1, vsp2, guest, migration_id)
        assert ready.source_digest == ready.target_digest
        digests.append(ready.source_digest)
    assert digests[0] != digests[1]


def test_it_gives_a_guests_memory_back_when_it_leaves(agent_factory):
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    name, migration_id = unique("big"), unique("m")
    before_source, before_target = rss_anon(vsp1), rss_anon(vsp2)
    guest = define_running_guest(vsp1, name, memory_mib=256, dirty_pages_per_s=500, fill_percent=100)
    held = rss_anon(vsp1) - before_source
    assert held > 200 * MIB
    migrate_and_commit(vsp1, vsp2, guest, migration_id)
    # The source keeps the guest's configuration (Not Runnable), not its RAM.
    assert vsp1.guest(name).hardware_status == "not_runnable"
    assert wait_until(lambda: rss_anon(vsp1) - before_source < held // 4, timeout=10), rss_anon(vsp1)
    assert rss_anon(vsp2) - before_target > 200 * MIB
    # And back: the copy that came in leaves the target's RAM too.
    back = unique("m")
    migrate_and_commit(vsp2, vsp1, guest, back)
    assert wait_until(lambda: rss_anon(vsp2) - before_target < held // 4, timeout=10), rss_anon(vsp2)


def test_it_frees_a_discarded_incoming_copy(agent_factory):
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    name, migration_id = unique("discard"), unique("m")
    guest = define_running_guest(vsp1, name, memory_mib=256, dirty_pages_per_s=0, fill_percent=100)
    before_target = rss_anon(vsp2)
    start(vsp1, vsp2, guest, migration_id)
    assert follow(vsp1, migration_id, until=converged_or_ended)[-1].converged
    assert rss_anon(vsp2) - before_target > 200 * MIB
    vsp1.client.cancel(migration_id)
    assert wait_for_state(vsp2, migration_id, "cancelled", "aborted", "discarded")
    vsp2.client.discard(migration_id)
    assert wait_until(lambda: rss_anon(vsp2) - before_target < 64 * MIB, timeout=10), rss_anon(vsp2)
    assert workload_advances(vsp1, name)


def test_it_costs_no_ram_for_guest_memory_never_written(agent_factory):
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    name, migration_id = unique("sparse"), unique("m")
    before_source, before_target = rss_anon(vsp1), rss_anon(vsp2)
    # 2 GiB of guest RAM, 2% of it filled at boot; the workload writes within that.
    guest = define_running_guest(vsp1, name, memory_mib=2048, dirty_pages_per_s=500, fill_percent=2)
    assert rss_anon(vsp1) - before_source < 120 * MIB
    migrate_and_commit(vsp1, vsp2, guest, migration_id)
    assert rss_anon(vsp2) - before_target < 120 * MIB
    assert workload_advances(vsp2, name)
    assert rss_anon(vsp2) - before_target < 120 * MIB


def test_ended_migrations_leave_no_memory_behind_on_either_agent(agent_factory):
    """Issue 18 item 13: after 22 demo migrations, every guest back on its first host, the agents held
    ~200 MiB more. Each ended migration stays listed by its agent (its snapshot) and kept its data-plane
    streams, whose TLS and frame buffers are 1-2 MiB each: 2-5 MiB per migration on each side, for
    good. A guest moved back and forth 16 times now leaves both agents where the first moves left them
    (the few MiB the allocator keeps after the first migrations aside)."""
    vsp1, vsp2 = agent_factory("vsp1"), agent_factory("vsp2")
    guest = define_running_guest(
        vsp1, unique("pingpong"), memory_mib=32, dirty_pages_per_s=200, fill_percent=100
    )
    agents = [vsp1, vsp2]
    for _ in range(4):
        migrate_and_commit(agents[0], agents[1], guest, unique("m"))
        agents.reverse()
    settled = [rss_anon(vsp1), rss_anon(vsp2)]
    for _ in range(12):
        migrate_and_commit(agents[0], agents[1], guest, unique("m"))
        agents.reverse()
    grown = [rss_anon(vsp1) - settled[0], rss_anon(vsp2) - settled[1]]
    # Before: ~2.4 MiB per migration on each agent with this guest (about 29 MiB over these 12).
    assert max(grown) < 8 * MIB, [f"{g / MIB:.1f} MiB" for g in grown]
