"""What the console tells an agent about a VM, built from the database in one place each.

Every request to an agent is a model of ``agentprotocol``; the parts that describe a VM come from
here, whoever sends them: a migration's target prepares ``guest_spec(vm)`` with ``phase_limits(vm)``
(``migrations_app.agents``), the demo defines ``guest_spec(vm, ...)`` on its host. A field the agents
learn later (a guest's disks in storage pools, its network cards) is added to ``GuestSpec`` and filled
in ``guest_spec``: one change, and every request that carries the guest carries it.
"""

from __future__ import annotations

from typing import Any

from agentprotocol import DiskSpec, GuestSpec, NicSpec, PhaseLimits

from .models import VirtualMachine


def guest_spec(vm: VirtualMachine, **extra: Any) -> GuestSpec:
    """``vm`` as an agent defines it: its id (what agents know it by), display name, size, OS type.

    Its disks (with their pools' identity, so a migration's target finds the same shared storage
    whatever its name there) and network cards, as the console knows them, when it has any.
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
    if disks := disk_specs(vm):
        fields["disks"] = disks
    if nics := nic_specs(vm):
        fields["nics"] = nics
    return GuestSpec.model_validate({**fields, **extra})


def phase_limits(vm: VirtualMachine) -> PhaseLimits:
    """The VM's time limit per phase (s; None: no limit), which both agents enforce."""
    return PhaseLimits(
        init_s=vm.init_limit_s,
        copy_s=vm.copy_limit_s,
        quiesce_s=vm.quiesce_limit_s,
        frozen_s=vm.frozen_limit_s,
    )


def disk_specs(vm: VirtualMachine) -> list[DiskSpec]:
    """``vm``'s disks as the protocol carries them (existing volumes: ``create`` False)."""
    return [
        DiskSpec(
            device=disk.device,
            pool=disk.pool,
            volume=disk.volume,
            virtual_size_bytes=max(disk.virtual_size_bytes, 1),
            format=disk.format,  # type: ignore[arg-type]
            bus=disk.bus,  # type: ignore[arg-type]
            read_only=disk.read_only,
            shareable=disk.shareable,
            pool_identity=disk.pool_identity or None,
            boot=disk.boot,
        )
        for disk in vm.disks.order_by("device")
    ]


def nic_specs(vm: VirtualMachine) -> list[NicSpec]:
    """``vm``'s network cards in order (nic 0 first)."""
    return [
        NicSpec(network=nic.network, mac=nic.mac, model=nic.model)  # type: ignore[arg-type]
        for nic in vm.nics.order_by("index")
    ]
