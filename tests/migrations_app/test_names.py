"""VMs whose names are any printable text migrate: agents know guests by ``guest_id``, not by name.

Before, the agent refused every name outside ``[A-Za-z0-9._-]``, so such a VM showed Ready in the
migrate dialog and then failed in Init. End to end: a real Celery worker, real Redis, real agents.
"""

from __future__ import annotations

import pytest

from migrations_app.actions import do_request_migration
from tests.migrations_app.guests import place_vm, runs_on, wait_for_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("name", ["name with spaces", "测试", "rocket 🚀"])
def test_it_migrates_a_vm_whatever_its_name(host_agents, fleet, admin, migration_worker, wait_for, name):
    vm = place_vm(host_agents, fleet, vm_fields={"name": name})

    migration = do_request_migration(vm, fleet["hostb"], admin)
    wait_for_state(wait_for, migration, "completed", "aborted", "cancelled")

    assert migration.state == "completed", migration.alert
    assert vm.current_vsp == fleet["hostb"]
    assert runs_on(host_agents["hostb"], name)
    assert host_agents["hostb"].client.get_guest(str(vm.guest_id)).name == name
    assert not runs_on(host_agents["hosta"], name)
