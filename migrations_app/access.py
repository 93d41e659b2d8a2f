"""Who may see, request and cancel migrations: the migration rights, on top of the inventory's host-group
roles (``vms.access``: the global model permission, then the role in the host groups of the VSPs).

- see a migration: ``migrations_app.view_migration`` (the caller's gate) and a VSP it touches is seen;
- migrate a guest: ``migrations_app.add_migration`` and operator of its source and of the target;
- cancel a migration: ``migrations_app.change_migration`` and operator of its source or its target;
- forget a completed migration's pending release: ``migrations_app.change_migration`` and administrator
  of its source.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from django.db.models import Q, QuerySet

from vms.access import (
    AccessDenied,
    can_view_vsp,
    has_role_on,
    require_global,
    role_vsp_ids,
    vsps_with_role,
)
from vms.devices import HIDDEN_NETWORK, HIDDEN_POOL
from vms.models import VSP, Role, VirtualMachine

from .models import Migration, MigrationEvent

VIEW_MIGRATION_PERMISSION = "migrations_app.view_migration"
ADD_MIGRATION_PERMISSION = "migrations_app.add_migration"
CHANGE_MIGRATION_PERMISSION = "migrations_app.change_migration"
HIDDEN_VSP_NAME = "a VSP of another host group"  # stands for a VSP the user may not see
HIDDEN_USER_NAME = "someone"  # stands for who acted on a migration whose other end the user may not see


def visible_migration_condition(user: Any) -> Q:
    """A ``Q`` on migrations (``migrations_app.Migration``) ``user`` may see: its source or its target
    is a VSP they see (so a migration of a deleted VM stays visible to the groups it touched).

    An ``IN`` subquery, not a join: no duplicate rows, no extra query. The coarse gate
    (``migrations_app.view_migration``) is the caller's.
    """
    if getattr(user, "is_superuser", False):
        return Q()
    seen = vsps_with_role(user, Role.VIEWER).values("pk")
    return Q(source_id__in=seen) | Q(target_id__in=seen)


def requester_shown_condition(user: Any) -> Q:
    """A ``Q`` on migrations whose requester ``user`` may be told: he sees both their ends (a refusal
    runnable nowhere has no source: its target then), as ``hide_unseen`` names who asked. An ``IN``
    subquery, no extra query."""
    if getattr(user, "is_superuser", False):
        return Q()
    seen = vsps_with_role(user, Role.VIEWER).values("pk")
    return (Q(source_id__in=seen) | Q(source_id__isnull=True)) & Q(target_id__in=seen)


def check_can_migrate(user: Any, vm: VirtualMachine, target: VSP | None = None) -> None:
    """Raises ``AccessDenied`` unless ``user`` may migrate ``vm`` (to ``target``, when given).

    Needs ``migrations_app.add_migration`` and the operator role on the VM's source VSP (where it is
    runnable) and on the target. A target the user cannot use is not named in the message.
    """
    require_global(user, ADD_MIGRATION_PERMISSION)
    source = vm.current_vsp
    if source is not None and not has_role_on(user, Role.OPERATOR, [source.pk]):
        if can_view_vsp(user, source.pk):
            where = f"the host group of {source.name}"
        else:  # another group's VSP is not named (issue 18.14)
            where = "the host group of the VSP it runs on"
        raise AccessDenied(f"You may not migrate {vm.name}: you are not an operator of {where}.")
    if target is not None and not has_role_on(user, Role.OPERATOR, [target.pk]):
        if can_view_vsp(user, target.pk):
            where = f"{target.name}: you are not an operator of its host group"
        else:
            where = "that VSP: it is not in a host group where you are an operator"
        raise AccessDenied(f"You may not migrate {vm.name} to {where}. Nothing was changed.")


def migration_targets(user: Any) -> QuerySet[VSP]:
    """The VSPs the migrate dialog may offer ``user``: those where they are an operator (not retired)."""
    return vsps_with_role(user, Role.OPERATOR).filter(retired_at=None)  # a retired VSP takes no guests


def check_can_cancel(user: Any, source_id: int | None, target_id: int | None) -> None:
    """Cancel needs ``migrations_app.change_migration`` and the operator role on the source or the target."""
    require_global(user, CHANGE_MIGRATION_PERMISSION)
    if not (has_role_on(user, Role.OPERATOR, [source_id]) or has_role_on(user, Role.OPERATOR, [target_id])):
        raise AccessDenied(
            "You may not cancel this migration: you are not an operator of its VSPs' host groups."
        )


def check_can_forget_release(user: Any, source_id: int | None) -> None:
    """Forgetting a completed migration's pending release needs ``migrations_app.change_migration`` and the
    administrator role on its source (the host whose copy the console stops asking about)."""
    require_global(user, CHANGE_MIGRATION_PERMISSION)
    if not has_role_on(user, Role.ADMINISTRATOR, [source_id]):
        raise AccessDenied(
            "You may not forget this release: you are not an administrator of its source VSP's host group."
        )


def may_forget_release(user: Any, migration: Migration) -> bool:
    """Whether ``user`` may forget ``migration``'s pending release now (the report offers the button)."""
    if not migration.release_pending:
        return False
    try:
        check_can_forget_release(user, migration.source_id)
    except AccessDenied:
        return False
    return True


def audited_migrations(user: Any) -> QuerySet[Migration]:
    """The migrations whose audit events ``user`` may read: those whose both ends he sees
    (``requester_shown_condition``), since an audit event names both ends and who acted, words the
    timeline shows a one-end viewer only masked (``hide_unseen_events``)."""
    return Migration.objects.filter(requester_shown_condition(user))


