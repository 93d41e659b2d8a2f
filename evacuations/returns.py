"""Maintenance that ends well: bringing back the guests an evacuation moved away.

When a host leaves maintenance, the admin is offered the **return plan**: each guest its latest
evacuation moved away goes back to it, reviewed on the same plan page as the evacuation, with the same
forecast (``plan.predict``: the migrate dialog's), the same warnings and confirmations, and the same
checks when it starts. Started, it is an ``Evacuation`` of kind ``return`` on the host (its steps'
migrations come from the hosts the guests are on now, each through that host's own queue), shown and
followed like an evacuation (the VSP page's panel, ``summarize``, ``settle``, the API).

Which guests: the completed steps of the host's latest evacuation whose guest still runs from that
step's target. A guest moved on since, deleted, back already, powered off or otherwise unable to move
(``plan.stay_reason``) stays where it is, with the reason. The host must take guests again (out of
maintenance, enabled, licensed, reachable: ``checks.host_refusal``) and have room for them, counted
step by step; the user needs the migration right on each guest's current host and on this one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction

from migrations_app import estimates
from migrations_app.access import check_can_migrate
from migrations_app.actions import MigrationRefused, do_request_migration
from migrations_app.checks import host_refusal
from migrations_app.models import Migration
from vms.access import visible_vsps
from vms.capacity import free_memory_by_vsp
from vms.models import VSP, AuditEvent, VirtualMachine

from .actions import EvacuationRefused, _actor, _refuse_if_running, publish_after_commit
from .models import Evacuation, EvacuationStep
from .plan import Plan, PlanStep, Staying, stay_reason, time_left_s
from .rights import may_evacuate, require


@dataclass
class ReturnPlan(Plan):
    """A ``Plan`` whose steps all go to ``vsp`` (``PlanStep.target``), each from where its guest runs
    now; ``evacuation``: the evacuation whose guests come back (None: there is none)."""

    evacuation: Evacuation | None = None
    # Where each leaving guest runs now, by VM id, as the user may read it ("a VSP outside your host
    # groups" for a VSP they do not see).
    sources: dict[int, str] = field(default_factory=dict)

    @property
    def known_total_s(self) -> float:
        """When the known steps would all be done: each source's steps run through its own queue,
        ``max_concurrent_migrations`` at a time, the sources side by side (s). Steps forecast not to
        converge are not counted, as in an evacuation."""
        by_source: dict[int, list[float]] = defaultdict(list)
        at_once: dict[int, int] = {}
        for step in self.steps:
            source = step.vm.current_vsp
            if source is None or step.predicted_s is None or step.stops_at_limit:
                continue
            by_source[source.pk].append(step.predicted_s)
            at_once[source.pk] = source.max_concurrent_migrations
        return max((time_left_s(times, at_once[pk]) for pk, times in by_source.items()), default=0.0)


def last_evacuation(vsp: VSP) -> Evacuation | None:
    """``vsp``'s latest evacuation that has ended (the guests to bring back are its moved ones)."""
    return (
        Evacuation.objects.filter(vsp=vsp, kind=Evacuation.Kind.EVACUATION)
        .exclude(state=Evacuation.State.RUNNING)
        .first()
    )


def moved_away(evacuation: Evacuation) -> list[EvacuationStep]:
    """The steps of ``evacuation`` whose migration completed, with their guests and copies loaded."""
    return list(
        evacuation.steps.filter(migration__state=Migration.State.COMPLETED, vm__isnull=False)
        .select_related("vm", "target")
        .prefetch_related("vm__registrations__vsp")
        .order_by("position")
    )


def returnable_count(vsp: VSP) -> int:
    """How many guests moved away by ``vsp``'s last evacuation still run from where it sent them (the
    offer on the VSP page; no forecast, no agent asked)."""
    evacuation = last_evacuation(vsp)
    if evacuation is None:
        return 0
    count = 0
    for step in moved_away(evacuation):
        assert step.vm is not None
        current = step.vm.current_vsp
        count += int(current is not None and current.pk == step.target_id)
    return count


