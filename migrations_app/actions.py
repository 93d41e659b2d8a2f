"""Starting, queueing and cancelling migrations: the multi-step changes behind the Migrate and Cancel buttons.

Each ``do_*`` checks the user's right (``access``: the global permission and the operator role in
the host groups of the source and the target), decides under a lock (and the
``one_active_migration_per_vm`` constraint), records an event, and queues the worker's job with
``transaction.on_commit`` so it never sees an uncommitted row. Refusals raise ``MigrationRefused``
(a ``ValidationError`` whose message is fit for the page) or ``vms.access.AccessDenied``
(a ``PermissionDenied``); nothing is changed then, but a refused migration request is kept in the
history (``refusals``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from vms.access import LACKS_PERMISSION, check_can_change_vm
from vms.inventory import probe_reachability
from vms.models import VSP, AuditEvent, VirtualMachine

from . import alerts, limits, migration_policy, refusals
from .access import (
    ADD_MIGRATION_PERMISSION,
    check_can_cancel,
    check_can_forget_release,
    check_can_migrate,
    words_for,
)
from .alerts import NO_ONE_NAMED
from .checks import ALREADY_MIGRATING_REASON, check_target
from .models import Migration, MigrationEvent
from .progress import publish_progress
from .records import record_released
from .scheduling import enqueue_next_for_source, enqueue_run
from .transitions import record_created, transition

logger = logging.getLogger(__name__)


class MigrationRefused(ValidationError):
    """The migration (or cancel) was refused; ``message`` says why in plain words, ``code`` its kind
    (``refusals.KINDS``). ``attempt``: the refused attempt kept in the history (``do_request_migration``)."""

    attempt: refusals.RefusedAttempt | None = None


@dataclass(frozen=True)
class RequestResult:
    vm: VirtualMachine
    migration: Migration | None
    refusal: str  # "" when the migration was queued


def check_permission(user: Any, permission: str) -> None:
    if not user.has_perm(permission):
        raise PermissionDenied(LACKS_PERMISSION)


def do_request_migration(
    vm: VirtualMachine, target: VSP, user: Any, policy: dict[str, Any] | None = None
) -> Migration:
    """Queue an online migration of ``vm`` to ``target``; the worker starts it when its source is free.

    ``policy``: overrides of the VM's migration policy for this migration (``migration_policy``);
    bad values raise ``PolicyError`` before anything is stored. The effective policy is kept on the row.

    Two admins at once: the VM row lock (PostgreSQL) or the write lock (SQLite, IMMEDIATE transactions)
    serializes the checks, and the partial unique constraint catches anything that slips past them.
    Raises ``AccessDenied`` unless ``user`` is an operator of both the source's and the target's group.
    Every refusal, ``MigrationRefused`` (``code``: its kind) or ``PermissionDenied``, is kept in the
    history (``refusals.note_refusal``; its ``attempt`` rides on the error); bad input is not.
    """
    try:
        check_permission(user, ADD_MIGRATION_PERMISSION)
        effective = migration_policy.check_policy(policy or {}, base=vm.migration_policy)
        ask_hosts_marked_unreachable(vm, target)
        try:
            with transaction.atomic():
                vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
                target = VSP.objects.get(pk=target.pk)
                check_can_migrate(user, vm, target)  # under the lock: the source is the one being moved from
                migration = _create_migration(vm, target, user, effective)
        except IntegrityError:
            reason = refusal_message(vm, target, ALREADY_MIGRATING_REASON)
            raise MigrationRefused(reason, code=refusals.ALREADY_MIGRATING) from None
    except MigrationRefused as refusal:
        kind = refusal.code or refusals.PRECHECK
        refusal.attempt = refusals.note_refusal(vm, target, user, str(refusal.message), kind)
        raise
    except PermissionDenied as denied:
        denied.attempt = refusals.note_refusal(  # type: ignore[attr-defined]
            vm, target, user, str(denied), refusals.PERMISSION
        )
        raise
    logger.info("%s requested migration %s of %s to %s", user, migration.pk, vm.name, target.name)
    return migration


def ask_hosts_marked_unreachable(vm: VirtualMachine, target: VSP) -> None:
    """Ask the agents of the VM's source and of ``target`` that are marked unreachable whether they answer
    now (a health question, ``MIGRATE_DIALOG_PROBE_TIMEOUT_S`` s at most), before the checks refuse them: an
    agent that came back since its last failure (restarted) is reachable again at once, not at the next
    inventory collection. Hosts marked reachable are not asked; 0 s turns it off."""
    timeout_s = settings.MIGRATE_DIALOG_PROBE_TIMEOUT_S
    hosts = {vsp.pk: vsp for vsp in (vm.current_vsp, target) if vsp is not None}
    doubtful = list(VSP.objects.filter(pk__in=hosts, agent_reachable=False))
    if doubtful and timeout_s > 0:
        probe_reachability(doubtful, timeout_s)


def _create_migration(vm: VirtualMachine, target: VSP, user: Any, policy: dict[str, Any]) -> Migration:
    reason = check_target(vm, target)
    if reason:
        kind = refusals.ALREADY_MIGRATING if reason == ALREADY_MIGRATING_REASON else refusals.PRECHECK
        raise MigrationRefused(refusal_message(vm, target, reason), code=kind)
    source = vm.current_vsp
    if source is None:
        raise MigrationRefused(
            refusal_message(vm, target, "VM is not runnable on any VSP"), code=refusals.PRECHECK
        )
    with transaction.atomic():  # a savepoint, so an IntegrityError leaves the outer transaction usable
        migration = Migration.objects.create(
            vm=vm,
            source=source,
            target=target,
            requested_by=user,
            policy=policy,
            phase_limits=limits.snapshot(vm),  # kept: a later change of the VM's limits is not this one's
        )
    message = f"Migration of {vm.name} from {source} to {target} requested"
    record_created(migration, actor=user, message=message)
    AuditEvent.record(
        AuditEvent.Action.MIGRATION_REQUESTED,
        migration,
        actor=user,
        after={"vm": vm.name, "source": source.name, "target": target.name, "policy": policy},
        message=message,
        object_name=audit_name(migration),
    )
    migration_id = migration.pk
    transaction.on_commit(lambda: enqueue_run(migration_id))
    transaction.on_commit(lambda: publish_progress(migration_id))
    return migration


def refusal_message(vm: VirtualMachine, target: VSP, reason: str) -> str:
    """The refusal's sentence: "web01 cannot migrate to vsp2: host disabled."; for a VM already migrating,
    who won, to where and when (``already_migrating_message``), whatever target the loser chose."""
    if reason == ALREADY_MIGRATING_REASON:
        return already_migrating_message(vm)
    return f"{vm.name} cannot migrate to {target.name}: {reason}."


def already_migrating_message(vm: VirtualMachine) -> str:
    """ "db01 is already migrating to vsp2, started by alice at 14:02 UTC." (the running or queued
    migration of ``vm``: its target, who asked, when); the plain words when none is found any more."""
    running = (
        Migration.objects.filter(vm=vm, state__in=Migration.ACTIVE_STATES)
        .select_related("target", "requested_by")
        .order_by("-requested_at")
        .first()
    )
    if running is None:
        return f"{vm.name} is already migrating."
    who = running.requested_by.get_username() if running.requested_by else "the system"
    to = running.target.name if running.target else "another VSP"
    at = timezone.localtime(running.requested_at, UTC).strftime("%H:%M")
    return f"{vm.name} is already migrating to {to}, started by {who} at {at} UTC."


def do_request_migrations(vms: list[VirtualMachine], target: VSP, user: Any) -> list[RequestResult]:
    """Queue several VMs for ``target``; those leaving one source go one at a time (the rest wait queued).

    Each VM is decided on its own: one the user may not migrate is refused with the reason, the rest go.
    """
    results = []
    for vm in vms:
        try:
            results.append(RequestResult(vm, do_request_migration(vm, target, user), ""))
        except MigrationRefused as refusal:
            results.append(RequestResult(vm, None, str(refusal.message)))
        except PermissionDenied as denied:
            results.append(RequestResult(vm, None, str(denied)))
    return results


def do_cancel_migration(migration: Migration, user: Any) -> None:
    """Cancel: a queued migration ends at once; a running one is flagged and its worker stops the agents.

    From COMMITTING on it is too late: the database already decided that the target copy runs.
    """
    check_can_cancel(user, migration.source_id, migration.target_id)
    if _cancel_queued(migration, user):
        return
    with transaction.atomic():
        flagged = Migration.objects.filter(
            pk=migration.pk, state__in=Migration.PHASES, cancel_requested=False
        ).update(cancel_requested=True, cancel_requested_by=_actor(user))
        current = Migration.objects.select_related("source", "cancel_requested_by").get(pk=migration.pk)
        if flagged:
            MigrationEvent.objects.create(
                migration=current,
                from_state=current.state,
                to_state=current.state,
                message=f"Cancel requested by {user}",
                actor=_actor(user),
            )
            record_cancel(current, user, f"Cancel requested by {user} during {current.get_state_display()}")
    if not flagged:  # an operator of one end is not told the other group's VSP or who cancelled
        raise MigrationRefused(words_for(user, current, too_late_message(current)))
    logger.info("%s requested cancel of migration %s (%s)", user, migration.pk, current.state)


def _cancel_queued(migration: Migration, user: Any) -> bool:
    with transaction.atomic():
        cancelled = transition(
            migration.pk,
            Migration.State.QUEUED,
            Migration.State.CANCELLED,
            message=f"Cancelled by {user} while queued",
            actor=_actor(user),
            cancel_requested=True,
            cancel_requested_by=_actor(user),
            alert=f"Cancelled by {user} before it started; nothing was changed.",
        )
        if cancelled:
            record_cancel(migration, user, f"Cancelled by {user} while queued")
            source_id = migration.require_source().pk
            transaction.on_commit(lambda: enqueue_next_for_source(source_id))
            transaction.on_commit(lambda: publish_progress(migration.pk))
    return cancelled


def too_late_message(migration: Migration) -> str:
    """Why a cancel does not apply to ``migration`` as it is now, in the console's words."""
    if migration.state in Migration.PHASES and migration.cancel_requested:
        who = migration.cancel_requested_by or NO_ONE_NAMED
        source = migration.source.name if migration.source else "its source"
        return (
            f"Already cancelling: {who} asked to cancel it; it stops before its commit and the VM stays "
            f"on {source}."
        )
    if migration.state == Migration.State.COMMITTING:
        return "Too late to cancel: the migration is committing and the VM now belongs to the target host."
    return f"Nothing to cancel: the migration has already ended ({migration.get_state_display()})."


