"""Evacuate a host: starting the plan, following it, cancelling it, maintenance.

**Running** (``do_start_evacuation``): in one transaction the VSP enters maintenance and each step is
requested through ``migrations_app.actions.do_request_migration``, in plan order, so the guests go through
the source's own queue (``migrations_app.scheduling``): one at a time, or ``VSP.max_concurrent_migrations``
at once; a plan that no longer fits is refused with the reason and nothing changes. A failed or cancelled
guest stays runnable on the source and the queue goes on.
``settle`` ends the evacuation once every step's migration has ended: called for each migration outcome
(``follow_outcome``, a follower of ``migrations_app.outcomes``: the migration core never calls this app),
and by cancel and the pages. Leaving maintenance is the admin's explicit action.

**Guests arriving** (``plan.Arriving``): a guest migrating to the VSP when its evacuation starts gets a
step that waits for that migration (``EvacuationStep.arriving``). Once it has landed (its outcome,
followed here, or any later ``settle``: a lost delivery only delays it) the guest is moved on
(``move_on``) by the admin who started the evacuation, to the planned target or another with room; if
none takes it, the step says why (``note``) and the summary lists the guest as still runnable here. A
migration to the VSP that completes while the evacuation runs without being in its plan (it began
Init just before maintenance) is adopted the same way (``adopt_landed``). The evacuation does not end
while a guest it waits for may still land, unless it was cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from migrations_app import refusals
from migrations_app.actions import MigrationRefused, do_cancel_migration, do_request_migration
from migrations_app.checks import host_refusal
from migrations_app.models import Migration
from migrations_app.outcomes import Outcome
from migrations_app.progress import publish_vsp_overview
from vms.capacity import free_memory_by_vsp
from vms.models import VSP, AuditEvent

from .models import Evacuation, EvacuationStep
from .plan import PlanStep, Staying, build_plan, dirty_rates
from .rights import may_cancel_evacuation, may_evacuate, may_leave_maintenance, require
from .summary import summarize

logger = logging.getLogger(__name__)


class EvacuationRefused(ValidationError):
    """Starting, cancelling or leaving maintenance was refused; ``message`` says why in plain words."""


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

    When no guest can leave (all powered off, vPars, excluded...) and nothing is wrong, ``vsp`` still
    enters maintenance: the evacuation moved nothing and is finished at once.

    Raises ``PermissionDenied`` without the right, ``EvacuationRefused`` (nothing changed) when an
    evacuation of ``vsp`` runs, the guests changed since the plan was shown (a guest without a target
    in ``chosen_targets``), a step's forecast may or will not converge and the admin did not confirm it,
    or the plan no longer fits.
    """
    require(may_evacuate(user, vsp))
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
            if not plan.steps and not plan.arriving:
                return _maintenance_only(vsp, plan.staying, user)
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
            for position, arriving in enumerate(plan.arriving, start=len(plan.steps) + 1):
                assert arriving.target is not None  # a plan without problems has one per arriving guest
                EvacuationStep.objects.create(
                    evacuation=evacuation,
                    position=position,
                    vm=arriving.vm,
                    vm_name=arriving.vm.name,
                    target=arriving.target,
                    arriving=arriving.migration,
                )
            AuditEvent.record(
                AuditEvent.Action.EVACUATION_STARTED,
                vsp,
                actor=user,
                after={
                    "steps": [f"{step.vm.name} -> {step.target.name}" for step in plan.steps if step.target],
                    "confirmed": [f"{step.vm.name}: {step.verdict}" for step in plan.steps if step.warns],
                    "staying": [f"{stay.vm_name}: {stay.reason}" for stay in plan.staying],
                    "arriving": [f"{arriving.vm.name}: {arriving.words}" for arriving in plan.arriving],
                },
                message=f"Evacuation of {vsp.name} requested and started by {user}: "
                f"{len(plan.steps)} guests leave, {len(plan.arriving)} arriving move on once landed, "
                f"{len(plan.staying)} stay",
            )
            publish_after_commit(vsp.pk)
    except IntegrityError:
        raise EvacuationRefused(f"{vsp.name} is already being evacuated.") from None
    logger.info("%s started evacuation %s of %s", user, evacuation.pk, vsp.name)
    return evacuation


