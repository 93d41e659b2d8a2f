"""The REST API's operations (``/api/v1/``). Each reads the request, checks access, calls the same
action or query as the page, and answers with a schema; refusals come back as problem documents whose
``detail`` is the action's own message (see ``problems.py``).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from ninja import Header, Path, Query, Router
from ninja.errors import HttpError
from ninja.responses import Status

from migrations_app import steering
from migrations_app.access import hide_unseen, visible_migration_condition
from migrations_app.actions import MigrationRefused, do_cancel_migration, do_request_migration
from migrations_app.migration_policy import PolicyError
from migrations_app.models import Migration
from migrations_app.recommend import convergence_warning
from vms.access import role_vsp_ids, visible_vms, visible_vsps
from vms.actions import do_mark_not_runnable, do_mark_runnable, do_set_online_migration
from vms.define import Definition, DiskRequest, NicRequest, do_define_vm
from vms.http import AuthenticatedHttpRequest
from vms.models import Registration, VirtualMachine
from vms.queries import filter_vms, vm_with_registrations

from .lookups import MAX_ID, get_migration, get_vm, get_vsp
from .models import IdempotencyKey
from .problems import Conflict, Problem
from .schemas import (
    MigrationChangedOut,
    MigrationDetailOut,
    MigrationIn,
    MigrationOut,
    MigrationPage,
    MigrationStartedOut,
    NotRunnableIn,
    OnlineMigrationIn,
    PolicyChangeIn,
    VMDefineIn,
    VMOut,
    VMPage,
    VSPOut,
    VSPPage,
    migration_changed_out,
    migration_detail_out,
    migration_out,
    migration_started_out,
    vm_out,
    vsp_out,
)

router = Router()

VIEW_VSP = "vms.view_vsp"
VIEW_VM = "vms.view_virtualmachine"
VIEW_MIGRATION = "migrations_app.view_migration"
MAX_OFFSET = 10**9
IdRef = Path(..., min_length=1, max_length=64, description="Id or name")
MigrationId = Path(..., ge=1, le=MAX_ID)
Limit = Query(50, ge=1, le=500, description="Page size")
Offset = Query(0, ge=0, le=MAX_OFFSET, description="Rows to skip")
StateFilter = Query(None, description="Only migrations in this state")

READ_ERRORS: dict[int, Any] = {401: Problem, 403: Problem, 422: Problem}
OBJECT_ERRORS: dict[int, Any] = {**READ_ERRORS, 404: Problem}
# 400: a body that is not JSON at all; 422: JSON of the wrong shape; 409: refused by the console's checks.
WRITE_ERRORS: dict[int, Any] = {**OBJECT_ERRORS, 400: Problem, 409: Problem}
# Steering a running migration: 409 when the change does not apply now, 503 when its source host could
# not be asked (``steering.SourceUnavailable``).
STEER_ERRORS: dict[int, Any] = {**WRITE_ERRORS, 503: Problem}


def require(request: HttpRequest, permission: str) -> None:
    if not request.user.has_perm(permission):
        raise PermissionDenied("Your account lacks the permission to see this.")


# --- VSPs --------------------------------------------------------------------------------------------------


@router.get("/vsps", response={200: VSPPage, **READ_ERRORS}, tags=["VSPs"])
def list_vsps(request: HttpRequest, limit: int = Limit, offset: int = Offset) -> dict:
    """Every VSP (VM host), by name."""
    require(request, VIEW_VSP)
    vsps = (
        visible_vsps(request.user)
        .filter(retired_at=None)
        .prefetch_related("pools", "networks")
        .order_by("name")
    )
    return page(vsps, limit, offset, vsp_out)


@router.get("/vsps/{vsp}", response={200: VSPOut, **OBJECT_ERRORS}, tags=["VSPs"])
def get_one_vsp(request: HttpRequest, vsp: str = IdRef) -> VSPOut:
    require(request, VIEW_VSP)
    return vsp_out(get_vsp(vsp, request.user))


def seen_vsp_ids(user: Any) -> frozenset[int] | None:
    """The VSPs of ``user``'s host groups (``None``: all, a superuser): what a VM's answer may name."""
    return role_vsp_ids(user)


def vm_out_for(request: HttpRequest, vm: VirtualMachine) -> VMOut:
    """``vm`` as the request's user may see it (``schemas.vm_out``)."""
    return vm_out(vm, seen_vsp_ids(request.user))


