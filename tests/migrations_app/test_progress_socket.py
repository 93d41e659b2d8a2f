"""The progress websocket: who may watch, the first message, and pushed updates.

Real Redis channel layer, the project's ASGI stack (origin check, session auth), no fakes.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from matrixoe.asgi import application
from migrations_app.models import Migration
from migrations_app.progress import publish_progress
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    make_migration,
    make_user,
    make_vm,
    make_vsp,
    session_cookie,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_url")]

ORIGIN = (b"origin", b"http://127.0.0.1")


def communicator(path: str, cookie: str | None = None, origin: tuple[bytes, bytes] = ORIGIN):
    headers = [origin, (b"host", b"127.0.0.1")]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, path, headers=headers)


@database_sync_to_async
def migrating_vm(copy_percent: int = 42):
    vsp1, vsp2 = make_vsp("vsp1"), make_vsp("vsp2")
    vm = make_vm("web01", vsp1)
    migration = make_migration(
        vm, vsp1, vsp2, state=Migration.State.COPY, init_percent=100, copy_percent=copy_percent, rounds=3
    )
    return vm, migration


@database_sync_to_async
def admin_cookie() -> str:
    return session_cookie(make_user("admin", MIGRATION_ADMIN_PERMISSIONS))


async def connect(path: str, cookie: str | None = None, origin: tuple[bytes, bytes] = ORIGIN):
    socket = communicator(path, cookie, origin)
    connected, _ = await socket.connect()
    return socket, connected


async def test_it_refuses_anonymous_users():
    vm, _ = await migrating_vm()
    socket, connected = await connect(f"/ws/vms/{vm.pk}/")
    assert not connected
    await socket.disconnect()


async def test_it_refuses_users_who_may_not_view_vms():
    vm, _ = await migrating_vm()
    cookie = await database_sync_to_async(lambda: session_cookie(make_user("nobody")))()
    socket, connected = await connect(f"/ws/vms/{vm.pk}/", cookie)
    assert not connected
    await socket.disconnect()


async def test_it_refuses_a_foreign_origin():
    vm, _ = await migrating_vm()
    socket, connected = await connect(
        f"/ws/vms/{vm.pk}/", await admin_cookie(), (b"origin", b"http://evil.example")
    )
    assert not connected
    await socket.disconnect()


async def test_it_refuses_an_unknown_vm():
    await migrating_vm()
    socket, connected = await connect("/ws/vms/999999/", await admin_cookie())
    assert not connected
    await socket.disconnect()


async def test_it_first_sends_the_current_state():
    vm, migration = await migrating_vm(copy_percent=42)
    socket, connected = await connect(f"/ws/vms/{vm.pk}/", await admin_cookie())
    assert connected
    html = await socket.receive_from(timeout=5)
    assert 'id="migration-phases"' in html and 'hx-swap-oob="true"' in html
    assert "42%" in html and "Migrating to VSP vsp2" in html
    assert 'id="migration-alerts"' in html and 'id="migration-status-icon"' in html
    await socket.disconnect()


async def test_a_published_update_reaches_every_watcher_of_the_vm_and_of_both_vsps():
    vm, migration = await migrating_vm(copy_percent=10)
    cookie = await admin_cookie()
    watchers = [
        await connect(f"/ws/vms/{vm.pk}/", cookie),
        await connect(f"/ws/vms/{vm.pk}/", cookie),
    ]
    source_tab, _ = await connect(f"/ws/vsps/{migration.source_id}/", cookie)
    target_tab, _ = await connect(f"/ws/vsps/{migration.target_id}/", cookie)
    for socket, connected in watchers:
        assert connected
        await socket.receive_from(timeout=5)
    assert "Migrating to vsp2" in await source_tab.receive_from(timeout=5)
    assert "Migrating from vsp1" in await target_tab.receive_from(timeout=5)

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(copy_percent=77, rounds=4)
    await database_sync_to_async(publish_progress)(migration)

    for socket, _ in watchers:
        html = await socket.receive_from(timeout=5)
        assert "77%" in html and 'data-round="4"' in html
    assert "Copy 77%" in await source_tab.receive_from(timeout=5)
    assert "Copy 77%" in await target_tab.receive_from(timeout=5)
    for socket in [s for s, _ in watchers] + [source_tab, target_tab]:
        await socket.disconnect()


async def test_a_failed_migration_shows_its_alert_to_a_browser_that_reconnects():
    vm, migration = await migrating_vm()
    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(
        state=Migration.State.ABORTED,
        failed_phase=Migration.State.COPY,
        alert="Copy phase failed: the guest dirties memory faster than it can be copied.",
    )
    socket, connected = await connect(f"/ws/vms/{vm.pk}/", await admin_cookie())
    assert connected
    html = await socket.receive_from(timeout=5)
    assert "Copy phase failed: the guest dirties memory faster than it can be copied." in html
    assert (
        '<section id="migration-phases" class="panel section migration-phases" hx-swap-oob="true" hidden'
        in html
    )
    await socket.disconnect()


async def test_a_page_that_missed_the_end_of_a_migration_re_fetches_its_tab_once():
    vm, migration = await migrating_vm()
    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(
        state=Migration.State.COMPLETED
    )
    cookie = await admin_cookie()
    refetch = 'hx-get="" hx-trigger="load"'

    rendered_while_copying, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-copy", cookie)
    assert refetch in await rendered_while_copying.receive_from(timeout=5)
    rendered_after_the_end, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-completed", cookie)
    assert refetch not in await rendered_after_the_end.receive_from(timeout=5)
    source_tab, _ = await connect(f"/ws/vsps/{migration.source_id}/", cookie)
    snapshot = await source_tab.receive_from(timeout=5)
    assert "Migrated to vsp2" in snapshot and refetch not in snapshot
    for socket in (rendered_while_copying, rendered_after_the_end, source_tab):
        await socket.disconnect()


REFETCH_TAB = 'id="general-tab-refetch" hidden hx-swap-oob="true"><span hx-get="" hx-trigger="load"'


ENDS = [Migration.State.CANCELLED, Migration.State.ABORTED, Migration.State.COMPLETED]


@pytest.mark.parametrize("end", ENDS)
async def test_every_end_of_a_migration_makes_watching_pages_re_fetch_their_tab(end):
    """The tab's history row still said "Running" after a cancel: only a completion re-fetched the tab."""
    vm, migration = await migrating_vm()
    cookie = await admin_cookie()
    socket, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-copy", cookie)
    assert REFETCH_TAB not in await socket.receive_from(timeout=5)  # running: nothing to re-fetch yet

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(state=end)
    await database_sync_to_async(publish_progress)(migration)

    assert REFETCH_TAB in await socket.receive_from(timeout=5)
    reconnected, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-copy", cookie)
    assert REFETCH_TAB in await reconnected.receive_from(timeout=5)  # the page missed the end
    up_to_date, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-{end}", cookie)
    assert REFETCH_TAB not in await up_to_date.receive_from(timeout=5)
    for each in (socket, reconnected, up_to_date):
        await each.disconnect()