def _maintenance_only(vsp: VSP, staying: list[Staying], user: Any) -> Evacuation:
    """No guest can leave (all powered off, vPars...): ``vsp`` enters maintenance all the same, recorded
    as an evacuation that moved nothing and ended at once. Refused if it is in maintenance already."""
    if vsp.maintenance:
        raise EvacuationRefused(f"No guest on {vsp.name} can leave and it is in maintenance already.")
    now = timezone.now()
    evacuation = Evacuation.objects.create(
        vsp=vsp,
        requested_by=_actor(user),
        requested_by_name=user.get_username(),
        staying=[{"vm": stay.vm_name, "reason": stay.reason} for stay in staying],
        started_at=now,
        ended_at=now,
        state=Evacuation.State.FINISHED,
    )
    AuditEvent.record(
        AuditEvent.Action.EVACUATION_STARTED,
        vsp,
        actor=user,
        after={"steps": [], "staying": [f"{stay.vm_name}: {stay.reason}" for stay in staying]},
        message=f"{vsp.name} entered maintenance by {user}: no running guest to move, {len(staying)} stay",
    )
    enter_maintenance(vsp, user)
    publish_after_commit(vsp.pk)
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
    require(may_leave_maintenance(user, vsp))
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
    require(may_cancel_evacuation(user, evacuation.vsp))
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
    if awaits_arrivals(evacuation):
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


def awaits_arrivals(evacuation: Evacuation) -> bool:
    """Move on every guest of ``evacuation`` that has landed (``move_on``); True while one it waits for
    may still land (its migration to the VSP is active), unless the evacuation was cancelled."""
    pending = evacuation.steps.filter(arriving__isnull=False, migration__isnull=True, note="")
    waiting = False
    for step in pending.select_related("arriving"):
        assert step.arriving is not None
        if step.arriving.state == Migration.State.COMPLETED:
            move_on(step.pk)
        elif step.arriving.is_active and not evacuation.cancel_requested:
            waiting = True
    return waiting


def move_on(step_id: int) -> Migration | None:
    """The guest of arriving step ``step_id`` has landed: request its migration onward, by the admin who
    started the evacuation, to the step's target or else the eligible VSP with the most free memory.

    Idempotent: the step row is locked and a step already moved on (``migration``) or given up
    (``note``) is left as it is. Returns the onward migration (None when none was requested: then the
    step's ``note`` says why, e.g. the evacuation was cancelled or every target refused).
    """
    with transaction.atomic():
        step = (
            EvacuationStep.objects.select_for_update()
            .select_related("evacuation__vsp", "evacuation__requested_by", "vm", "arriving", "target")
            .get(pk=step_id)
        )
        arriving = step.arriving
        if step.migration_id or step.note or arriving is None or arriving.state != Migration.State.COMPLETED:
            return None
        evacuation, vsp = step.evacuation, step.evacuation.vsp
        user, vm = evacuation.requested_by, step.vm
        reasons: list[str] = []
        if evacuation.cancel_requested or not evacuation.is_running:
            reasons.append("the evacuation was cancelled before it landed")
        elif user is None or vm is None:
            reasons.append("the admin who started the evacuation, or the guest, no longer exists")
        else:
            for target in [step.target, *other_targets(vsp, step.target, vm.memory_mib)]:
                try:
                    migration = do_request_migration(vm, target, user)
                except MigrationRefused as refusal:
                    reasons.append(f"{target.name}: {refusal.message}")
                    continue
                except ValidationError as error:
                    reasons.append(f"{target.name}: {' '.join(error.messages)}")
                    continue
                except PermissionDenied as denied:  # the admin lost a right since: said, not raised
                    reasons.append(f"{target.name}: {denied}")
                    continue
                step.migration, step.target = migration, target
                step.save(update_fields=["migration", "target"])
                logger.info("Evacuation %s: %s landed on %s, moved on to %s", evacuation.pk, vm, vsp, target)
                publish_after_commit(vsp.pk)
                return migration
        step.note = f"landed on {vsp.name} but was not moved on: {'; '.join(reasons)}"[:300]
        step.save(update_fields=["note"])
        logger.warning("Evacuation %s: %s %s", evacuation.pk, step.vm_name, step.note)
        publish_after_commit(vsp.pk)
    return None


