"""Faults across the reference deployment (issue 22 item 3), against the real processes of `make
run-cluster`: HAProxy in front of two uvicorn processes, two Celery workers and beat reaching Redis
through three Sentinels, a Redis master and its replica, PostgreSQL, four demo host agents, and real
Chromium pages on the balancer's address.

Each test reads what the console decided from its database (``Cluster.django``) and what a user sees
from the pages; none waits for a fixed time.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from devtools.processes import start_process, wait_until
from tests.cluster.conftest import Cluster
from tests.conftest import chromium_browser, log_in

pytestmark = [pytest.mark.cluster]

NOTICE = "#connection-status"
COPY_PERCENT = "#migration-phases tr[data-phase=Copy] [data-field=phase_percent]"


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as launched:
        yield launched


def watching(cluster: Cluster, browser, vm_name: str):
    """A new Chromium page (its own cookies) logged in as admin on the balancer, on ``vm_name``'s
    General tab, once its progress socket is open."""
    before = sum(cluster.watchers().values())
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    log_in(page, cluster.url, "admin", cluster.password("admin"))
    page.goto(f"{cluster.url}/vms/{vm_ids(cluster)[vm_name]}/general/")
    opened = wait_until(lambda: sum(cluster.watchers().values()) > before, 45)
    assert opened, (cluster.watchers(), page.url, page.locator(NOTICE).inner_text(), page.content()[:2000])
    return page


_vm_ids: dict[str, dict[str, int]] = {}


def vm_ids(cluster: Cluster) -> dict[str, int]:
    if cluster.database not in _vm_ids:
        code = (
            "from vms.models import VirtualMachine as VM\nresult = dict(VM.objects.values_list('name', 'pk'))"
        )
        _vm_ids[cluster.database] = cluster.django(code)
    return _vm_ids[cluster.database]


def request_migrations(cluster: Cluster, moves: list[tuple[str, str]]) -> list[int]:
    """Queue each (VM, target VSP) as admin, in order (``actions.do_request_migration``); their ids."""
    code = f"""
from django.contrib.auth import get_user_model
from migrations_app.actions import do_request_migration
from vms.models import VSP, VirtualMachine
admin = get_user_model().objects.get(username="admin")
result = [
    do_request_migration(VirtualMachine.objects.get(name=vm), VSP.objects.get(name=target), admin).pk
    for vm, target in {moves!r}
]
"""
    return cluster.django(code)


def outcomes(cluster: Cluster, ids: list[int]) -> dict:
    """Per migration: its state, its state changes (from, to) and where its VM is runnable."""
    code = f"""
from django.db.models import F
from migrations_app.models import Migration
from vms.models import Registration
result = {{}}
for migration in Migration.objects.filter(pk__in={ids!r}).select_related("vm"):
    changes = migration.events.exclude(from_state=F("to_state")).values_list("from_state", "to_state")
    runnable = Registration.objects.filter(vm=migration.vm).exclude(hardware_status="not_runnable")
    result[migration.pk] = {{
        "state": migration.state,
        "alert": migration.alert,
        "copy_percent": migration.copy_percent,
        "changes": [list(change) for change in changes],
        "entered_at": {{event.to_state: event.at.timestamp() for event in migration.events.all()}},
        "runnable_on": sorted(copy.vsp.name for copy in runnable.select_related("vsp")),
        "lease_owner": migration.lease_owner,
    }}