async def test_a_page_already_up_to_date_keeps_its_migrate_button_when_the_socket_opens():
    """Clicking Migrate… before the socket's first message did nothing: the message replaced the button
    while its request was on its way, and htmx dropped the dialog ("Invalid re-target")."""
    vm, migration = await migrating_vm()
    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(
        state=Migration.State.COMPLETED
    )
    cookie = await admin_cookie()

    up_to_date, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-completed", cookie)
    first = await up_to_date.receive_from(timeout=5)
    missed_the_end, _ = await connect(f"/ws/vms/{vm.pk}/?seen={migration.pk}-copy", cookie)
    second = await missed_the_end.receive_from(timeout=5)

    assert 'id="migration-phases"' in first and 'id="migrate-control"' not in first
    assert 'id="migrate-control"' in second and 'id="migrate-button"' in second
    for socket in (up_to_date, missed_the_end):
        await socket.disconnect()


async def test_the_vsp_socket_refuses_anonymous_users_and_unknown_vsps():
    await migrating_vm()
    anonymous, connected = await connect("/ws/vsps/1/")
    assert not connected
    unknown, connected = await connect("/ws/vsps/999999/", await admin_cookie())
    assert not connected
    for socket in (anonymous, unknown):
        await socket.disconnect()


@pytest.mark.parametrize("path", ["/ws/vms/abc/", "/ws/nonsense/", "/ws/vsps/1/extra/", "/"])
async def test_an_unknown_websocket_path_closes_cleanly_with_4404(path, caplog):
    socket, connected = await connect(path, await admin_cookie())
    assert connected
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}
    await socket.disconnect()
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


