"""The admin's inventory changes, like ``hpvmmodify``: each checks permission, validates, then changes.

Every function raises ``PermissionDenied`` when the user lacks the right (``vms.access``: the model
permission and the administrator role in the host group) and
``ValidationError`` (with a message fit for the page) when the change is refused; in both cases
nothing is changed. Every change leaves an ``AuditEvent``. The pages and the Django admin both change
the inventory through these functions (``via_admin=True`` from the admin), so both refuse the same.
"""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractUser, AnonymousUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from vms.access import check_can_change_registration, check_can_change_vm
from vms.models import AuditEvent, Registration, VirtualMachine

logger = logging.getLogger(__name__)

User = AbstractUser | AnonymousUser

REASON_MAX_LENGTH: int = Registration._meta.get_field("not_runnable_reason").max_length or 200


def do_set_online_migration(vm: VirtualMachine, enabled: bool, user: User) -> None:
    """Enable or disable online migration of ``vm`` (refused for a vPar)."""
    check_can_change_vm(user, vm)
    if vm.is_vpar:
        raise ValidationError(f"{vm.name} is a vPar: a vPar does not support migration.")
    with transaction.atomic():
        before = {"online_migration_enabled": vm.online_migration_enabled}
        vm.online_migration_enabled = enabled
        vm.save(update_fields=["online_migration_enabled"])
        action = (
            AuditEvent.Action.ONLINE_MIGRATION_ENABLED
            if enabled
            else AuditEvent.Action.ONLINE_MIGRATION_DISABLED
        )
        AuditEvent.record(action, vm, actor=user, before=before, after={"online_migration_enabled": enabled})
    logger.info("%s %s online migration for %s", user, "enabled" if enabled else "disabled", vm.name)


def do_mark_not_runnable(
    registration: Registration, reason: str, user: User, *, via_admin: bool = False
) -> None:
    """Mark one copy of a VM Not Runnable (set by Admin); the copy must not be running."""
    check_can_change_registration(user, registration)
    reason = check_reason(reason)
    with transaction.atomic():
        registration = lock_registration(registration)
        check_can_mark_not_runnable(registration)
        registration.mark_not_runnable(
            set_by=Registration.SetBy.ADMIN, reason=reason, actor=user, via_admin=via_admin
        )
    logger.info("%s marked %s Not Runnable: %s", user, registration, reason)


def do_mark_runnable(registration: Registration, user: User, *, via_admin: bool = False) -> None:
    """Mark one copy of a VM runnable (hardware Off), refused while another copy is runnable.

    The check gives the clear message; the database constraint ``one_runnable_registration_per_vm``
    is what makes it hold under concurrent requests.
    """
    check_can_change_registration(user, registration)
    try:
        with transaction.atomic():
            registration = lock_registration(registration)
            check_can_mark_runnable(registration)
            registration.mark_runnable(actor=user, via_admin=via_admin)
    except IntegrityError:
        raise ValidationError(runnable_elsewhere_message(registration, other_vsp_name=None)) from None
    logger.info("%s marked %s runnable", user, registration)


def check_can_mark_not_runnable(registration: Registration) -> None:
    """Raises ``ValidationError`` unless this copy (as stored) may be marked Not Runnable."""
    if not registration.is_runnable:
        raise ValidationError(f"{registration} is already Not Runnable.")
    if registration.hardware_status == Registration.HardwareStatus.ON:
        raise ValidationError(f"{registration} is On: stop the VM before marking it Not Runnable.")


def check_can_mark_runnable(registration: Registration) -> None:
    """Raises ``ValidationError`` unless this copy (as stored) may be marked runnable."""
    if registration.is_runnable:
        raise ValidationError(f"{registration} is already runnable.")
    check_no_other_runnable_copy(registration)


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise ValidationError("Give a reason for marking the VM Not Runnable.")
    if len(reason) > REASON_MAX_LENGTH:
        raise ValidationError(f"The reason is too long: at most {REASON_MAX_LENGTH} characters.")
    return reason


def check_no_other_runnable_copy(registration: Registration) -> None:
    other = (
        Registration.objects.filter(vm_id=registration.vm_id)
        .exclude(pk=registration.pk)
        .exclude(hardware_status=Registration.HardwareStatus.NOT_RUNNABLE)
        .select_related("vsp")
        .first()
    )
    if other is not None:
        raise ValidationError(runnable_elsewhere_message(registration, other.vsp.name))


def runnable_elsewhere_message(registration: Registration, other_vsp_name: str | None) -> str:
    where = f"VSP {other_vsp_name}" if other_vsp_name else "another VSP"
    return (
        f"Refused: {registration.vm.name} is runnable on {where}. A VM may be runnable on only one VSP; "
        f"mark that copy Not Runnable first."
    )


def lock_registration(registration: Registration) -> Registration:
    """Re-read the registration under a row lock (where the database has them) so checks see fresh state."""
    return Registration.objects.select_for_update().select_related("vm", "vsp").get(pk=registration.pk)