def shown(migration: Migration, seen: frozenset[int] | None) -> Migration:
    """``migration`` (visible: it touches one of ``seen``) with another group's VSP and the requester
    unnamed (``access.hide_unseen``)."""
    return hide_unseen(migration, seen) or migration


# --- VMs ---------------------------------------------------------------------------------------------------


@router.get("/vms", response={200: VMPage, **OBJECT_ERRORS}, tags=["VMs"])
def list_vms(
    request: HttpRequest,
    vsp: str | None = Query(None, max_length=64, description="Only VMs with a copy on this VSP (id or name)"),
    name: str = Query("", max_length=64, description="Name contains"),
    limit: int = Limit,
    offset: int = Offset,
) -> dict:
    """VMs and vPars with their General-tab fields, by name."""
    require(request, VIEW_VM)
    vsp_id = get_vsp(vsp, request.user).pk if vsp else None
    vms = filter_vms(
        visible_vms(request.user, vm_with_registrations()), name=name.replace("\x00", ""), vsp_id=vsp_id
    ).order_by("name")
    seen = seen_vsp_ids(request.user)
    return page(vms, limit, offset, lambda found: vm_out(found, seen))


@router.get("/vms/{vm}", response={200: VMOut, **OBJECT_ERRORS}, tags=["VMs"])
def get_one_vm(request: HttpRequest, vm: str = IdRef) -> VMOut:
    """The General tab: VSP, OS, statuses, Online Migration Enabled, Not Runnable details, phases, alerts."""
    require(request, VIEW_VM)
    return vm_out_for(request, get_vm(vm, request.user))


@router.post("/vms", response={201: VMOut, **WRITE_ERRORS}, tags=["VMs"])
def define_vm(request: HttpRequest, body: VMDefineIn) -> Status:
    """Define a VM on a VSP with disks (new volumes of a size in a pool, or an image already in a pool) and
    network cards on the VSP's networks (MAC generated unless given). A bad definition is refused (409,
    every problem in words) and nothing is created, on the console or the host. Needs
    ``vms.add_virtualmachine`` and the administrator role in the VSP's host group."""
    vsp = get_vsp(body.vsp, request.user)
    definition = Definition(
        name=body.name,
        vsp=vsp,
        memory_mib=body.memory_mib,
        vcpus=body.vcpus,
        os_type=body.os_type,
        disks=[DiskRequest(pool=d.pool, size_bytes=d.size_bytes, image=d.image) for d in body.disks],
        nics=[NicRequest(network=n.network, mac=n.mac) for n in body.nics],
    )
    vm = do_define_vm(definition, request.user)
    return Status(201, vm_out(get_vm(str(vm.pk), request.user)))


@router.put("/vms/{vm}/online-migration", response={200: VMOut, **WRITE_ERRORS}, tags=["VMs"])
def set_online_migration(request: HttpRequest, body: OnlineMigrationIn, vm: str = IdRef) -> VMOut:
    """Enable or disable online migration for the VM (refused for a vPar)."""
    found = get_vm(vm, request.user)
    do_set_online_migration(found, body.enabled, request.user)
    return vm_out_for(request, get_vm(str(found.pk), request.user))


@router.post(
    "/vms/{vm}/registrations/{vsp}/runnable", response={200: VMOut, **WRITE_ERRORS}, tags=["Registrations"]
)
def mark_runnable(request: HttpRequest, vm: str = IdRef, vsp: str = IdRef) -> VMOut:
    """Mark the VM's copy on ``vsp`` runnable (refused while another copy is runnable)."""
    registration = get_registration(request, vm, vsp)
    do_mark_runnable(registration, request.user)
    return vm_out_for(request, get_vm(str(registration.vm_id), request.user))