async def test_a_vsp_tab_gets_updates_only_for_the_rows_its_page_shows():
    vm, migration = await migrating_vm(copy_percent=10)
    cookie = await admin_cookie()
    other_page, _ = await connect(f"/ws/vsps/{migration.source_id}/?vms=999998,999999", cookie)
    this_page, _ = await connect(f"/ws/vsps/{migration.source_id}/?vms={vm.pk}", cookie)
    snapshot = await other_page.receive_from(timeout=5)
    assert f'id="vm-{vm.pk}-migration"' not in snapshot  # no row to swap into: nothing sent for it
    assert f'id="vm-{vm.pk}-migration"' in await this_page.receive_from(timeout=5)

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(copy_percent=55)
    await database_sync_to_async(publish_progress)(migration)

    assert "Copy 55%" in await this_page.receive_from(timeout=5)
    assert await other_page.receive_nothing(timeout=0.5)
    for socket in (other_page, this_page):
        await socket.disconnect()


@pytest.mark.parametrize(
    "query",
    [
        "vms=%C2%B2",  # a superscript two: str.isdigit() accepts it, int() refuses it
        "vms=1,%D9%A3",  # an Arabic-Indic three
        "vms=1;2",
        "vms=1&vms=2",
        "vms=1&other=2",
        "vms=" + ",".join(["1"] * 1001),
        "vms=%FF",
    ],
)
async def test_a_malformed_vsp_query_is_closed_with_4400_and_live_progress_goes_on(query):
    vm, migration = await migrating_vm(copy_percent=10)
    cookie = await admin_cookie()
    watcher, connected = await connect(f"/ws/vms/{vm.pk}/", cookie)
    assert connected
    await watcher.receive_from(timeout=5)

    crafted, connected = await connect(f"/ws/vsps/{migration.source_id}/?{query}", cookie)
    assert connected
    assert await crafted.receive_output(timeout=2) == {"type": "websocket.close", "code": 4400}

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(copy_percent=66)
    await database_sync_to_async(publish_progress)(migration)
    assert "66%" in await watcher.receive_from(timeout=5)
    source_tab, _ = await connect(f"/ws/vsps/{migration.source_id}/?vms={vm.pk}", cookie)
    assert "Copy 66%" in await source_tab.receive_from(timeout=5)
    for socket in (watcher, crafted, source_tab):
        await socket.disconnect()


@pytest.mark.parametrize("query", ["seen=%C2%B2", "seen=1-copy&seen=2-copy", "seen=<script>", "foo=1"])
async def test_a_malformed_vm_query_is_closed_with_4400(query):
    vm, _ = await migrating_vm()
    socket, connected = await connect(f"/ws/vms/{vm.pk}/?{query}", await admin_cookie())
    assert connected
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4400}
    await socket.disconnect()


@pytest.mark.parametrize("path", ["/ws/vms/99999999999999999999999/", "/ws/vsps/%C2%B2/", "/ws/vms/²/"])
async def test_an_out_of_range_or_non_ascii_id_in_the_path_closes_with_4404(path):
    await migrating_vm()
    socket, connected = await connect(path, await admin_cookie())
    assert connected
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}
    await socket.disconnect()


