"""Which live migration controls a user is shown, on the page and in every pushed fragment.

Controls (the names are the markers' names):

- ``steer``: Switch over now, Throttle the guest, Set allowed downtime, Set bandwidth cap. Who may:
  ``access.check_can_migrate(user, vm, target)``: ``add_migration`` + operator of the source's
  and the target's host group.
- ``cancel``: Cancel migration. ``access.check_can_cancel``: ``change_migration`` + operator of
  the source's or the target's group.
- ``migrate``: the Migrate… button. ``check_can_migrate(user, vm)``: ``add_migration`` + operator of
  the group of the VSP the guest runs on.

A page rendered for a request decides by its user (``control_allowed``). A pushed fragment is rendered
once per group, for no user: it carries every control, each between ``<!--control:NAME-->`` and
``<!--/control:NAME-->``, and the message says which VSPs decide (``control_vsps``); each socket then
removes what its own user may not use (``WatcherRights.allowed``, ``strip_controls``), with the rights
it read when it connected (so no query per push). User text is autoescaped, so it cannot forge a marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from vms.access import allowed, has_global, vsps_with_role
from vms.models import Role, VirtualMachine

from .access import ADD_MIGRATION_PERMISSION, CHANGE_MIGRATION_PERMISSION, check_can_cancel, check_can_migrate

CONTROLS = ("steer", "cancel", "migrate")


class ControlVSPs(TypedDict):
    """The VSP ids deciding a pushed fragment's controls (None: unknown or deleted)."""

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


def strip_controls(html: str, keep: frozenset[str]) -> str:
    """``html`` without the marked controls not in ``keep`` (markers of kept ones stay, harmless).

    A marker without its end removes the rest of the string (never shows a control by mistake).
    """
    for control in CONTROLS:
        if control in keep:
            continue
        start_marker, end_marker = f"<!--control:{control}-->", f"<!--/control:{control}-->"
        parts: list[str] = []
        position = 0
        while (start := html.find(start_marker, position)) != -1:
            parts.append(html[position:start])
            end = html.find(end_marker, start)
            position = len(html) if end == -1 else end + len(end_marker)
        parts.append(html[position:])
        html = "".join(parts)
    return html


@dataclass(frozen=True)
class WatcherRights:
    """What one socket's user may use, read once when it connects.

    ``operator_vsp_ids``: VSPs where the user is an operator or more (``None``: every VSP, a superuser).
    """

    may_add: bool
    may_change: bool
    operator_vsp_ids: frozenset[int] | None

    def _operator(self, vsp_id: int | None) -> bool:
        if self.operator_vsp_ids is None:
            return True
        return vsp_id is not None and vsp_id in self.operator_vsp_ids

    def allowed(self, vsps: ControlVSPs | None) -> frozenset[str]:
        """The controls to keep in a fragment decided by ``vsps`` (``None``: keep none)."""
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


def watcher_rights(user: Any) -> WatcherRights:
    """``user``'s rights for live controls (one query; runs in a thread)."""
    if getattr(user, "is_superuser", False) and has_global(user, ADD_MIGRATION_PERMISSION):
        return WatcherRights(may_add=True, may_change=True, operator_vsp_ids=None)
    may_add = has_global(user, ADD_MIGRATION_PERMISSION)
    may_change = has_global(user, CHANGE_MIGRATION_PERMISSION)
    if not (may_add or may_change):
        return WatcherRights(may_add=False, may_change=False, operator_vsp_ids=frozenset())
    operator_ids = frozenset(vsps_with_role(user, Role.OPERATOR).values_list("pk", flat=True))
    return WatcherRights(may_add=may_add, may_change=may_change, operator_vsp_ids=operator_ids)
