"""Evacuate a host: starting the plan, following it, cancelling it, maintenance.

**Running** (``do_start_evacuation``): in one transaction the VSP enters maintenance and each step is
requested through ``migrations_app.actions.do_request_migration``, in plan order, so the guests go through
the source's own queue (``migrations_app.scheduling``): one at a time, or ``VSP.max_concurrent_migrations``
at once; a plan that no longer fits is refused with the reason and nothing changes. A failed or cancelled
guest stays runnable on the source and the queue goes on.
``settle`` ends the evacuation once every step's migration has ended: called for each migration outcome
(``follow_outcome``, a follower of ``migrations_app.outcomes``: the migration core never calls this app),
and by cancel and the pages. Leaving maintenance is the admin's explicit action.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from migrations_app import refusals
from migrations_app.actions import MigrationRefused, do_cancel_migration, do_request_migration
from migrations_app.models import Migration
from migrations_app.outcomes import Outcome
from migrations_app.progress import publish_vsp_overview
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
            if not plan.steps:
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


def follow_outcome(outcome: Outcome) -> None:
    """The outcome follower (``outcomes.register_follower``): a migration ended, so its evacuation ends if
    it was its last step. Idempotent (``settle`` is a compare-and-set)."""
    step = (
        EvacuationStep.objects.filter(migration_id=outcome.migration_id)
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