async def test_the_vsp_socket_needs_the_vsp_view_permission_not_the_vm_one():
    """A role carries both view permissions (``vms.access.ROLE_PERMISSIONS``): the VM's alone, given in
    the admin without a role, opens no VSP socket."""
    _, migration = await migrating_vm()
    vm_viewer = await database_sync_to_async(
        lambda: session_cookie(make_user("vm-viewer", ("vms.view_virtualmachine",), role=None))
    )()
    vsp_viewer = await database_sync_to_async(
        lambda: session_cookie(make_user("vsp-viewer", ("vms.view_vsp",)))
    )()
    refused, connected = await connect(f"/ws/vsps/{migration.source_id}/", vm_viewer)
    assert not connected
    allowed, connected = await connect(f"/ws/vsps/{migration.source_id}/", vsp_viewer)
    assert connected
    assert "Migrating to vsp2" in await allowed.receive_from(timeout=5)
    for socket in (refused, allowed):
        await socket.disconnect()


async def test_a_vm_that_arrives_makes_the_target_vsps_open_pages_re_fetch_their_tab():
    vm, migration = await migrating_vm()
    cookie = await admin_cookie()
    # The target's page shows other guests only (?vms= lists its rows): the arriving VM has no row there.
    other = await database_sync_to_async(make_vm)("db01", migration.target)
    target_tab, connected = await connect(f"/ws/vsps/{migration.target_id}/?vms={other.pk}", cookie)
    assert connected
    await target_tab.receive_from(timeout=5)

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(state="completed")
    await database_sync_to_async(publish_progress)(migration)

    html = await target_tab.receive_from(timeout=5)
    assert 'id="vsp-arrival"' in html and 'hx-target="#virtual-machines-tab"' in html
    assert f'data-arrived="{vm.pk}"' in html
    await target_tab.disconnect()


async def test_while_it_runs_the_pushed_migrate_control_names_the_migration():
    vm, migration = await migrating_vm()
    cookie = await admin_cookie()
    watcher, connected = await connect(f"/ws/vms/{vm.pk}/", cookie)
    assert connected
    html = await watcher.receive_from(timeout=5)
    assert 'id="migrate-control"' in html and "Migration to VSP vsp2 running" in html
    assert 'id="migrate-button" disabled' in html

    await database_sync_to_async(Migration.objects.filter(pk=migration.pk).update)(state="aborted")
    await database_sync_to_async(publish_progress)(migration)
    html = await watcher.receive_from(timeout=5)
    assert f'hx-get="/migrations/vms/{vm.pk}/migrate/"' in html  # offered again, without a reload
    await watcher.disconnect()


async def test_the_end_of_a_link_probe_reaches_the_general_tabs_of_the_guests_on_its_source():
    """QA: an open migrate dialog showed a probe's result only at its next 3 s poll. The probe's end is
    pushed to the General tab of every guest runnable on its source (a signal: console.js makes the
    dialog fetch its forecasts); a guest elsewhere is told nothing."""
    from migrations_app.link_probes import probe_now

    @database_sync_to_async
    def guests():
        vsp1, vsp2, vsp3 = (
            make_vsp("vsp1", agent_url="http://127.0.0.1:9"),
            make_vsp("vsp2"),
            make_vsp("vsp3"),
        )
        return make_vm("web01", vsp1), make_vm("db01", vsp3), vsp1, vsp2

    here, elsewhere, source, target = await guests()
    cookie = await admin_cookie()
    watching, connected = await connect(f"/ws/vms/{here.pk}/", cookie)
    assert connected
    first = await watching.receive_from(timeout=5)
    assert 'id="link-probed"' not in first
    other, connected = await connect(f"/ws/vms/{elsewhere.pk}/", cookie)
    assert connected
    await other.receive_from(timeout=5)

    probe = await database_sync_to_async(probe_now)(source.pk, target.pk)  # no agent answers: it fails
    assert probe.error
    assert (
        await watching.receive_from(timeout=5) == '<span id="link-probed" hidden hx-swap-oob="true"></span>'
    )
    assert await other.receive_nothing(timeout=1)
    for socket in (watching, other):
        await socket.disconnect()
