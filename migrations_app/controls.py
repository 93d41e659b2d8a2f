"""What one watcher of a migration may see and use, on the page and in every pushed fragment.

Decided per migration, from its source's and its target's host groups (and, for Migrate…, the group of
the VSP the guest runs on), never per VM: a user who sees a guest only through a Not Runnable copy in
his own group sees nothing of a migration between two hosts of another group.

Controls:

- ``steer``: Switch over now, Throttle the guest, Set allowed downtime, Set bandwidth cap. Who may:
  ``access.check_can_migrate(user, vm, target)``: ``add_migration`` + operator of the source's
  and the target's host group.
- ``cancel``: Cancel migration. ``access.check_can_cancel``: ``change_migration`` + operator of
  the source's or the target's group.
- ``migrate``: the Migrate… button. ``check_can_migrate(user, vm)``: ``add_migration`` + operator of
  the group of the VSP the guest runs on.

Seeing: a migration is shown to a watcher who sees its source or its target (``access``'s
``visible_migration_condition``); a VSP he may not see is never named (``progress.MigrationDisplay.
for_view`` puts a stand-in in its place), nor who asked unless he sees both ends.

A page rendered for a request decides by its user (``control_allowed``). A push is rendered by each web
process once per (migration, version, ``ViewClass``): each socket reduces its user's rights, read once
when it connected (``WatcherRights``), to the class of one message (``WatcherRights.view_class``), so
no query and no render per socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from vms.access import allowed, has_global, vsps_with_role
from vms.models import Role, VirtualMachine

from .access import ADD_MIGRATION_PERMISSION, CHANGE_MIGRATION_PERMISSION, check_can_cancel, check_can_migrate

CONTROLS = ("steer", "cancel", "migrate")


class ControlVSPs(TypedDict):
    """The VSP ids deciding a fragment's visibility and controls (None: unknown or deleted)."""

    source_id: int | None
    target_id: int | None
    current_id: int | None  # where the guest runs: decides Migrate…


def control_allowed(user: Any, control: str, vm: VirtualMachine, migration: Any = None) -> bool:
    """Whether ``user`` may use ``control`` (one of ``CONTROLS``) on ``vm`` / its ``migration``.

    Raises ``ValueError`` for an unknown control name.
    """
    if control == "steer":
        return migration is not None and allowed(check_can_migrate, user, vm, migration.target)
    if control == "cancel":
        return migration is not None and allowed(
            check_can_cancel, user, migration.source_id, migration.target_id
        )
    if control == "migrate":
        return allowed(check_can_migrate, user, vm)
    raise ValueError(f"unknown control {control!r}")


@dataclass(frozen=True)
class ViewClass:
    """What a class of watchers sees of one message: a render-cache key part (hashable).

    ``seen_vsp_ids``: of the message's VSPs (source, target, where the guest runs), those the watchers
    may see (``None``: every VSP, a superuser); ``controls``: the controls they may use (``CONTROLS``).
    """

    seen_vsp_ids: frozenset[int] | None
    controls: frozenset[str]

    def sees(self, vsp_id: int | None) -> bool:
        """Whether VSP ``vsp_id`` may be named to these watchers (an unknown id: no)."""
        if self.seen_vsp_ids is None:
            return True
        return vsp_id is not None and vsp_id in self.seen_vsp_ids


EVERYTHING = ViewClass(seen_vsp_ids=None, controls=frozenset(CONTROLS))  # tests and admin renderings


@dataclass(frozen=True)
class WatcherRights:
    """What one socket's user may see and use, read once when it connects.

    ``operator_vsp_ids``: VSPs where the user is an operator or more; ``viewer_vsp_ids``: VSPs he may
    see (viewer or more). ``None``: every VSP (a superuser).
    """

    may_add: bool
    may_change: bool
    operator_vsp_ids: frozenset[int] | None
    viewer_vsp_ids: frozenset[int] | None = None

    def _operator(self, vsp_id: int | None) -> bool:
        if self.operator_vsp_ids is None:
            return True
        return vsp_id is not None and vsp_id in self.operator_vsp_ids

    def _viewer(self, vsp_id: int | None) -> bool:
        if self.viewer_vsp_ids is None:
            return True
        return vsp_id is not None and (vsp_id in self.viewer_vsp_ids or self._operator(vsp_id))

    def allowed(self, vsps: ControlVSPs | None) -> frozenset[str]:
        """The controls kept in a fragment decided by ``vsps`` (``None``: none)."""
        if vsps is None:
            return frozenset()
        source, target = vsps["source_id"], vsps["target_id"]
        keep: set[str] = set()
        if self.may_add and self._operator(source) and self._operator(target):
            keep.add("steer")
        if self.may_change and (self._operator(source) or self._operator(target)):
            keep.add("cancel")
        if self.may_add and (vsps["current_id"] is None or self._operator(vsps["current_id"])):
            keep.add("migrate")
        return frozenset(keep)

    def view_class(self, vsps: ControlVSPs | None) -> ViewClass:
        """This watcher's class for a message about ``vsps`` (``None``: nothing seen, no control)."""
        if vsps is None:
            return ViewClass(seen_vsp_ids=frozenset(), controls=frozenset())
        ids = {vsps["source_id"], vsps["target_id"], vsps["current_id"]} - {None}
        if self.viewer_vsp_ids is None and self.operator_vsp_ids is None:
            seen: frozenset[int] | None = None
        else:
            seen = frozenset(vsp_id for vsp_id in ids if vsp_id is not None and self._viewer(vsp_id))
        controls = self.allowed(vsps)
        if seen is not None and not ({vsps["source_id"], vsps["target_id"]} & seen):
            controls = controls - {"steer", "cancel"}  # a migration he may not see has no controls for him
        return ViewClass(seen_vsp_ids=seen, controls=controls)


NO_RIGHTS = WatcherRights(
    may_add=False, may_change=False, operator_vsp_ids=frozenset(), viewer_vsp_ids=frozenset()
)


def watcher_rights(user: Any) -> WatcherRights:
    """``user``'s rights for live progress (two queries at most; runs in a thread)."""
    if getattr(user, "is_superuser", False) and has_global(user, ADD_MIGRATION_PERMISSION):
        return WatcherRights(may_add=True, may_change=True, operator_vsp_ids=None, viewer_vsp_ids=None)
    if getattr(user, "is_superuser", False):
        viewer_ids: frozenset[int] | None = None
    else:
        viewer_ids = frozenset(vsps_with_role(user, Role.VIEWER).values_list("pk", flat=True))
    may_add = has_global(user, ADD_MIGRATION_PERMISSION)
    may_change = has_global(user, CHANGE_MIGRATION_PERMISSION)
    if not (may_add or may_change):
        return WatcherRights(
            may_add=False, may_change=False, operator_vsp_ids=frozenset(), viewer_vsp_ids=viewer_ids
        )
    operator_ids = frozenset(vsps_with_role(user, Role.OPERATOR).values_list("pk", flat=True))
    return WatcherRights(
        may_add=may_add, may_change=may_change, operator_vsp_ids=operator_ids, viewer_vsp_ids=viewer_ids
    )
