"""Helpers for tests that migrate real guests between real host agents."""

from __future__ import annotations

import itertools
from typing import Any

from agentprotocol import GuestInfo, GuestSpec
from migrations_app.models import Migration
from tests.factories import make_vm
from vms.models import Registration

_names = itertools.count(1)


def place_vm(host_agents, fleet, on: str = "hosta", vm_fields: dict | None = None, **guest: Any):
    """A VM registered On at ``on`` in the database, its guest defined and running on that host's agent."""
    fields = dict(vm_fields or {})
    name = fields.pop("name", None) or f"guest{next(_names)}"
    spec = {"name": name, "memory_mib": 16, "vcpus": 1, "fill_percent": 5, "running": True, **guest}
    vm = make_vm(name, vsp=fleet[on], memory_mib=spec["memory_mib"], **fields)
    host_agents[on].client.define_guest(GuestSpec.model_validate({**spec, "guest_id": str(vm.guest_id)}))
    return vm


def guest_on(agent, name: str) -> GuestInfo | None:
    return next((guest for guest in agent.client.list_guests() if guest.name == name), None)


def runs_on(agent, name: str) -> bool:
    guest = guest_on(agent, name)
    return guest is not None and guest.hardware_status == "on" and not guest.migrating


def wait_for_state(wait_for, migration: Migration, *states: str, timeout: float = 60) -> Migration:
    def reached() -> bool:
        migration.refresh_from_db()
        return migration.state in states

    assert wait_for(reached, timeout=timeout), f"migration stuck in {migration.state}: {migration.alert}"
    return migration


def assert_left_on_source(vm, host_agents, fleet, migration: Migration) -> None:
    """After an abort or cancel: runnable on the source only, running there, no copy on the target."""
    assert vm.current_vsp == fleet["hosta"]
    assert not Registration.objects.filter(vm=vm, vsp=fleet["hostb"]).exclude(hardware_status="not_runnable")
    assert runs_on(host_agents["hosta"], vm.name)
    target_copy = guest_on(host_agents["hostb"], vm.name)
    assert target_copy is None, f"the target still holds a copy: {target_copy}"
    assert migration.events.last().to_state == migration.state
