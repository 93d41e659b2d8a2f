"""Evacuate a host: the plan the admin reviews, starting it, following it, cancelling it, maintenance.

**The plan** (``build_plan``): every guest registered on the VSP either leaves (a step: a target and a
forecast) or stays (a reason: vPar, powered off, online migration disabled, Not Runnable copy, no target
with room...). Targets are chosen greedily, the largest guest first: each goes to the eligible VSP with
the most memory still free once the earlier steps of the same plan are counted, so the load spreads and
no target is ever overcommitted (free memory as ``vms.capacity`` counts it, in-flight reservations
included). Between VSPs with equal room the one with the shorter forecast wins. The default order puts
the largest expected time last; the admin may change any target or the order, and the plan is checked
again (``problems``) before it may start.

**The forecast** per guest is the migrate dialog's, by the same function with the same inputs
(``estimates.forecast_to``): the VM's own policy, its own dirty rate (measured by its agent or cached
by the dialog, ``dirty_rates``), the pair's link rate (its newest migrations weighted most, else its link
probe, else the policy's cap) and the pair's fitted dirty rounds. A guest whose dirty rate cannot be
measured, or a pair with no known link rate, has no forecast ("not known yet"). A step forecast to
*may not* / *will not converge* keeps the plan from starting until the admin changes the VM's policy,
excludes the VM (it stays) or confirms that step.

**Running** (``do_start_evacuation``): in one transaction the VSP enters maintenance and each step is
requested through ``actions.do_request_migration``, in plan order, so the guests go through the
source's own queue (``scheduling``): one at a time, or ``VSP.max_concurrent_migrations`` at once; a
plan that no longer fits is refused with the reason and nothing changes. A failed or cancelled guest
stays runnable on the source and the queue goes on.
``settle`` ends the evacuation once every step's migration has ended (called by the worker after each
migration, by cancel and by the pages). Leaving maintenance is the admin's explicit action.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from vms.access import (
    ADD_MIGRATION_PERMISSION,
    CHANGE_MIGRATION_PERMISSION,
    LACKS_PERMISSION,
    can_view_vsp,
    may_act_on_vsp,
    migration_targets,
    visible_vsps,
)
from vms.capacity import free_memory_by_vsp
from vms.models import VSP, AuditEvent, Registration, VirtualMachine

from . import estimates, forecast, refusals
from .actions import MigrationRefused, do_cancel_migration, do_request_migration
from .checks import check_vm, host_refusal
from .evacuation_models import Evacuation, EvacuationStep
from .models import Migration
from .progress import publish_vsp_overview

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


class EvacuationRefused(ValidationError):
    """Starting, cancelling or leaving maintenance was refused; ``message`` says why in plain words."""


# -- rights: one function per right, so per-host-group permissions can replace the global checks ------
def may_view_evacuation(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may see ``vsp``'s evacuation plan and progress: they see ``vsp``
    (``vms.access.can_view_vsp``: ``vms.view_vsp`` and a role in its host group)."""
    return can_view_vsp(user, vsp.pk)