def return_rates(vms: list[VirtualMachine], *, measure: bool = True) -> dict[int, estimates.DirtyRate]:
    """Each guest's dirty rate by VM id, as ``plan.dirty_rates`` has it (cached, else measured now)."""
    rates: dict[int, estimates.DirtyRate] = {}
    for vm in vms:
        rate = estimates.cached_dirty_rate(vm)
        if rate is None and measure:
            rate = estimates.measure_dirty_rate(vm)
        if rate is not None:
            rates[vm.pk] = rate
    return rates


OUTSIDE = "a VSP outside your host groups"


def shown_name(host: VSP | None, seen: set[int] | None) -> str:
    """``host``'s name, unless ``seen`` (the VSP ids the user sees; None: all) leaves it out."""
    if host is None:
        return "nowhere"
    return host.name if seen is None or host.pk in seen else OUTSIDE


def candidates(
    vsp: VSP, seen: set[int] | None = None
) -> tuple[Evacuation | None, list[VirtualMachine], list[Staying]]:
    """The guests that may come back to ``vsp`` and those that stay, each with why (a VSP not in
    ``seen``, the ids of the VSPs the user sees, is not named)."""
    evacuation = last_evacuation(vsp)
    if evacuation is None:
        return None, [], []
    leaving: list[VirtualMachine] = []
    staying: list[Staying] = []
    for step in moved_away(evacuation):
        vm = step.vm
        assert vm is not None
        registration = vm.runnable_registration
        if registration is None or registration.vsp_id != step.target_id:
            where = shown_name(registration.vsp if registration is not None else None, seen)
            if registration is not None and registration.vsp_id == vsp.pk:
                staying.append(Staying(vm.name, f"back on {vsp.name} already"))
            else:
                staying.append(Staying(vm.name, f"moved on since the evacuation: runnable {where}"))
            continue
        reason = stay_reason(registration, registration.vsp)
        if reason:
            staying.append(Staying(vm.name, reason))
        else:
            leaving.append(vm)
    return evacuation, leaving, staying


def build_return_plan(
    vsp: VSP,
    *,
    rates: dict[int, estimates.DirtyRate] | None = None,
    excluded: Collection[int] = (),
    confirmed: Collection[int] = (),
    user: Any = None,
) -> ReturnPlan:
    """The return plan of ``vsp`` (see the module's docstring); the largest guests are placed first,
    the order is by forecast, the largest time last, as an evacuation's.

    ``rates``: dirty rates by VM id (``return_rates``; None: cached ones only). ``excluded``: VM ids
    that stay where they are. ``confirmed``: VM ids started although their forecast warns. ``user``:
    whose migration rights are checked (None: nobody's). What keeps it from starting is in ``problems``.
    """
    seen = None if user is None else set(visible_vsps(user).values_list("pk", flat=True))
    evacuation, leaving, staying = candidates(vsp, seen)
    rates = rates if rates is not None else return_rates(leaving, measure=False)
    problems: list[str] = []
    refusals = {host_refusal(vm.current_vsp, vsp) for vm in leaving} - {None}
    if refusals:
        problems.append(f"{vsp.name} cannot take guests now: {', '.join(sorted(r for r in refusals if r))}.")
    for source in {vm.current_vsp for vm in leaving} - {None}:  # as the dialog: an unknown link is probed
        assert source is not None
        estimates.known_link_rate(source, vsp)
    free = free_memory_by_vsp([vsp.pk]).get(vsp.pk, 0)
    steps: list[PlanStep] = []
    for vm in sorted(leaving, key=lambda vm: (-vm.memory_mib, vm.name)):
        if vm.pk in excluded:
            where = shown_name(vm.current_vsp, seen)
            staying.append(Staying(vm.name, f"excluded by the admin: it stays on {where}", vm.pk))
            continue
        if vm.memory_mib > free:
            staying.append(
                Staying(vm.name, f"no room on {vsp.name}: needs {vm.memory_mib} MiB, {max(free, 0)} MiB left")
            )
            continue
        free -= vm.memory_mib
        problem = _permission_problem(user, vm, vsp, seen)
        if problem:
            problems.append(problem)
        steps.append(PlanStep.of(vm, vsp, rates.get(vm.pk), problem, vm.pk in confirmed))
    steps.sort(key=lambda s: (s.predicted_s is None, s.predicted_s or 0.0, s.vm.memory_mib, s.vm.name))
    problems.extend(step.unconfirmed_warning for step in steps if step.unconfirmed_warning)
    staying.sort(key=lambda stay: stay.vm_name)
    total_free = free_memory_by_vsp([vsp.pk]).get(vsp.pk, 0)
    plan = ReturnPlan(vsp, steps, staying, [(vsp, "", total_free)], {vsp.pk: free}, problems)
    plan.evacuation = evacuation
    plan.sources = {step.vm.pk: shown_name(step.vm.current_vsp, seen) for step in steps}
    return plan