@router.post(
    "/vms/{vm}/registrations/{vsp}/not-runnable",
    response={200: VMOut, **WRITE_ERRORS},
    tags=["Registrations"],
)
def mark_not_runnable(request: HttpRequest, body: NotRunnableIn, vm: str = IdRef, vsp: str = IdRef) -> VMOut:
    """Mark the VM's copy on ``vsp`` Not Runnable (set by Admin) with a reason; the copy must not be On."""
    registration = get_registration(request, vm, vsp)
    do_mark_not_runnable(registration, body.reason, request.user)
    return vm_out_for(request, get_vm(str(registration.vm_id), request.user))


def get_registration(request: HttpRequest, vm_ref: str, vsp_ref: str) -> Registration:
    from django.http import Http404

    vm, vsp = get_vm(vm_ref, request.user), get_vsp(vsp_ref, request.user)
    registration = Registration.objects.select_related("vm", "vsp").filter(vm=vm, vsp=vsp).first()
    if registration is None:
        raise Http404(f"{vm.name} has no configuration on VSP {vsp.name}.")
    return registration


# --- migrations --------------------------------------------------------------------------------------------


@router.get("/migrations", response={200: MigrationPage, **OBJECT_ERRORS}, tags=["Migrations"])
def list_migrations(
    request: HttpRequest,
    vm: str | None = Query(None, max_length=64, description="VM id or name"),
    vsp: str | None = Query(None, max_length=64, description="Source or target VSP (id or name)"),
    state: Migration.State | None = StateFilter,
    active: bool | None = Query(None, description="true: queued or running; false: ended"),
    limit: int = Limit,
    offset: int = Offset,
) -> dict:
    """Migrations, newest first: the history."""
    require(request, VIEW_MIGRATION)
    migrations = Migration.objects.select_related("vm", "source", "target", "requested_by").filter(
        visible_migration_condition(request.user)
    )
    if vm:
        migrations = migrations.filter(vm=get_vm(vm, request.user))
    if vsp:
        found = get_vsp(vsp, request.user)
        migrations = migrations.filter(source=found) | migrations.filter(target=found)
    if state:
        migrations = migrations.filter(state=state)
    if active is not None:
        in_active = {"state__in": Migration.ACTIVE_STATES}
        migrations = migrations.filter(**in_active) if active else migrations.exclude(**in_active)
    seen = seen_vsp_ids(request.user)
    return page(
        migrations.order_by("-requested_at", "-pk"), limit, offset, lambda m: migration_out(shown(m, seen))
    )


@router.post(
    "/migrations",
    response={201: MigrationStartedOut, 200: MigrationStartedOut, **WRITE_ERRORS},
    tags=["Migrations"],
)
def create_migration(
    request: AuthenticatedHttpRequest,
    body: MigrationIn,
    response: HttpResponse,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A retry with the same key returns the first migration (200) instead of a second one",
    ),
) -> Status[MigrationOut]:
    """Queue an online migration of ``vm`` to ``target``: the Migrate dialog's pre-checks and queue.

    One forecast not to converge under its policy is started all the same, with why in
    ``forecast_warning`` (the dialog asks first)."""
    vm, target = get_vm(str(body.vm), request.user), get_vsp(str(body.target), request.user)
    key = (idempotency_key or "").strip() or None
    # Before the transaction: it may ask the source agent for the guest's dirty rate (about 0.5 s).
    warning = convergence_warning(request.user, vm, target, body.policy_overrides() or {})
    try:
        with transaction.atomic():
            replay = find_replay(request.user, key, vm.pk, target.pk)
            if replay is not None:
                response["Idempotent-Replayed"] = "true"
                return Status(200, migration_started_out(replay, warning))
            try:
                migration = do_request_migration(vm, target, request.user, policy=body.policy_overrides())
            except PolicyError as error:
                # Each value passed the schema (422 otherwise): what is left is how they fit together
                # and with the VM's own policy (a ceiling under the downtime), a refusal like a pre-check's.
                raise Conflict(str(error)) from None
            if key is not None:
                IdempotencyKey.objects.create(user=request.user, key=key, migration=migration)
    except MigrationRefused as refusal:
        # A concurrent request with the same key won the race: answer with its migration. Otherwise the
        # refusal is kept in the history once this transaction's rollback is over (migrations_app.refusals).
        replay = find_replay(request.user, key, vm.pk, target.pk)
        if replay is None:
            raise
        if refusal.attempt is not None:
            refusal.attempt.withdraw()
        response["Idempotent-Replayed"] = "true"
        return Status(200, migration_started_out(replay, warning))
    return Status(201, migration_started_out(get_migration(migration.pk, request.user), warning))


