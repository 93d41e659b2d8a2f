"""What the console tells an agent about a VM, built from the database in one place each.

Every request to an agent is a model of ``agentprotocol``; the parts that describe a VM come from
here, whoever sends them: a migration's target prepares ``guest_spec(vm)`` with ``phase_limits(vm)``
(``migrations_app.agents``), the demo defines ``guest_spec(vm, ...)`` on its host. A field the agents
learn later (a guest's disks in storage pools, its network cards) is added to ``GuestSpec`` and filled
in ``guest_spec``: one change, and every request that carries the guest carries it.
"""

from __future__ import annotations

from typing import Any

from agentprotocol import GuestSpec, PhaseLimits

from .models import VirtualMachine


def guest_spec(vm: VirtualMachine, **extra: Any) -> GuestSpec:
    """``vm`` as an agent defines it: its id (what agents know it by), display name, size, OS type.

    ``extra``: more ``GuestSpec`` fields, or other values of these (the demo's simulated workload,
    ``running``, a QEMU demo guest's memory). Raises ``pydantic.ValidationError`` for a value out of the
    protocol's bounds.
    """
    fields: dict[str, Any] = {
        "guest_id": str(vm.guest_id),
        "name": vm.name,
        "memory_mib": vm.memory_mib,
        "vcpus": vm.vcpus,
    }
    if vm.os_type:
        fields["os_type"] = vm.os_type
    return GuestSpec.model_validate({**fields, **extra})


def phase_limits(vm: VirtualMachine) -> PhaseLimits:
    """The VM's time limit per phase (s; None: no limit), which both agents enforce."""
    return PhaseLimits(
        init_s=vm.init_limit_s,
        copy_s=vm.copy_limit_s,
        quiesce_s=vm.quiesce_limit_s,
        frozen_s=vm.frozen_limit_s,
    )
