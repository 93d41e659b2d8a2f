"""What the VM Properties General tab shows, as one context dict used by the page, htmx and pushes.

Template (``vms/vm_general.html``): partial ``general`` is the whole tab (root ``<div id="general-tab">``),
for Refresh Data and forms. Other apps add to the tab through its slots (``vms.hooks.SLOTS``, e.g.
``vm_general.phases``) and add what their templates need to the context with
``register_context_provider`` (``vms`` must not import them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from vms.devices import device_summary, places_seen
from vms.models import VSP, Registration, VirtualMachine
from vms.status import OnlineMigrationStatus, online_migration_status

# ``provider(vm, visible_vsp_ids)``: ``visible_vsp_ids`` the VSPs the viewer sees (``None``: all); what a
# provider adds about another VSP (e.g. a migration's other end) must not name one outside them.
ContextProvider = Callable[[VirtualMachine, Collection[int] | None], dict[str, Any]]
_context_providers: list[ContextProvider] = []


def register_context_provider(provider: ContextProvider) -> None:
    """Add ``provider(vm, visible_vsp_ids) -> dict`` whose keys join the tab's context (the same ``vm``
    for the page, htmx answers and Refresh Data)."""
    if provider not in _context_providers:
        _context_providers.append(provider)


@dataclass(frozen=True)
class RegistrationRow:
    registration: Registration
    vsp: VSP
    online_migration: OnlineMigrationStatus


def general_tab_context(
    vm: VirtualMachine,
    vsp_id: int | None = None,
    visible_vsp_ids: Collection[int] | None = None,
    role_vsp_ids: Collection[int] | None = None,
) -> dict[str, Any]:
    """Context for ``vm`` as registered on VSP ``vsp_id`` (default: where it is runnable).

    ``role_vsp_ids``: the VSPs of the viewer's host groups (``None``: all), handed to the context
    providers, which name no other.

    ``visible_vsp_ids``: the VSPs the viewer may see (``None``: all); copies elsewhere are left out, and
    the default is then the first copy seen when the runnable one is on a VSP the viewer does not see.
    ``vm.registrations`` should be prefetched with their VSPs. Raises ``Registration.DoesNotExist`` when
    ``vsp_id`` names a VSP where the VM has no configuration (or none the viewer sees).
    """
    registrations = [
        registration
        for registration in vm.registrations.all()
        if visible_vsp_ids is None or registration.vsp_id in visible_vsp_ids
    ]
    shown = shown_registration(vm, registrations, vsp_id)
    vsp = shown.vsp if shown else None
    rows = [
        RegistrationRow(r, r.vsp, online_migration_status(vm, r.vsp)) for r in registrations if r != shown
    ]
    context: dict[str, Any] = {
        "vm": vm,
        "registration": shown,
        "vsp": vsp,
        "online_migration": online_migration_status(vm, vsp),
        "other_registrations": rows,
        # the summary's disks (count, total size) and networks (not named from another group's VSP)
        "devices": device_summary(vm, places_seen(vm, visible_vsp_ids)),
    }
    for provider in _context_providers:
        context.update(provider(vm, role_vsp_ids))
    return context


def shown_registration(
    vm: VirtualMachine, registrations: list[Registration], vsp_id: int | None
) -> Registration | None:
    if vsp_id is not None:
        for registration in registrations:
            if registration.vsp_id == vsp_id:
                return registration
        raise Registration.DoesNotExist(f"{vm.name} has no configuration on VSP #{vsp_id}.")
    runnable = vm.runnable_registration
    if runnable is not None and runnable in registrations:
        return runnable
    return registrations[0] if registrations else None