def _permission_problem(user: Any, vm: VirtualMachine, vsp: VSP, seen: set[int] | None) -> str:
    if user is None:
        return ""
    try:
        check_can_migrate(user, vm, vsp)
    except PermissionDenied as denied:
        source = vm.current_vsp
        if source is not None and seen is not None and source.pk not in seen:
            return f"You may not bring {vm.name} back: it runs on {OUTSIDE}."
        return str(denied)
    return ""


def do_start_return(
    vsp: VSP, user: Any, *, excluded: Collection[int] = (), confirmed: Collection[int] = ()
) -> Evacuation:
    """Start bringing the guests back to ``vsp``, the plan checked again now (rates measured first).

    Raises ``PermissionDenied`` without the right (``may_evacuate`` on ``vsp``), ``EvacuationRefused``
    (nothing changed) when an evacuation or return of ``vsp`` runs, the plan has a problem, or there
    is no guest to bring back.
    """
    require(may_evacuate(user, vsp))
    _, leaving, _ = candidates(vsp)
    rates = return_rates(leaving)
    try:
        with transaction.atomic():
            vsp = VSP.objects.select_for_update().get(pk=vsp.pk)
            _refuse_if_running(vsp)
            plan = build_return_plan(vsp, rates=rates, excluded=excluded, confirmed=confirmed, user=user)
            if plan.problems:
                raise EvacuationRefused(f"The return cannot start: {' '.join(plan.problems)}")
            if not plan.steps:
                raise EvacuationRefused(f"No guest to bring back to {vsp.name}.")
            evacuation = Evacuation.objects.create(
                vsp=vsp,
                kind=Evacuation.Kind.RETURN,
                requested_by=_actor(user),
                requested_by_name=user.get_username(),
                staying=[{"vm": stay.vm_name, "reason": stay.reason} for stay in plan.staying],
            )
            sources = {}
            for position, step in enumerate(plan.steps, start=1):
                sources[step.vm.name] = str(step.vm.current_vsp)
                try:
                    migration = do_request_migration(step.vm, vsp, user)
                except MigrationRefused as refusal:
                    raise EvacuationRefused(f"The return no longer fits: {refusal.message}") from None
                EvacuationStep.objects.create(
                    evacuation=evacuation,
                    position=position,
                    vm=step.vm,
                    vm_name=step.vm.name,
                    target=vsp,
                    predicted_s=step.predicted_s,
                    migration=migration,
                )
            AuditEvent.record(
                AuditEvent.Action.EVACUATION_STARTED,
                vsp,
                actor=user,
                after={
                    "kind": "return",
                    "steps": [f"{name} {source} -> {vsp.name}" for name, source in sources.items()],
                    "confirmed": [f"{step.vm.name}: {step.verdict}" for step in plan.steps if step.warns],
                    "staying": [f"{stay.vm_name}: {stay.reason}" for stay in plan.staying],
                },
                message=f"Return of {len(plan.steps)} guests to {vsp.name} started by {user}",
            )
            publish_after_commit(vsp.pk)
    except IntegrityError:
        raise EvacuationRefused(
            f"Guests are already moving to or from {vsp.name} in an evacuation."
        ) from None
    return evacuation