@dataclass(frozen=True)
class Mask:
    """What of one migration a user who sees only one of its ends may not read: the other end's VSP name
    (``vsp_name``, "" when that end is no VSP) and who acted (``user_names``: who asked, who cancelled,
    who changed it). ``text`` puts stand-ins in their place."""

    vsp_name: str
    user_names: frozenset[str]

    def text(self, words: str) -> str:
        """``words`` with the VSP named as ``HIDDEN_VSP_NAME`` and each user as ``HIDDEN_USER_NAME``."""
        if self.vsp_name:
            words = re.sub(rf"\b{re.escape(self.vsp_name)}\b", HIDDEN_VSP_NAME, words)
        for name in self.user_names:  # a name as a word of its own (usernames may hold . @ + -)
            words = re.sub(rf"(?<![\w.@+-]){re.escape(name)}(?![\w.@+-])", HIDDEN_USER_NAME, words)
        return words


def migration_mask(
    migration: Migration, seen_vsp_ids: frozenset[int] | None, actors: Iterable[Any] = ()
) -> Mask | None:
    """The ``Mask`` of ``migration`` for a user who sees the VSPs ``seen_vsp_ids`` (``None``: all), or
    None when there is nothing to hide (he sees both ends, or neither: then he sees nothing of it).
    ``actors``: more users whose names are hidden (the actors of its events)."""
    if seen_vsp_ids is None:
        return None
    sees_source = migration.source_id is None or migration.source_id in seen_vsp_ids
    sees_target = migration.target_id is None or migration.target_id in seen_vsp_ids
    if sees_source == sees_target:
        return None
    hidden = migration.target if sees_source else migration.source
    users = [migration.requested_by, migration.cancel_requested_by, *actors]
    names = frozenset(name for user in users if user is not None and (name := user.get_username()))
    return Mask(hidden.name if hidden is not None else "", names)


def words_for(user: Any, migration: Migration, words: str) -> str:
    """``words`` about ``migration`` (a refusal, say) as ``user`` may read them (``migration_mask`` by his
    host groups' VSPs; his own name stays his)."""
    mask = migration_mask(migration, role_vsp_ids(user))
    if mask is None:
        return words
    own = getattr(user, "get_username", lambda: "")()
    return replace(mask, user_names=mask.user_names - {own}).text(words)


def hide_unseen(migration: Migration | None, seen_vsp_ids: frozenset[int] | None) -> Migration | None:
    """``migration`` as a user who sees the VSPs ``seen_vsp_ids`` (``None``: all) may see it.

    ``None`` when he sees neither its source nor its target; else a copy where a VSP he may not see is a
    stand-in (``HIDDEN_VSP_NAME``, also in its alert's and warning's words), nobody asked, and the disks
    and cards it recorded of the other end are not named (``hide_unseen_devices``). The original is not
    changed."""
    if migration is None or seen_vsp_ids is None:
        return migration
    sees_source, sees_target = migration.source_id in seen_vsp_ids, migration.target_id in seen_vsp_ids
    if not (sees_source or sees_target):
        return None
    mask = migration_mask(migration, seen_vsp_ids)
    if mask is None:
        return migration
    masked = copy.copy(migration)  # Django copies the related-object cache too: the original keeps its own
    # An end that is no VSP (a refusal runnable nowhere, a deleted VSP) names nothing to hide.
    sees_source = sees_source or migration.source_id is None
    hidden = migration.target if sees_source else migration.source
    stand_in = VSP(pk=hidden.pk if hidden is not None else None, name=HIDDEN_VSP_NAME)
    if sees_source:
        masked.target = stand_in
    else:
        masked.source = stand_in
        masked.guest_devices = hide_unseen_devices(migration.guest_devices)
    masked.requested_by = None
    masked.cancel_requested_by = None
    masked.alert = mask.text(migration.alert)
    masked.warning = mask.text(migration.warning)
    return masked


def hide_unseen_devices(devices: dict[str, Any] | None) -> dict[str, Any]:
    """A migration's ``guest_devices`` (recorded on its source) without the source's pools and networks:
    each disk's pool and each card's network is ``HIDDEN_POOL`` / ``HIDDEN_NETWORK``."""
    devices = devices or {}
    return {
        "disks": [{**disk, "pool": HIDDEN_POOL} for disk in devices.get("disks") or []],
        "nics": [{**nic, "network": HIDDEN_NETWORK} for nic in devices.get("nics") or []],
    }


def hide_unseen_events(
    migration: Migration, events: Iterable[MigrationEvent], seen_vsp_ids: frozenset[int] | None
) -> list[MigrationEvent]:
    """``migration``'s ``events`` (its timeline: the original ``migration``, not ``hide_unseen``'s copy,
    and events with their ``actor`` loaded) as a user who sees the VSPs ``seen_vsp_ids`` (``None``: all)
    may read them, as the General tab and the report show the migration: where he sees only one end,
    each message names the other end's VSP as ``HIDDEN_VSP_NAME`` and who acted as ``HIDDEN_USER_NAME``,
    and no event has an actor. Copies; the originals are not changed."""
    events = list(events)
    actors = [event.actor for event in events if event.actor_id is not None]
    mask = migration_mask(migration, seen_vsp_ids, actors)
    if mask is None:
        return events
    shown = []
    for event in events:
        masked = copy.copy(event)
        masked.message = mask.text(event.message)
        masked.actor = None
        shown.append(masked)
    return shown