"""
    return {int(key): value for key, value in cluster.django(code).items()}


def states(cluster: Cluster, ids: list[int]) -> dict[int, str]:
    return {key: value["state"] for key, value in outcomes(cluster, ids).items()}


def states_or_none(cluster: Cluster, ids: list[int]) -> dict[int, str] | None:
    """``states``, or None while the database does not answer."""
    try:
        return states(cluster, ids)
    except AssertionError:
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


ONE_COMPLETED_RUN = [
    ["", "queued"],
    ["queued", "init"],
    ["init", "copy"],
    ["copy", "io_quiesce"],
    ["io_quiesce", "frozen"],
    ["frozen", "committing"],
    ["committing", "completed"],
]


def page_copy_percent(page) -> int:
    cell = page.locator(COPY_PERCENT)
    if not cell.count():
        return -1
    digits = "".join(ch for ch in cell.first.inner_text() if ch.isdigit())
    return int(digits or 0)


def caught_up(page, copy_percent: int) -> bool:
    """The page shows Copy at ``copy_percent`` or more, or a later phase (it moved on meanwhile)."""
    state = page.locator("#migration-phases").get_attribute("data-state")
    return state not in (None, "queued", "init", "copy") or page_copy_percent(page) >= copy_percent


def shows_vsp(page, name: str) -> bool:
    return page.locator("[data-field=vsp]").inner_text().strip() == name


def test_a_logged_in_page_and_its_progress_socket_load_through_the_balancer(cluster, browser):
    page = watching(cluster, browser, "db01")
    assert page.locator("#vm-name").inner_text() == "db01"
    assert shows_vsp(page, "vsp1")
    assert page.locator(NOTICE).is_hidden()
    assert len(cluster.web_ports()) == 2 and all(
        cluster.watchers().get(name) is not None for name in cluster.web_ports()
    )
    page.context.close()


# Pages watching when a web process is killed: 2 with their own logins, the rest windows of a third.
# The issue asks 200; on this 2-core machine under other tests' load 200 windows took 4-5 min to open
# (192 of 200 sockets after 300 s once), so CI runs 50 and MATRIXOE_CLUSTER_WATCHERS=200 runs the issue's.
WATCHERS = int(os.environ.get("MATRIXOE_CLUSTER_WATCHERS", "50"))


def watching_tabs(cluster: Cluster, browser, vm_name: str, count: int) -> list:
    """``count`` Chromium windows of one logged-in context on ``vm_name``'s General tab, once every
    one's progress socket is open (the balancer spreads them by its leastconn rule).

    All but the first are opened by the first with ``window.open``: windows of one site opened by a
    script share its renderer process (one process, not ``count``: ~200 renderers would not fit a
    2-core CI machine), and each is still a whole page with its own socket and scripts."""
    before = sum(cluster.watchers().values())
    context = browser.new_context(viewport={"width": 1024, "height": 700})
    first = context.new_page()
    first.set_default_timeout(60_000)
    log_in(first, cluster.url, "admin", cluster.password("admin"))
    url = f"{cluster.url}/vms/{vm_ids(cluster)[vm_name]}/general/"
    first.goto(url)
    first.evaluate(
        "([url, count]) => { for (let i = 0; i < count; i++) window.open(url, `w${i}`); }", [url, count - 1]
    )

    def all_open() -> bool:
        first.wait_for_timeout(100)  # Playwright hands over new windows only while it is called
        return len(context.pages) >= count

    assert wait_until(all_open, 60), len(context.pages)

    def sockets_open() -> bool:
        first.wait_for_timeout(100)
        return sum(cluster.watchers().values()) >= before + count

    opened = wait_until(sockets_open, 300)
    assert opened, (before, count, cluster.watchers())
    for page in context.pages:
        page.set_default_timeout(60_000)
    return list(context.pages)


@pytest.mark.timeout(900)  # 200 pages load through one renderer process: minutes on a loaded machine
def test_a_web_process_killed_under_watching_pages_loses_none_of_them(cluster, browser):
    """kill -9 of a web process while ``WATCHERS`` Chromium pages watch a migration: the sockets it held
    reconnect through the balancer to the other one, every page shows the state the migration reached
    meanwhile (no stale progress), and then its end (no missed end)."""
    restarts_before = len(cluster.restarted())
    pages = [watching(cluster, browser, "mail01") for _ in range(2)]
    pages += watching_tabs(cluster, browser, "mail01", WATCHERS - 2)
    [migration] = request_migrations(cluster, [("mail01", "vsp1")])
    for page in pages[:2]:  # the kill comes in Copy (checking 200 pages first could outlast it)
        page.wait_for_function(f"() => document.querySelector('{COPY_PERCENT}') !== null")

    held = cluster.watchers()
    assert sum(held.values()) == WATCHERS and min(held.values()) > 0, held  # leastconn: on both
    victim = max(held, key=held.get)
    moved = held[victim]
    os.kill(cluster.pid(victim), signal.SIGKILL)
    killed_at = time.monotonic()

    assert wait_until(lambda: sum(cluster.watchers().values()) >= WATCHERS, 90), cluster.watchers()
    reconnect_s = time.monotonic() - killed_at
    now = outcomes(cluster, [migration])[migration]
    if now["state"] == "copy":  # no stale progress: each page catches up with what the worker recorded
        for page in pages:
            assert wait_until(lambda page=page: caught_up(page, now["copy_percent"]), 30)
    assert wait_until(lambda: states(cluster, [migration])[migration] in ("completed", "aborted"), 120)
    behind = [
        index
        for index, page in enumerate(pages)
        if not wait_until(lambda page=page: shows_vsp(page, "vsp1"), 30)
    ]
    assert not behind, f"{len(behind)} of {WATCHERS} pages missed the end (first: page {behind[0]})"
    assert all(page.locator(NOTICE).is_hidden() for page in pages)
    result = outcomes(cluster, [migration])[migration]
    assert result["state"] == "completed", result["alert"]
    assert result["changes"] == ONE_COMPLETED_RUN
    assert result["runnable_on"] == ["vsp1"]
    assert [line.split()[0] for line in cluster.restarted()[restarts_before:]] == [victim]  # as systemd would
    print(f"\n{moved} of {WATCHERS} sockets back on a live web process {reconnect_s:.1f} s after the kill -9")
    for context in {page.context for page in pages}:
        context.close()
    # The next test counts sockets opened from the number open now: wait for all of these to be gone.
    assert wait_until(lambda: sum(cluster.watchers().values()) == 0, 60), cluster.watchers()


def test_a_redis_master_stopped_under_migrations_fails_over_and_loses_nothing(cluster, browser):
    """The Redis master stopped while one migration copies and another waits behind it (same source):
    the Sentinels promote the replica, the channel layer and the workers follow it, the first migration
    ends once, the queued one is not lost, and pushes reach the pages again."""
    restarts_before = len(cluster.restarted())
    in_flight, waiting = watching(cluster, browser, "web01"), watching(cluster, browser, "web02")
    first, queued = request_migrations(cluster, [("web01", "vsp2"), ("web02", "vsp2")])
    in_flight.wait_for_function(f"() => document.querySelector('{COPY_PERCENT}') !== null")

    master = cluster.master_port()
    os.kill(cluster.pid(f"redis-{master}"), signal.SIGTERM)
    stopped_at, stopped_at_wall = time.monotonic(), time.time()
    assert wait_until(lambda: cluster.master_port() != master, 30)
    failover_s = time.monotonic() - stopped_at

    seen: set[int] = set()

    def ended() -> bool:
        seen.add(page_copy_percent(waiting))
        return set(states(cluster, [first, queued]).values()) <= {"completed", "aborted"}

    assert wait_until(ended, 180, 0.2)
    # pushes resumed: the page of the queued VM, opened before the failover, followed its Copy and its end
    assert seen & set(range(1, 100)), sorted(seen)
    assert wait_until(lambda: shows_vsp(waiting, "vsp2"), 30)
    assert wait_until(lambda: shows_vsp(in_flight, "vsp2"), 30)
    for page in (in_flight, waiting):
        assert "Live updates stopped" not in page.locator(NOTICE).inner_text()
    results = outcomes(cluster, [first, queued])
    # the master went while the first migration ran and the second waited for it
    assert results[first]["entered_at"]["init"] < stopped_at_wall < results[first]["entered_at"]["completed"]
    assert results[queued]["entered_at"]["init"] > stopped_at_wall
    for migration in (first, queued):
        assert results[migration]["state"] == "completed", results[migration]["alert"]
        assert results[migration]["changes"] == ONE_COMPLETED_RUN  # one outcome, no step taken twice
        assert results[migration]["runnable_on"] == ["vsp2"]
    # no worker ended on the way (one did: the late acknowledgement, matrixoe/celery_consumer.py)
    assert not cluster.restarted()[restarts_before:], cluster.restarted()
    print(f"\nnew master named by the Sentinels {failover_s:.1f} s after the old one stopped")
    for page in (in_flight, waiting):
        page.context.close()


def test_a_worker_killed_mid_migration_is_decided_once_by_another(cluster):
    """kill -9 of the worker driving a migration in Copy: recovery, run by the other worker, aborts it
    once its lease expired, and the guest stays on its source; the launcher starts the worker again."""
    [migration] = request_migrations(cluster, [("db01", "vsp2")])  # about 40 s of Copy at the test's cap
    assert wait_until(lambda: states(cluster, [migration])[migration] == "copy", 60)
    owner = outcomes(cluster, [migration])[migration]["lease_owner"]
    kind, _host, pid, _run = owner.split(":")
    assert kind == "worker"
    victim = next(name for name, item in cluster.state["processes"].items() if item["pid"] == int(pid))
    os.kill(int(pid), signal.SIGKILL)

    assert wait_until(lambda: states(cluster, [migration])[migration] != "copy", 60)
    result = outcomes(cluster, [migration])[migration]
    assert result["state"] == "aborted", result
    assert result["changes"] == [["", "queued"], ["queued", "init"], ["init", "copy"], ["copy", "aborted"]]
    assert result["alert"] == (
        "Copy phase failed: the control-plane worker driving it stopped answering. "
        "The VM keeps running on vsp1."
    )
    assert result["lease_owner"].startswith("recovery:")
    assert result["runnable_on"] == ["vsp1"]
    assert wait_until(lambda: any(line.startswith(f"{victim} exited") for line in cluster.restarted()), 20)


def test_postgresql_restarted_mid_migration_is_survived(cluster):
    """PostgreSQL stopped (fast shutdown) and started again while a migration copies: the worker's next
    database calls reconnect and the migration ends with one outcome."""
    where = cluster.django(
        "from vms.models import VirtualMachine as VM\nresult = VM.objects.get(name='mail01').current_vsp.name"
    )
    target = "vsp2" if where == "vsp1" else "vsp1"
    [migration] = request_migrations(cluster, [("mail01", target)])
    assert wait_until(lambda: states(cluster, [migration])[migration] == "copy", 60)

    postmaster = cluster.pid("postgres")
    args = Path(f"/proc/{postmaster}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{postmaster}/environ").read_bytes().decode().split("\0")
        if "=" in item
    )
    os.kill(postmaster, signal.SIGINT)  # fast shutdown: sessions are ended, as in a restart
    assert wait_until(lambda: not Path(f"/proc/{postmaster}").exists() or _zombie(postmaster), 30)
    restarted = start_process(
        "postgres",
        [arg.decode() for arg in args],
        cluster.var_dir / "logs" / "postgres.log",
        environ,
        user="postgres",
    )
    cluster.extra.append(restarted)
    assert wait_until(lambda: states_or_none(cluster, [migration]) is not None, 60)

    assert wait_until(lambda: states(cluster, [migration])[migration] in ("completed", "aborted"), 120)
    result = outcomes(cluster, [migration])[migration]
    decided = [change for change in result["changes"] if change[1] in ("completed", "aborted", "cancelled")]
    assert len(decided) == 1, result["changes"]
    assert result["state"] == "completed", result
    assert result["runnable_on"] == [target]