def audit_name(migration: Migration) -> str:
    """How the audit trail names a migration, readable after the VM or VSPs are gone."""
    vm_name = migration.vm.name if migration.vm is not None else migration.vm_name
    return (
        f"migration {migration.pk} of {vm_name}: {migration.require_source().name} -> {migration.target.name}"
    )


def record_cancel(migration: Migration, user: Any, message: str) -> None:
    AuditEvent.record(
        AuditEvent.Action.MIGRATION_CANCELLED,
        migration,
        actor=user,
        after={"cancel_requested": True},
        message=message,
        object_name=audit_name(migration),
    )


def _actor(user: Any) -> Any:
    return user if getattr(user, "is_authenticated", False) else None


def do_set_migration_policy(vm: VirtualMachine, raw: dict[str, Any], user: Any) -> dict[str, Any]:
    """Set ``vm``'s default migration policy from ``raw`` (``migration_policy.check_policy``); the policy set.

    Refused (``ValidationError``, nothing changed) for a vPar or a value out of bounds.
    """
    check_can_change_vm(user, vm)
    if vm.is_vpar:
        raise ValidationError(f"{vm.name} is a vPar: a vPar does not support migration.")
    with transaction.atomic():
        vm = VirtualMachine.objects.select_for_update().get(pk=vm.pk)
        before = migration_policy.effective(vm.migration_policy)
        try:
            policy = migration_policy.check_policy(raw, base=before)
        except migration_policy.PolicyError as error:
            raise ValidationError(str(error)) from None
        vm.migration_policy = policy
        vm.save(update_fields=["migration_policy"])
        AuditEvent.record(
            AuditEvent.Action.MIGRATION_POLICY_CHANGED, vm, actor=user, before=before, after=policy,
            message=f"Migration policy of {vm.name}: {migration_policy.describe(policy)}",
        )  # fmt: skip
    logger.info("%s set the migration policy of %s: %s", user, vm.name, policy)
    return policy


def do_forget_release(migration: Migration, user: Any) -> None:
    """An administrator gives up on a completed migration's pending release (its source host never came
    back, or was reinstalled): the console stops asking it, the alert's pending part is removed, and the
    timeline names who. Raises ``AccessDenied`` (``access.check_can_forget_release``), or
    ``MigrationRefused`` when no release is pending (any more); nothing is changed then.
    """
    check_can_forget_release(user, migration.source_id)
    source = migration.require_source().name
    alert = migration.alert.replace(alerts.release_pending(migration), "").strip()
    if not record_released(migration, alert, alerts.release_forgotten(source), actor=_actor(user)):
        raise MigrationRefused("No release is pending for this migration (any more).", code="not_pending")
    logger.warning("%s forgot the pending release of migration %s on %s", user, migration.pk, source)