def may_evacuate(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may start an evacuation of ``vsp`` (it requests migrations): ``add_migration``
    and operator of ``vsp``'s host group (the plan then offers only targets where they are operator)."""
    return may_act_on_vsp(user, ADD_MIGRATION_PERMISSION, vsp.pk)


def may_cancel_evacuation(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may cancel ``vsp``'s running evacuation (it cancels migrations):
    ``change_migration`` and operator of ``vsp``'s host group."""
    return may_act_on_vsp(user, CHANGE_MIGRATION_PERMISSION, vsp.pk)


def may_leave_maintenance(user: Any, vsp: VSP) -> bool:
    """Whether ``user`` may take ``vsp`` out of maintenance: ``add_migration`` and operator of its group."""
    return may_act_on_vsp(user, ADD_MIGRATION_PERMISSION, vsp.pk)


def _require(allowed: bool) -> None:
    if not allowed:
        raise PermissionDenied(LACKS_PERMISSION)


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass
class PlanStep:
    """A guest that leaves: ``target`` (None: none chosen), ``predicted_s`` (None: not known yet),
    ``problem`` (why the admin's choice cannot be, "" when it can), ``verdict``: the forecast's
    (``forecast.Verdict``; None: not known yet), ``reasons``: the forecast's explanation in words (the
    migrate dialog's lines), ``confirmed``: the admin starts it although its forecast warns."""

    vm: VirtualMachine
    target: VSP | None
    predicted_s: float | None
    problem: str = ""
    verdict: forecast.Verdict | None = None
    reasons: list[str] = field(default_factory=list)
    confirmed: bool = False

    @classmethod
    def of(
        cls,
        vm: VirtualMachine,
        target: VSP | None,
        rate: estimates.DirtyRate | None,
        problem: str = "",
        confirmed: bool = False,
    ) -> PlanStep:
        """The step moving ``vm`` to ``target`` with its measured dirty ``rate``, forecast by ``predict``."""
        result = predict(vm, target, rate) if target is not None else None
        if result is None:
            return cls(vm, target, None, problem, confirmed=confirmed)
        return cls(vm, target, result.total_s, problem, result.verdict, result.lines, confirmed)

    @property
    def warns(self) -> bool:
        """Its forecast says it will, or may, not converge (``forecast.Verdict.warns``)."""
        return self.verdict is not None and self.verdict.warns

    @property
    def unconfirmed_warning(self) -> str:
        """Why it may not start as it is ("" when it may): a warning forecast the admin did not confirm."""
        if not self.warns or self.confirmed:
            return ""
        assert self.verdict is not None
        return (
            f"{self.vm.name} {self.verdict.label}: change its migration policy, exclude it from the "
            "evacuation, or confirm that it starts anyway."
        )


@dataclass(frozen=True)
class Staying:
    """A guest that stays, with why; ``vm_id`` when the admin excluded it (so the page may undo that)."""

    vm_name: str
    reason: str
    vm_id: int | None = None


EXCLUDED_REASON = "excluded from this evacuation by the admin"


@dataclass
class Plan:
    """``steps`` in the order they run; ``staying`` with their reasons; ``targets``: every other VSP with
    its refusal ("" when eligible) and free memory (MiB) before the plan; ``planned_free``: after it.
    ``problems``: what keeps it from starting (a choice that cannot be, a warning not confirmed)."""

    vsp: VSP
    steps: list[PlanStep]
    staying: list[Staying]
    targets: list[tuple[VSP, str, int]] = field(default_factory=list)
    planned_free: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.steps)

    @property
    def known_total_s(self) -> float:
        """When the steps with a forecast would all be done, ``max_concurrent_migrations`` at a time (s)."""
        known = [step.predicted_s for step in self.steps if step.predicted_s is not None]
        return time_left_s(known, self.vsp.max_concurrent_migrations)

    @property
    def unknown_count(self) -> int:
        return sum(1 for step in self.steps if step.predicted_s is None)


def dirty_rates(vsp: VSP, *, measure: bool = True) -> dict[int, estimates.DirtyRate]:
    """Per VM id: the dirty rate of each running guest on ``vsp``, as the migrate dialog has it.

    The cached measurement (``estimates.cached_dirty_rate``) when fresh, else (``measure``) a new one
    from the source agent (``estimates.measure_dirty_rate``, about 0.5 s a guest, then cached); a guest
    it cannot measure is left out (its time is then "not known yet", never another guest's rate).
    """
    rates: dict[int, estimates.DirtyRate] = {}
    registrations = Registration.objects.filter(
        vsp=vsp, hardware_status=Registration.HardwareStatus.ON
    ).select_related("vm")
    for registration in registrations:
        vm = registration.vm
        if not registration.is_runnable or vm.is_vpar or not vm.online_migration_enabled:
            continue
        rate = estimates.cached_dirty_rate(vm)
        if rate is None and measure:
            rate = estimates.measure_dirty_rate(vm)
        if rate is not None:
            rates[vm.pk] = rate
    return rates


def predict_s(vm: VirtualMachine, target: VSP, rate: estimates.DirtyRate | None) -> float | None:
    """The forecast total time (s) of migrating ``vm`` to ``target``; None: not known yet (``predict``)."""
    result = predict(vm, target, rate)
    return None if result is None else result.total_s


def predict(
    vm: VirtualMachine, target: VSP, rate: estimates.DirtyRate | None
) -> estimates.TargetForecast | None:
    """The migrate dialog's forecast of moving ``vm`` to ``target``; None: not known yet.

    The very function the dialog calls (``estimates.forecast_to``) with the same inputs: the VM's own
    policy, its measured dirty ``rate`` (``dirty_rates``), the pair's link rate (newest migrations
    weighted most, else its link probe, else the policy's cap as a best case) and the pair's fitted
    dirty rounds. Without the guest's own dirty rate there is no forecast: the mean of other guests'
    rates over the pair is not this guest's (QA: the idle db01 was planned at 48 s and took 3 s).
    """
    if rate is None:
        return None
    result = estimates.forecast_to(vm, target, vm.migration_policy, rate)
    return None if result.verdict is None else result


def stay_reason(registration: Registration, vsp: VSP) -> str | None:
    """Why the guest of this copy on ``vsp`` cannot leave by online migration, or None if it can."""
    vm = registration.vm
    if not registration.is_runnable:
        why = f": {registration.not_runnable_reason}" if registration.not_runnable_reason else ""
        return f"Not Runnable copy here{why}; nothing runs to move"
    if vm.is_vpar:
        return "vPars do not migrate"
    if registration.hardware_status != Registration.HardwareStatus.ON:
        return "powered off: online migration moves running guests only"
    if not vm.online_migration_enabled:
        return "online migration is disabled for this VM"
    return check_vm(vm, vsp)


def build_plan(
    vsp: VSP,
    chosen_targets: Mapping[int, int] | None = None,
    order: Sequence[int] | None = None,
    *,
    rates: Mapping[int, estimates.DirtyRate] | None = None,
    excluded: Collection[int] = (),
    confirmed: Collection[int] = (),
    user: Any = None,
) -> Plan:
    """The evacuation plan of ``vsp``.

    ``user``: targets are the VSPs where they are an operator when they may start this evacuation
    (``vms.access.migration_targets``), else the VSPs they see (``visible_vsps``: a viewer reads what the
    plan would do among them); another group's VSP is neither offered nor named. ``None``: every VSP.

    ``chosen_targets``: the admin's target VSP id per VM id (others are chosen here). ``order``: VM ids in
    the order the admin wants (every leaving VM once); None orders by forecast, the largest time last and
    unknown times after the known ones, larger guests later. A choice that cannot be (unknown VSP, not
    eligible, no room) is kept on its step with a ``problem`` and listed in ``plan.problems``.
    ``rates``: each guest's measured dirty rate by VM id (``dirty_rates``; None: the cached ones only).
    ``excluded``: VM ids the admin keeps on ``vsp`` (they stay, with ``EXCLUDED_REASON``).
    ``confirmed``: VM ids the admin starts although their forecast may or will not converge; any other
    such step is listed in ``plan.problems`` (``PlanStep.unconfirmed_warning``), so it is never started
    silently.
    """
    chosen_targets = {vm: vsp_id for vm, vsp_id in (chosen_targets or {}).items() if vm not in excluded}
    if order is not None:
        order = [vm_id for vm_id in order if vm_id not in excluded]
    if rates is None:
        rates = dirty_rates(vsp, measure=False)
    registrations = (
        Registration.objects.filter(vsp=vsp)
        .select_related("vm")
        .prefetch_related("vm__registrations__vsp")
        .order_by("vm__name")
    )
    if user is None:
        candidates = VSP.objects.all()
    else:
        candidates = migration_targets(user) if may_evacuate(user, vsp) else visible_vsps(user)
    others = list(candidates.exclude(pk=vsp.pk).order_by("name"))
    free = free_memory_by_vsp([other.pk for other in others])
    targets = [(other, host_refusal(vsp, other) or "", free.get(other.pk, 0)) for other in others]
    eligible = {other.pk: other for other, refusal, _ in targets if not refusal}
    by_id = {other.pk: (other, refusal) for other, refusal, _ in targets}
    planned_free = {other.pk: free.get(other.pk, 0) for other in others}
    for eligible_vsp in eligible.values():  # as the dialog: a pair with no known link rate gets a probe
        estimates.known_link_rate(vsp, eligible_vsp)

    leaving: list[VirtualMachine] = []
    staying: list[Staying] = []
    for registration in registrations:
        reason = stay_reason(registration, vsp)
        if not reason and registration.vm_id in excluded:
            reason = EXCLUDED_REASON
        if reason:
            chosen_to_stay = registration.vm_id if reason == EXCLUDED_REASON else None
            staying.append(Staying(registration.vm.name, reason, chosen_to_stay))
        else:
            leaving.append(registration.vm)

    steps: list[PlanStep] = []
    problems: list[str] = []
    # The admin's choices first (they take their room), then the rest, the largest guest first.
    chosen = [vm for vm in leaving if vm.pk in chosen_targets]
    free_choice = sorted((vm for vm in leaving if vm.pk not in chosen_targets), key=lambda vm: -vm.memory_mib)
    for vm in chosen:
        target_id = chosen_targets[vm.pk]
        target, refusal = by_id.get(target_id, (None, ""))
        problem = ""
        if target_id == vsp.pk:
            problem = (
                f"{vm.name} cannot go to {vsp.name}: it is the host being evacuated; choose another target"
            )
        elif target is None:
            problem = f"{vm.name} cannot go to VSP {target_id}: there is no such VSP; choose another target"
        elif refusal:
            problem = f"{vm.name} cannot go to {target.name}: {refusal}"
        elif planned_free[target_id] < vm.memory_mib:
            problem = (
                f"{vm.name} cannot go to {target.name}: not enough free memory once the earlier steps "
                f"are counted (needs {vm.memory_mib} MiB, {planned_free[target_id]} MiB free)"
            )
        else:
            planned_free[target_id] -= vm.memory_mib
        if problem:
            problems.append(problem)
        steps.append(PlanStep.of(vm, target, rates.get(vm.pk), problem, vm.pk in confirmed))
    for vm in free_choice:
        roomy = [pk for pk in eligible if planned_free[pk] >= vm.memory_mib]
        if not roomy:
            staying.append(Staying(vm.name, no_room_reason(vm, planned_free, eligible)))
            continue

        def preference(pk: int, vm: VirtualMachine = vm) -> tuple[int, float, str]:
            predicted = predict_s(vm, eligible[pk], rates.get(vm.pk))
            return (
                -planned_free[pk],
                predicted if predicted is not None else float("inf"),
                eligible[pk].name,
            )

        best = min(roomy, key=preference)
        planned_free[best] -= vm.memory_mib
        steps.append(PlanStep.of(vm, eligible[best], rates.get(vm.pk), confirmed=vm.pk in confirmed))

    steps = _ordered(steps, order, problems)
    problems.extend(step.unconfirmed_warning for step in steps if step.unconfirmed_warning)
    staying.sort(key=lambda stay: stay.vm_name)
    return Plan(vsp, steps, staying, targets, planned_free, problems)


def no_room_reason(vm: VirtualMachine, planned_free: dict[int, int], eligible: dict[int, VSP]) -> str:
    if not eligible:
        return "no other VSP can take guests (each is disabled, unlicensed, unreachable or in maintenance)"
    most = max(eligible, key=lambda pk: planned_free[pk])
    return (
        f"no target with room: needs {vm.memory_mib} MiB, the most left is {max(planned_free[most], 0)} MiB "
        f"on {eligible[most].name} once the earlier steps are counted"
    )


def _ordered(steps: list[PlanStep], order: Sequence[int] | None, problems: list[str]) -> list[PlanStep]:
    if order is None:
        return sorted(
            steps,
            key=lambda step: (
                step.predicted_s is None,
                step.predicted_s or 0.0,
                step.vm.memory_mib,
                step.vm.name,
            ),
        )
    position = {vm_id: index for index, vm_id in enumerate(order)}
    if sorted(position) != sorted(step.vm.pk for step in steps) or len(position) != len(order):
        problems.append("The order must list every leaving guest once.")
        return steps
    return sorted(steps, key=lambda step: position[step.vm.pk])


# -- starting, following, cancelling --------------------------------------------------------------------
def do_start_evacuation(
    vsp: VSP,
    chosen_targets: Mapping[int, int],
    order: Sequence[int] | None,
    user: Any,
    *,
    excluded: Collection[int] = (),
    confirmed: Collection[int] = (),
) -> Evacuation:
    """Start evacuating ``vsp`` with the admin's targets and order, re-checked now.

    ``excluded`` and ``confirmed``: VM ids, as ``build_plan`` takes them. The guests' dirty rates are
    measured first (``dirty_rates``, outside the transaction), so each step's forecast, stored as its
    ``predicted_s`` and counted down by ``summarize``, is the plan page's and the migrate dialog's.

    Raises ``PermissionDenied`` without the right, ``EvacuationRefused`` (nothing changed) when an
    evacuation of ``vsp`` runs, the guests changed since the plan was shown (a guest without a target
    in ``chosen_targets``), a step's forecast may or will not converge and the admin did not confirm it,
    or the plan no longer fits.
    """
    _require(may_evacuate(user, vsp))
    rates = dirty_rates(vsp)
    try:
        with transaction.atomic():
            vsp = VSP.objects.select_for_update().get(pk=vsp.pk)
            _refuse_if_running(vsp)
            plan = build_plan(
                vsp, chosen_targets, order, rates=rates, excluded=excluded, confirmed=confirmed, user=user
            )
            misfits = [step for step in plan.steps if step.problem]
            if misfits:
                note_refused_steps(vsp, misfits, chosen_targets, user)
                raise EvacuationRefused(f"The plan no longer fits: {' '.join(s.problem for s in misfits)}")
            unreviewed = [step.vm.name for step in plan.steps if step.vm.pk not in chosen_targets]
            if unreviewed:
                raise EvacuationRefused(
                    f"The guests on {vsp.name} changed since the plan was shown "
                    f"({', '.join(unreviewed)} not in it): review the plan again."
                )
            if plan.problems:
                raise EvacuationRefused(f"The plan cannot start: {' '.join(plan.problems)}")
            if not plan.steps:
                raise EvacuationRefused(f"No guest on {vsp.name} can leave: nothing to evacuate.")
            evacuation = Evacuation.objects.create(
                vsp=vsp,
                requested_by=_actor(user),
                requested_by_name=user.get_username(),
                staying=[{"vm": stay.vm_name, "reason": stay.reason} for stay in plan.staying],
            )
            enter_maintenance(vsp, user)
            for position, step in enumerate(plan.steps, start=1):
                assert step.target is not None  # a plan without problems has a target per step
                try:
                    migration = do_request_migration(step.vm, step.target, user)
                except MigrationRefused as refusal:
                    raise EvacuationRefused(f"The plan no longer fits: {refusal.message}") from None
                EvacuationStep.objects.create(
                    evacuation=evacuation,
                    position=position,
                    vm=step.vm,
                    vm_name=step.vm.name,
                    target=step.target,
                    predicted_s=step.predicted_s,
                    migration=migration,
                )
            AuditEvent.record(
                AuditEvent.Action.EVACUATION_STARTED,
                vsp,
                actor=user,
                after={
                    "steps": [f"{step.vm.name} -> {step.target.name}" for step in plan.steps if step.target],
                    "confirmed": [f"{step.vm.name}: {step.verdict}" for step in plan.steps if step.warns],
                    "staying": [f"{stay.vm_name}: {stay.reason}" for stay in plan.staying],
                },
                message=f"Evacuation of {vsp.name} requested and started by {user}: "
                f"{len(plan.steps)} guests leave, {len(plan.staying)} stay",
            )
            publish_after_commit(vsp.pk)
    except IntegrityError:
        raise EvacuationRefused(f"{vsp.name} is already being evacuated.") from None
    logger.info("%s started evacuation %s of %s", user, evacuation.pk, vsp.name)
    return evacuation


def note_refused_steps(vsp: VSP, misfits: list[PlanStep], chosen: Mapping[int, int], user: Any) -> None:
    """Keep each guest the re-checked plan refuses in the history, as the migrate dialog's refusals are:
    a pre-check (maintenance, memory, ...), or a target outside the user's operator groups (permission).
    A target that is the evacuated host itself or no VSP at all is a bad choice, not an attempt."""
    for step in misfits:
        target, kind = step.target, refusals.PRECHECK
        if target is None:
            target = VSP.objects.exclude(pk=vsp.pk).filter(pk=chosen.get(step.vm.pk, 0)).first()
            kind = refusals.PERMISSION
        if target is not None:
            refusals.note_refusal(step.vm, target, user, f"{step.problem}.", kind)


def _refuse_if_running(vsp: VSP) -> None:
    running = Evacuation.objects.filter(vsp=vsp, state=Evacuation.State.RUNNING).first()
    if running is not None:
        settle(running)
        running.refresh_from_db()
        if running.is_running:
            raise EvacuationRefused(
                f"{vsp.name} is already being evacuated "
                f"(started by {running.requested_by_name or 'the system'} "
                f"at {timezone.localtime(running.started_at):%H:%M:%S}): wait for it to end or cancel it."
            )


def enter_maintenance(vsp: VSP, user: Any) -> None:
    if vsp.maintenance:
        return
    VSP.objects.filter(pk=vsp.pk).update(maintenance=True, maintenance_since=timezone.now())
    vsp.maintenance = True
    AuditEvent.record(
        AuditEvent.Action.MAINTENANCE_ENTERED,
        vsp,
        actor=user,
        before={"maintenance": False},
        after={"maintenance": True},
        message=f"{vsp.name} entered maintenance for its evacuation",
    )


def do_leave_maintenance(vsp: VSP, user: Any) -> None:
    """Take ``vsp`` out of maintenance (it may receive guests again); refused while it is evacuated."""
    _require(may_leave_maintenance(user, vsp))
    with transaction.atomic():
        vsp = VSP.objects.select_for_update().get(pk=vsp.pk)
        _refuse_if_running(vsp)
        if not vsp.maintenance:
            raise EvacuationRefused(f"{vsp.name} is not in maintenance.")
        VSP.objects.filter(pk=vsp.pk).update(maintenance=False, maintenance_since=None)
        AuditEvent.record(
            AuditEvent.Action.MAINTENANCE_LEFT,
            vsp,
            actor=user,
            before={"maintenance": True},
            after={"maintenance": False},
            message=f"{vsp.name} left maintenance ({user})",
        )
        publish_after_commit(vsp.pk)


def do_cancel_evacuation(evacuation: Evacuation, user: Any) -> None:
    """Cancel the whole evacuation: waiting guests are not started, the running migration is cancelled.

    A migration already committing cannot be cancelled and completes. Raises ``EvacuationRefused`` when
    the evacuation has already ended.
    """
    _require(may_cancel_evacuation(user, evacuation.vsp))
    with transaction.atomic():
        flagged = Evacuation.objects.filter(
            pk=evacuation.pk, state=Evacuation.State.RUNNING, cancel_requested=False
        ).update(cancel_requested=True, cancel_requested_by=_actor(user))
        if not flagged:
            raise EvacuationRefused(
                "Nothing to cancel: this evacuation has ended or is already being cancelled."
            )
        AuditEvent.record(
            AuditEvent.Action.EVACUATION_CANCELLED,
            evacuation.vsp,
            actor=user,
            after={"cancel_requested": True},
            message=f"Evacuation of {evacuation.vsp.name} cancelled by {user}",
        )
        publish_after_commit(evacuation.vsp_id)
    steps = list(evacuation.steps.select_related("migration__vm", "migration__source", "migration__target"))
    # The waiting ones first, the last first, so that none of them is handed the source meanwhile.
    waiting_first = sorted(
        (step.migration for step in steps if step.migration is not None),
        key=lambda migration: (migration.state != Migration.State.QUEUED, -migration.pk),
    )
    for migration in waiting_first:
        migration.refresh_from_db()
        if migration.is_active:
            try:
                do_cancel_migration(migration, user)
            except MigrationRefused:
                pass  # committing: too late, it completes
    settle(evacuation)


def settle(evacuation: Evacuation) -> bool:
    """End a running evacuation whose migrations have all ended (FINISHED, or CANCELLED when cancelled).

    Compare-and-set, so exactly one caller records the end; returns whether this call ended it.
    """
    if not evacuation.is_running:
        return False
    active = Migration.objects.filter(
        evacuation_step__evacuation=evacuation, state__in=Migration.ACTIVE_STATES
    )
    if active.exists():
        return False
    evacuation.refresh_from_db()
    end_state = Evacuation.State.CANCELLED if evacuation.cancel_requested else Evacuation.State.FINISHED
    with transaction.atomic():
        ended = Evacuation.objects.filter(pk=evacuation.pk, state=Evacuation.State.RUNNING).update(
            state=end_state, ended_at=timezone.now()
        )
        if ended:
            summary = summarize(evacuation)
            AuditEvent.record(
                AuditEvent.Action.EVACUATION_FINISHED,
                evacuation.vsp,
                after=summary.counts(),
                message=f"Evacuation of {evacuation.vsp.name} {end_state.label.lower()}: "
                f"{summary.sentence()}",
            )
            publish_after_commit(evacuation.vsp_id)
    return bool(ended)


def settle_after(migration_id: int) -> None:
    """Called by the worker when a migration ends: end its evacuation if it was the last step."""
    step = EvacuationStep.objects.filter(migration_id=migration_id).select_related("evacuation__vsp").first()
    if step is not None:
        settle(step.evacuation)


# -- progress and summary -------------------------------------------------------------------------------
STEP_STATUS: dict[str, str] = {
    Migration.State.COMPLETED.value: "done",
    Migration.State.ABORTED.value: "failed",
}


def step_status(step: EvacuationStep) -> str:
    """ "waiting", "running", "done", "failed", "cancelled" (stopped while moving) or "not started"."""
    migration = step.migration
    if migration is None:
        return "not started"
    if migration.state == Migration.State.QUEUED:
        return "waiting"
    if migration.is_active:
        return "running"
    if migration.state == Migration.State.CANCELLED:
        return (
            "not started"
            if migration.init_started_at is None and migration.failed_phase == ""
            else "cancelled"
        )
    return STEP_STATUS.get(str(migration.state), str(migration.state))


@dataclass
class Summary:
    """An evacuation's progress: its steps with their status, the counts, the time left (s)."""

    evacuation: Evacuation
    rows: list[tuple[EvacuationStep, str]]
    time_left_s: float | None  # None: not known (a step without a forecast is still to run)

    def count(self, status: str) -> int:
        return sum(1 for _, row_status in self.rows if row_status == status)

    @property
    def count_done(self) -> int:
        return self.count("done")

    @property
    def count_running(self) -> int:
        return self.count("running")

    @property
    def count_waiting(self) -> int:
        return self.count("waiting")

    @property
    def count_failed(self) -> int:
        return self.count("failed")

    def counts(self) -> dict[str, int]:
        return {
            status: self.count(status)
            for status in ("done", "running", "waiting", "failed", "cancelled", "not started")
        } | {"staying": len(self.evacuation.staying)}

    def sentence(self) -> str:
        counts = self.counts()
        parts = [f"{counts['done']} moved", f"{counts['failed']} failed"]
        if counts["cancelled"] or counts["not started"]:
            parts.append(f"{counts['cancelled']} cancelled, {counts['not started']} not started")
        parts.append(f"{counts['staying']} stayed")
        failed = [
            step.vm_name for step, status in self.rows if status in ("failed", "cancelled", "not started")
        ]
        if failed:
            parts.append(f"still runnable on {self.evacuation.vsp.name}: {', '.join(failed)}")
        return "; ".join(parts)


def summarize(evacuation: Evacuation) -> Summary:
    """The evacuation's progress in two queries (its steps with their migrations and targets), the time
    left counting ``max_concurrent_migrations`` at once (its VSP: one more query unless loaded)."""
    steps = list(evacuation.steps.select_related("migration", "target"))
    rows = [(step, step_status(step)) for step in steps]
    now = timezone.now()
    left: list[float] = []
    for step, status in rows:
        if status not in ("waiting", "running"):
            continue
        if step.predicted_s is None:
            return Summary(evacuation, rows, None)
        elapsed = 0.0
        if status == "running" and step.migration is not None and step.migration.init_started_at:
            elapsed = (now - step.migration.init_started_at).total_seconds()
        left.append(max(step.predicted_s - elapsed, 0.0))
    return Summary(evacuation, rows, time_left_s(left, evacuation.vsp.max_concurrent_migrations))


def time_left_s(left: list[float], at_once: int) -> float:
    """When the last of ``left`` (seconds each, running ones first, then in queue order) ends, with
    ``at_once`` running at a time: each next one takes the slot that frees first."""
    slots = [0.0] * max(at_once, 1)
    for seconds in left:
        soonest = min(range(len(slots)), key=slots.__getitem__)
        slots[soonest] += seconds
    return max(slots)


def latest_evacuation(vsp: VSP) -> Evacuation | None:
    """The VSP's running evacuation or its last one (settled first if its migrations have all ended)."""
    evacuation = Evacuation.objects.filter(vsp=vsp).select_related("vsp").first()
    if evacuation is not None and settle(evacuation):
        evacuation.refresh_from_db()
    return evacuation


def publish_after_commit(vsp_id: int) -> None:
    """Once the current transaction commits, the VSP's open pages re-fetch their evacuation panel and
    maintenance flag (``progress.publish_vsp_overview``)."""
    transaction.on_commit(lambda: publish_vsp_overview(vsp_id))


def _actor(user: Any) -> Any:
    return user if getattr(user, "is_authenticated", False) else None
