"""The agent's own ``/metrics`` against real agent processes: behind its secret, guests and migrations."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.hostagent.conftest import converged_or_ended, define_running_guest, follow, start, unique


def scrape(agent, secret: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return httpx.get(f"{agent.url}/metrics", headers=headers, timeout=10, verify=agent.verify)


def samples(response: httpx.Response) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_it_refuses_a_scrape_without_the_secret(agent_pair):
    vsp1, _ = agent_pair
    assert scrape(vsp1, None).status_code == 401
    assert scrape(vsp1, "not-the-secret").status_code == 401


def test_it_counts_its_guests_and_their_memory(agent_pair):
    vsp1, _ = agent_pair
    before = samples(scrape(vsp1, vsp1.secret))
    define_running_guest(vsp1, unique("metered"), memory_mib=48)

    after = samples(scrape(vsp1, vsp1.secret))

    on = ("hardware_status", "on")
    assert after[("matrixoe_agent_guests", (on,))] == before[("matrixoe_agent_guests", (on,))] + 1
    memory = (
        after[("matrixoe_agent_guest_memory_mib", (on,))] - before[("matrixoe_agent_guest_memory_mib", (on,))]
    )
    assert memory == 48
    assert (
        after[("matrixoe_agent_info", (("driver", "simulated"), ("name", "vsp1"), ("version", "0.1.0")))] == 1
    )
    assert after[("process_resident_memory_bytes", ())] > 0


def test_it_shows_a_running_migration_by_side_and_state(agent_pair):
    vsp1, vsp2 = agent_pair
    guest = define_running_guest(vsp1, unique("metered-move"), memory_mib=64, dirty_pages_per_s=2000)
    migration_id = unique("m")
    start(vsp1, vsp2, guest, migration_id, downtime_ms=1)  # too small to converge: it stays in Copy
    follow(vsp1, migration_id, lambda snapshot: snapshot.bytes_sent > 0 or converged_or_ended(snapshot))

    source = samples(scrape(vsp1, vsp1.secret))
    target = samples(scrape(vsp2, vsp2.secret))

    assert source[("matrixoe_agent_migrations", (("role", "source"), ("state", "copy")))] >= 1
    assert (
        source[("matrixoe_agent_migration_bytes_sent", (("migration_id", migration_id), ("role", "source")))]
        > 0
    )
    assert any(
        name == "matrixoe_agent_migrations" and ("role", "target") in labels for name, labels in target
    )
    vsp1.client.cancel(migration_id)
