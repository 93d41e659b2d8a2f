"""Issue 18.4: a guest that vanished from its host is shown as lost, never Up/On, and can be started again.

Real host agents (simulated driver) over real sockets: the agent is killed with SIGKILL and started again
on its port (``Agents.restart_empty``), which is what a simulated host's restart is: its guests die with
its agent. Seen by the testers: the VMs stayed Up/On in the lists, the General tab and the API; Start
answered "already running"; Refresh Data said "Host vsp1 does not know this VM" but still showed Up/On.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from django.test import Client
from django.urls import reverse

from api.tokens import do_create_token
from tests.api.conftest import WRITER, ApiClient
from tests.factories import make_user, make_vm
from tests.hostagent.conftest import AgentFactory
from tests.migrations_app.conftest import vsps_for
from tests.migrations_app.guests import place_vm, runs_on
from tests.migrations_app.test_soak_findings import Agents
from vms.inventory import collect_all_inventory
from vms.models import AuditEvent, Registration, VirtualMachine
from vms.power import PowerAction, PowerRefused, do_power

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def agents(tmp_path) -> Iterator[Agents]:
    factory = AgentFactory(tmp_path)
    yield Agents(factory)
    factory.stop_all()


@pytest.fixture
def vsps(agents):
    return vsps_for(agents)


def field(html: str, name: str) -> str | None:
    found = re.search(rf'data-field="{name}" data-value="([^"]*)"', html)
    return found.group(1) if found else None


def text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_a_guest_gone_with_its_agent_is_shown_lost_everywhere_and_started_again(agents, vsps):
    vm = place_vm(agents, vsps, on="hosta")
    bystander = place_vm(agents, vsps, on="hostb")
    collect_all_inventory()
    assert Registration.objects.get(vm=vm).hardware_status == "on"

    agents.restart_empty("hosta")
    collect_all_inventory()

    copy = Registration.objects.get(vm=vm)
    assert copy.hardware_status == "lost" and copy.lost_since is not None
    assert copy.os_status == "lost"
    assert Registration.objects.get(vm=bystander).hardware_status == "on"  # its host still reports it

    user = make_user("alice", permissions=WRITER)
    client = Client()
    client.force_login(user)
    general = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert (field(general, "hardware_status"), field(general, "os_status")) == ("lost", "lost")
    assert "Lost: hosta no longer reports" in text(general)
    assert f"since {copy.lost_since:%Y-%m-%d %H:%M:%S}" in text(general)
    listed = client.get(reverse("vms:vm_list")).content.decode()
    row = re.search(rf"<tr[^>]*>(?:(?!</tr>).)*{vm.name}(?:(?!</tr>).)*</tr>", listed, re.S)
    assert row and 'data-value="lost"' in row.group(0) and 'data-value="up"' not in row.group(0)
    assert "Lost: hosta no longer reports" in text(client.get(reverse("vms:vsp_list")).content.decode())

    api = ApiClient(do_create_token(user, "tests")[1])
    shown = api.get(f"/vms/{vm.pk}").json()
    assert shown["hardware_status"]["value"] == "lost" and shown["os_status"]["value"] == "lost"
    assert shown["lost_since"] is not None

    # Refresh Data asks the agent again: still lost, said so, never Up/On.
    refreshed = client.get(reverse("vms:vm_refresh", args=[vm.pk]), headers={"HX-Request": "true"})
    body = refreshed.content.decode()
    assert (field(body, "hardware_status"), field(body, "os_status")) == ("lost", "lost")
    assert "does not know this VM" not in body

    # Stop has nothing to stop; Start defines the guest again from the console's record and starts it.
    with pytest.raises(PowerRefused, match="is lost: its host no longer reports it"):
        do_power(copy, PowerAction.STOP, user)
    done = do_power(Registration.objects.select_related("vm", "vsp").get(pk=copy.pk), PowerAction.START, user)
    assert "defined again from the console's record and started" in done.notice
    assert runs_on(agents["hosta"], vm.name)
    copy.refresh_from_db()
    assert (copy.hardware_status, copy.lost_since) == ("on", None)
    assert AuditEvent.objects.filter(action="vm_started", object_name__contains=vm.name).exists()
    collect_all_inventory()
    assert Registration.objects.get(vm=vm).hardware_status == "on"
    assert VirtualMachine.objects.get(pk=vm.pk).os_status == "up"


def test_a_lost_guest_reported_again_is_no_longer_lost(agents, vsps):
    vm = place_vm(agents, vsps, on="hostb")
    agents.restart_empty("hostb")
    collect_all_inventory()
    assert Registration.objects.get(vm=vm).hardware_status == "lost"

    # Someone defined it again on its host behind the console's back (or the host brought it back).
    from agentprotocol import GuestSpec

    agents["hostb"].client.define_guest(
        GuestSpec(guest_id=str(vm.guest_id), name=vm.name, memory_mib=16, running=True)
    )
    collect_all_inventory()

    copy = Registration.objects.get(vm=vm)
    assert (copy.hardware_status, copy.lost_since, copy.os_status) == ("on", None, "up")


def test_os_up_is_never_shown_with_hardware_off(vsps):
    vm = make_vm("stale", vsp=vsps["hosta"], hardware_status="off", os_status="up")
    client = Client()
    client.force_login(make_user("olga", permissions=("vms.view_virtualmachine", "vms.view_vsp")))
    general = client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode()
    assert (field(general, "hardware_status"), field(general, "os_status")) == ("off", "down")


def test_an_abort_that_said_the_guest_keeps_running_on_its_source_is_restated_once_it_is_lost(agents, vsps):
    """QA: a migration aborted while its source answered "running" (the alert said "The VM keeps running
    on vsp1."); the demo agent then restarted without its guests and the VM was shown Lost, but the
    report, the Alerts and the API still said it keeps running there."""
    from migrations_app.alerts import abort_alert
    from migrations_app.errors import MigrationFailed
    from migrations_app.models import Migration, MigrationEvent
    from tests.factories import make_migration

    vm = place_vm(agents, vsps, on="hosta")
    migration = make_migration(vm, vsps["hosta"], vsps["hostb"], state="aborted", failed_phase="copy")
    failure = MigrationFailed(Migration.State.COPY, "the target host hostb refused: out of memory")
    Migration.objects.filter(pk=migration.pk).update(alert=abort_alert(migration, failure, "running"))
    user = make_user("alice", permissions=(*WRITER, "migrations_app.view_migration"))
    client = Client()
    client.force_login(user)
    report_url = reverse("migration_history:report", args=[migration.pk])
    assert "The VM keeps running on hosta." in text(client.get(report_url).content.decode())
    collect_all_inventory()  # still reported: nothing to restate
    assert Migration.objects.get(pk=migration.pk).alert.endswith("The VM keeps running on hosta.")

    agents.restart_empty("hosta")
    collect_all_inventory()

    copy = Registration.objects.get(vm=vm, vsp=vsps["hosta"])
    assert copy.hardware_status == "lost"
    migration.refresh_from_db()
    until = f"{copy.lost_since:%H:%M:%S} UTC"
    assert migration.alert == (
        "Copy phase failed: the target host hostb refused: out of memory. The VM kept running on hosta after "
        f"the abort until {until}, when hosta no longer reported it (its host agent restarted without it, "
        "or it was removed): it is not running there now."
    )
    report = text(client.get(report_url).content.decode())
    general = text(client.get(reverse("vms:vm_general", args=[vm.pk])).content.decode())
    api = ApiClient(do_create_token(user, "tests")[1])
    shown = api.get(f"/vms/{vm.pk}").json()["alert"]["alert"]
    for words in (report, general, shown):
        assert "The VM keeps running" not in words
        assert f"The VM kept running on hosta after the abort until {until}" in words
    assert MigrationEvent.objects.filter(
        migration=migration,
        message=f"hosta no longer reports the VM (since {until}): it is not running there.",
    ).exists()
