"""The progress websockets per host group: a VM or VSP of another group is refused like a missing one.

Real Redis channel layer and the project's ASGI stack (origin check, session auth), as in
``test_progress_socket.py``; each user holds every global permission, so the host-group role decides.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async

from migrations_app.models import Migration
from tests.factories import (
    MIGRATION_ADMIN_PERMISSIONS,
    VIEW_PERMISSIONS,
    make_admin,
    make_host_group,
    make_migration,
    make_user,
    make_vm,
    make_vsp,
    session_cookie,
)
from tests.migrations_app.test_progress_socket import communicator
from vms.models import Role

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("redis_url")]

PERMISSIONS = tuple(sorted(set(VIEW_PERMISSIONS + MIGRATION_ADMIN_PERMISSIONS)))


async def connect(path: str, cookie: str):
    """Open a socket; a generous handshake limit, as the first one of a process starts its fan-out reader
    (on a loaded machine that takes more than the communicator's default second)."""
    socket = communicator(path, cookie)
    connected, _ = await socket.connect(timeout=10)
    return socket, connected


@database_sync_to_async
def two_groups() -> dict:
    """Prod (vsp-p1 -> vsp-p2, web01 migrating) and Lab (vsp-l1, lab01); a cookie per role."""
    prod, lab = make_host_group("Prod"), make_host_group("Lab")
    p1, p2, l1 = make_vsp("vsp-p1", group=prod), make_vsp("vsp-p2", group=prod), make_vsp("vsp-l1", group=lab)
    web = make_vm("web01", p1)
    make_migration(web, p1, p2, state=Migration.State.COPY, init_percent=100, copy_percent=42)
    lab_vm = make_vm("lab01", l1)
    cookies = {
        role: session_cookie(make_user(f"prod-{role}", PERMISSIONS, role=role, group=prod)) for role in Role
    }
    cookies["other"] = session_cookie(make_user("lab-op", PERMISSIONS, role=Role.OPERATOR, group=lab))
    cookies["superuser"] = session_cookie(make_admin("root"))
    return {"web": web, "lab_vm": lab_vm, "p1": p1, "l1": l1, "cookies": cookies}


@pytest.mark.parametrize("who", ["viewer", "operator", "administrator", "superuser"])
async def test_a_member_of_the_group_watches_its_vm_and_vsp(who):
    fleet = await two_groups()
    cookie = fleet["cookies"][who]
    vm_socket, connected = await connect(f"/ws/vms/{fleet['web'].pk}/", cookie)
    assert connected
    assert "42%" in await vm_socket.receive_from(timeout=5)
    vsp_socket, connected = await connect(f"/ws/vsps/{fleet['p1'].pk}/", cookie)
    assert connected
    assert "Migrating to vsp-p2" in await vsp_socket.receive_from(timeout=5)
    await vm_socket.disconnect()
    await vsp_socket.disconnect()


@pytest.mark.parametrize("who", ["viewer", "operator", "administrator"])
async def test_the_sockets_refuse_a_vm_and_a_vsp_of_another_group(who):
    fleet = await two_groups()
    cookie = fleet["cookies"][who]
    for path in (f"/ws/vms/{fleet['lab_vm'].pk}/", f"/ws/vsps/{fleet['l1'].pk}/"):
        socket, connected = await connect(path, cookie)
        assert not connected, path
        await socket.disconnect()


async def test_a_user_of_another_group_cannot_watch_the_migration():
    fleet = await two_groups()
    cookie = fleet["cookies"]["other"]
    for path in (f"/ws/vms/{fleet['web'].pk}/", f"/ws/vsps/{fleet['p1'].pk}/"):
        socket, connected = await connect(path, cookie)
        assert not connected, path
        await socket.disconnect()
    socket, connected = await connect(f"/ws/vms/{fleet['lab_vm'].pk}/", cookie)
    assert connected  # their own group's VM
    await socket.disconnect()


STEER_CONTROLS = (
    'id="steer-switchover"',
    'id="steer-downtime"',
    'id="steer-bandwidth"',
    'class="migration-cancel"',
)


def publish(migration_id: int) -> None:
    from migrations_app.progress import publish_progress

    publish_progress(migration_id)


async def test_pushed_fragments_carry_steering_controls_only_for_the_users_who_may_use_them():
    """The QA case: a read-only watcher of a running migration was sent Switch over now, Throttle, Set
    allowed downtime, Set bandwidth cap and Cancel (each click a 403); an operator still gets them."""
    fleet = await two_groups()
    migration_id = await database_sync_to_async(lambda: Migration.objects.get(vm=fleet["web"]).pk)()
    sockets = {}
    for who in ("viewer", "operator", "superuser"):
        socket, connected = await connect(f"/ws/vms/{fleet['web'].pk}/", fleet["cookies"][who])
        assert connected
        sockets[who] = socket
    snapshots = {who: await socket.receive_from(timeout=5) for who, socket in sockets.items()}
    await database_sync_to_async(publish)(migration_id)
    pushed = {who: await socket.receive_from(timeout=10) for who, socket in sockets.items()}

    for html in (snapshots["viewer"], pushed["viewer"]):
        assert "42%" in html
        for control in (*STEER_CONTROLS, 'id="migrate-button"'):
            assert control not in html, control
        assert "<!--control:" not in html
    for who in ("operator", "superuser"):
        for html in (snapshots[who], pushed[who]):
            for control in (*STEER_CONTROLS, 'id="migrate-button"'):
                assert control in html, (who, control)
    for socket in sockets.values():
        await socket.disconnect()
