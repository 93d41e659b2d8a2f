"""The API against a live console: a real migration created over HTTP, its progress streamed as JSON
(server-sent events), and /metrics counting it afterwards. Real server, worker, Redis and host agents."""

from __future__ import annotations

import json

import httpx
import pytest

from api.tokens import do_create_token
from tests.api.conftest import READ_ONLY, WRITER
from tests.factories import make_user
from tests.migrations_app.guests import place_vm, runs_on

pytestmark = pytest.mark.django_db(transaction=True)


def read_events(base_url: str, token: str, migration_id: int) -> list[tuple[str, dict]]:
    events, event = [], "message"
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{base_url}/api/v1/migrations/{migration_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line[5:])))
    return events


def test_it_migrates_over_http_streams_progress_and_counts_it_in_metrics(host_agents, fleet, live_console):
    token = do_create_token(make_user("alice", permissions=WRITER), "live")[1]
    headers = {"Authorization": f"Bearer {token}"}
    vm = place_vm(host_agents, fleet, memory_mib=16, fill_percent=30)

    created = httpx.post(
        f"{live_console}/api/v1/migrations",
        json={"vm": vm.name, "target": "hostb"},
        headers=headers,
        timeout=30,
    )
    assert created.status_code == 201, created.text
    events = read_events(live_console, token, created.json()["id"])

    assert events[0][1]["state"]["value"] in ("queued", "init", "copy", "io_quiesce", "frozen")
    kind, final = events[-1]
    assert kind == "end" and final["state"]["value"] == "completed", final["alert"]
    assert [p["percent"] for p in final["phases"]] == [100, 100, 100, 100]
    assert final["statistics"]["downtime_ms"] is not None
    assert runs_on(host_agents["hostb"], vm.name)
    general = httpx.get(f"{live_console}/api/v1/vms/{vm.name}", headers=headers, timeout=30).json()
    assert general["vsp"] == "hostb"

    metrics = httpx.get(f"{live_console}/metrics", headers=headers, timeout=30)
    assert metrics.status_code == 200
    text = metrics.text
    assert 'matrixoe_migrations_total{failed_phase="",outcome="completed"} 1.0' in text
    assert "matrixoe_migration_downtime_seconds_count 1.0" in text
    assert 'matrixoe_agent_reachable{vsp="hostb"} 1.0' in text


def test_it_refuses_a_scrape_without_token_from_an_address_not_allowed(live_console):
    response = httpx.get(f"{live_console}/metrics", timeout=30)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert "METRICS_ALLOWED_IPS" in response.json()["detail"]
    assert "matrixoe_" not in response.text


def test_it_refuses_the_progress_stream_to_anonymous_and_unknown_ids(live_console):
    token = do_create_token(make_user("olga", permissions=READ_ONLY), "live")[1]

    anonymous = httpx.get(f"{live_console}/api/v1/migrations/1/events", timeout=30)
    unknown = httpx.get(
        f"{live_console}/api/v1/migrations/424242/events",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )

    assert anonymous.status_code == 401 and anonymous.headers["content-type"] == "application/problem+json"
    assert unknown.status_code == 404 and unknown.json()["detail"] == "No migration with the id 424242."


def test_the_progress_stream_names_only_the_watchers_end_of_a_migration(live_console):
    """The stream ``matrixoe migrate --watch`` reads gave a viewer of one end the other group's VSP,
    who asked and the alert's words naming it (issue 18.14 follow-up)."""
    from migrations_app.models import Migration
    from tests.factories import make_host_group, make_vm, make_vsp
    from vms.models import Role

    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    source, target = make_vsp("vsp-l1", group=lab), make_vsp("vsp-p2", group=prod)
    boss = make_user("prod-boss", permissions=WRITER, role=Role.OPERATOR, group=prod)
    migration = Migration.objects.create(
        vm=make_vm("lab01", source), source=source, target=target, state="aborted", requested_by=boss,
        alert="Copy phase failed: the target host vsp-p2 refused. The VM keeps running on vsp-l1.",
    )  # fmt: skip
    token = do_create_token(make_user("lab-op", READ_ONLY, role=Role.VIEWER, group=lab), "live")[1]

    events = read_events(live_console, token, migration.pk)

    assert [kind for kind, _ in events] == ["end"]
    final = events[0][1]
    assert (final["source"], final["target"], final["requested_by"]) == (
        "vsp-l1", "a VSP of another host group", None,
    )  # fmt: skip
    assert "vsp-p2" not in json.dumps(final) and "prod-boss" not in json.dumps(final)


def test_it_starts_one_migration_for_two_simultaneous_posts_with_one_key(host_agents, fleet, live_console):
    from concurrent.futures import ThreadPoolExecutor

    from migrations_app.models import Migration

    token = do_create_token(make_user("alice", permissions=WRITER), "live")[1]
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "one-click-two-requests"}
    vm = place_vm(host_agents, fleet)

    def post(_):
        body = {"vm": vm.name, "target": "hostc"}
        return httpx.post(f"{live_console}/api/v1/migrations", json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(post, range(2)))

    assert sorted(r.status_code for r in responses) == [200, 201], [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert Migration.objects.filter(vm=vm).count() == 1


def test_a_change_to_a_running_migration_reaches_its_progress_stream(
    host_agents, fleet, live_console, wait_for
):
    """A program watching the stream sees an admin's change as it happens, and the event says who and what."""
    import threading

    from migrations_app.models import Migration

    token = do_create_token(make_user("alice", permissions=WRITER), "live")[1]
    headers = {"Authorization": f"Bearer {token}"}
    vm = place_vm(
        host_agents, fleet, memory_mib=8, dirty_pages_per_s=3000, fill_percent=100
    )  # never converges
    created = httpx.post(
        f"{live_console}/api/v1/migrations",
        json={"vm": vm.name, "target": "hostb"},
        headers=headers,
        timeout=30,
    )
    migration_id = created.json()["id"]
    assert wait_for(lambda: Migration.objects.get(pk=migration_id).state == "copy", timeout=60)
    seen: list[tuple[str, dict]] = []

    def watch() -> None:
        for event in stream_events(live_console, token, migration_id):
            seen.append(event)

    watching = threading.Thread(target=watch)
    watching.start()
    assert wait_for(lambda: bool(seen), timeout=30)  # the stream's current state arrived: it is watching

    changed = httpx.patch(
        f"{live_console}/api/v1/migrations/{migration_id}/policy",
        json={"max_downtime_ms": 5000},
        headers=headers,
        timeout=30,
    )
    watching.join(timeout=150)

    assert changed.status_code == 200, changed.text
    assert seen[0][1]["policy"]["max_downtime_ms"] == 300
    assert any(kind == "progress" and data["policy"]["max_downtime_ms"] == 5000 for kind, data in seen)
    assert seen[-1][0] == "end" and seen[-1][1]["state"]["value"] == "completed", seen[-1][1]["alert"]
    detail = httpx.get(f"{live_console}/api/v1/migrations/{migration_id}", headers=headers, timeout=30).json()
    assert {"actor": "alice", "message": "alice raised the allowed downtime to 5.0 s"}.items() <= next(
        event for event in detail["events"] if "raised" in event["message"]
    ).items()


def stream_events(base_url: str, token: str, migration_id: int):
    """``read_events``, yielding each event as it arrives."""
    event = "message"
    url = f"{base_url}/api/v1/migrations/{migration_id}/events"
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                yield event, json.loads(line[5:])