def find_replay(user: Any, key: str | None, vm_id: int, target_id: int) -> Migration | None:
    if key is None or not user.has_perm("migrations_app.add_migration"):
        return None
    earlier = IdempotencyKey.objects.filter(user=user, key=key).select_related("migration").first()
    if earlier is None:
        return None
    if (earlier.migration.vm_id, earlier.migration.target_id) != (vm_id, target_id):
        raise Conflict("This Idempotency-Key was already used for a different migration; use a new key.")
    return get_migration(earlier.migration_id, user)


@router.get(
    "/migrations/{migration_id}", response={200: MigrationDetailOut, **OBJECT_ERRORS}, tags=["Migrations"]
)
def get_one_migration(request: HttpRequest, migration_id: int = MigrationId) -> MigrationDetailOut:
    """One migration: phases with percent and times, statistics, outcome, and its event timeline.

    Live progress as JSON: ``GET /api/v1/migrations/{id}/events`` (server-sent events, current state first).
    """
    require(request, VIEW_MIGRATION)
    found = get_migration(migration_id, request.user)
    return migration_detail_out(found, seen_vsp_ids(request.user))


@router.post(
    "/migrations/{migration_id}/cancel", response={202: MigrationOut, **WRITE_ERRORS}, tags=["Migrations"]
)
def cancel_migration(request: HttpRequest, migration_id: int = MigrationId) -> Status[MigrationOut]:
    """Cancel: a queued migration ends at once; a running one stops before its commit (the VM stays)."""
    migration = get_migration(migration_id, request.user)
    do_cancel_migration(migration, request.user)
    # An operator of one end may cancel: the answer names the other group's VSP and requester no more
    # than the migration's detail does.
    return Status(
        202, migration_out(shown(get_migration(migration_id, request.user), seen_vsp_ids(request.user)))
    )


@router.patch(
    "/migrations/{migration_id}/policy",
    response={200: MigrationChangedOut, **STEER_ERRORS},
    tags=["Migrations"],
)
def change_migration(
    request: HttpRequest, body: PolicyChangeIn, migration_id: int = MigrationId
) -> MigrationChangedOut:
    """Change a running migration (Init or Copy) at once, as its phases panel does: raise the allowed
    downtime, set or remove the bandwidth cap, turn throttling on or off. Recorded as an event with who
    and what and pushed to every watcher; 409 once its Copy is over (nothing changed then)."""
    migration = get_migration(migration_id, request.user)
    done = steer(migration, body.model_dump(exclude_unset=True), request)
    return migration_changed_out(get_migration(migration_id, request.user), done)


@router.post(
    "/migrations/{migration_id}/switchover",
    response={202: MigrationChangedOut, **STEER_ERRORS},
    tags=["Migrations"],
)
def switch_over_now(request: HttpRequest, migration_id: int = MigrationId) -> Status[MigrationChangedOut]:
    """Switch over now: end Copy at once and freeze the guest for what is left, however long that takes
    (the phases panel's *Switch over now*). 409 once its Copy is over."""
    migration = get_migration(migration_id, request.user)
    done = steer(migration, {"action": "switchover"}, request)
    return Status(202, migration_changed_out(get_migration(migration_id, request.user), done))


def steer(migration: Migration, raw: dict[str, Any], request: HttpRequest) -> str:
    """``steering.do_change_migration``, its refusals as problems: 422 a bad change, 503 a source agent
    that could not be asked, 409 the others (the change does not apply to the migration as it is)."""
    try:
        return steering.do_change_migration(migration, raw, request.user)
    except steering.BadChange as refusal:
        raise HttpError(422, refusal.message) from None
    except steering.SourceUnavailable as refusal:
        raise HttpError(503, refusal.message) from None
    except steering.ChangeRefused as refusal:
        raise Conflict(refusal.message) from None


def page(rows: Any, limit: int, offset: int, convert: Any) -> dict:
    return {
        "items": [convert(row) for row in rows[offset : offset + limit]],
        "count": rows.count(),
        "limit": limit,
        "offset": offset,
    }