def other_targets(vsp: VSP, planned: VSP, memory_mib: int) -> list[VSP]:
    """The VSPs other than ``vsp`` and ``planned`` that take guests now and have ``memory_mib`` free,
    the most free memory first."""
    others = list(VSP.objects.exclude(pk__in=[vsp.pk, planned.pk]))
    free = free_memory_by_vsp([other.pk for other in others])
    fitting = [o for o in others if not host_refusal(vsp, o) and free.get(o.pk, 0) >= memory_mib]
    return sorted(fitting, key=lambda other: (-free.get(other.pk, 0), other.name))


def adopt_landed(outcome: Outcome) -> None:
    """A migration to a VSP being evacuated completed without a step waiting for it (it began Init just
    before the evacuation put the VSP in maintenance): give it one, moved on like the planned ones."""
    evacuation = Evacuation.objects.filter(
        vsp_id=outcome.target_id, state=Evacuation.State.RUNNING, cancel_requested=False
    ).first()
    if evacuation is None or outcome.vm_id is None or outcome.at < evacuation.started_at:
        return  # landed before the evacuation: its plan saw the guest there (a step, or staying)
    with transaction.atomic():
        if evacuation.steps.filter(vm_id=outcome.vm_id).exists():
            return  # waited for already (or a step of its own): one step per guest
        migration = Migration.objects.select_related("vm").get(pk=outcome.migration_id)
        vm = migration.vm
        if vm is None:
            return
        targets = other_targets(evacuation.vsp, evacuation.vsp, vm.memory_mib)
        last = evacuation.steps.order_by("-position").values_list("position", flat=True).first() or 0
        step = EvacuationStep.objects.create(
            evacuation=evacuation,
            position=last + 1,
            vm=vm,
            vm_name=vm.name,
            target=targets[0] if targets else evacuation.vsp,
            arriving=migration,
            note="" if targets else f"landed on {evacuation.vsp.name}; no other VSP takes it now",
        )
    logger.warning(
        "Evacuation %s: %s landed on %s unplanned; moving it on", evacuation.pk, vm, evacuation.vsp
    )
    move_on(step.pk)


def follow_outcome(outcome: Outcome) -> None:
    """The outcome follower (``outcomes.register_follower``): a migration ended, so its evacuation ends if
    it was its last step; a guest an evacuation waited for (or one that landed on an evacuated VSP) is
    moved on. Idempotent (``move_on`` locks its step, ``settle`` is a compare-and-set)."""
    if outcome.state == Migration.State.COMPLETED:
        adopt_landed(outcome)
    step = (
        EvacuationStep.objects.filter(migration_id=outcome.migration_id)
        .select_related("evacuation__vsp")
        .first()
    ) or (
        EvacuationStep.objects.filter(arriving_id=outcome.migration_id)
        .select_related("evacuation__vsp")
        .first()
    )
    if step is not None:
        settle(step.evacuation)


def latest_evacuation(vsp: VSP) -> Evacuation | None:
    """The VSP's running evacuation or its last one (settled first if its migrations have all ended)."""
    evacuation = Evacuation.objects.filter(vsp=vsp).select_related("vsp").first()
    if evacuation is not None and settle(evacuation):
        evacuation.refresh_from_db()
    return evacuation


def evacuations_on_vsp(vsp_id: int) -> list[str]:
    """Why VSP ``vsp_id`` may not be retired for evacuations (``vms.hooks.register_vsp_busy_check``):
    one of it, or one bringing guests back to it, still running."""
    if Evacuation.objects.filter(vsp_id=vsp_id, state=Evacuation.State.RUNNING).exists():
        return ["an evacuation of it is running: wait for it to end or cancel it"]
    return []


def publish_after_commit(vsp_id: int) -> None:
    """Once the current transaction commits, the VSP's open pages re-fetch their evacuation panel and
    maintenance flag (``progress.publish_vsp_overview``)."""
    transaction.on_commit(lambda: publish_vsp_overview(vsp_id))


def _actor(user: Any) -> Any:
    return user if getattr(user, "is_authenticated", False) else None
