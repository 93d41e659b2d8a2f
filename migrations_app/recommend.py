"""Which target the Migrate dialog recommends, and why (issue 21.4).

The best target fits (its pre-check passed), converges (its forecast says so, with or without
throttling) and leaves the most memory free after the move. A target whose forecast is not known yet
ranks after those known to converge and before those known not to; among equals, the most memory left
after the move wins, then the name (so the choice is stable). Plain Python on the dialog's rows.

A migration forecast **not to converge** is not started from the dialog before the admin confirmed it
with the reason before them (``convergence_warning``; the API and the CLI start it and say the same
words beside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from migrations_app.forecast import Verdict, duration_words
from vms.access import allowed
from vms.models import VSP, VirtualMachine

from . import estimates, migration_policy
from .access import check_can_migrate
from .checks import TargetCheck, check_targets
from .estimates import TargetForecast

CONVERGING = (Verdict.CONVERGES, Verdict.CONVERGES_WITH_THROTTLE)


@dataclass(frozen=True)
class Recommendation:
    """The recommended target's VSP pk and the reason in words ("hostb: it fits, ...")."""

    vsp_id: int
    reason: str


def recommend(rows: Sequence[tuple[TargetCheck, TargetForecast | None]]) -> Recommendation | None:
    """The best of ``rows`` (each a target's pre-check and forecast, None: not known yet), or None when
    no target passed its pre-check."""
    fits = [(check, look) for check, look in rows if check.ok]
    if not fits:
        return None
    best_check, best_look = min(fits, key=_rank)
    most_room = max(check.left_after_mib or 0 for check, _ in fits)
    return Recommendation(best_check.vsp.pk, _reason(best_check, best_look, most_room, fits))


def _rank(row: tuple[TargetCheck, TargetForecast | None]) -> tuple[int, int, str]:
    """Smallest first: converging, then unknown, then not converging; more room left; the name."""
    check, look = row
    verdict = look.verdict if look is not None else None
    known = 0 if verdict in CONVERGING else 1 if verdict is None else 2
    return known, -(check.left_after_mib or 0), check.vsp.name


def _reason(
    check: TargetCheck,
    look: TargetForecast | None,
    most_room: int,
    fits: list[tuple[TargetCheck, TargetForecast | None]],
) -> str:
    left = _mib(check.left_after_mib or 0)
    room = f"leaves the most memory free ({left} after the move)"
    if (check.left_after_mib or 0) < most_room:
        room = f"leaves {left} free after the move"
    verdict = look.verdict if look is not None else None
    if verdict in CONVERGING:
        total = look.total_s if look is not None else None
        took = f", {'about ' if total >= 1 else ''}{duration_words(total)}" if total is not None else ""
        return f"{check.vsp.name}: it fits, its forecast converges{took}, and it {room}."
    if verdict is None:
        return f"{check.vsp.name}: it fits and {room}; its forecast is not known yet."
    if len(fits) > 1:
        return f"{check.vsp.name}: it fits and {room}; no target's forecast converges under this policy."
    return (
        f"{check.vsp.name}: the only target that fits ({left} free after the move), though its forecast "
        "does not converge."
    )


def _mib(value: int) -> str:
    """MiB as the inventory shows memory (``vms`` templates' ``mib``): "24 MiB", "3.5 GiB", "4 GiB"."""
    if abs(value) >= 1024 and value % 1024 == 0:
        return f"{value // 1024} GiB"
    if abs(value) >= 1024:
        return f"{value / 1024:.1f} GiB"
    return f"{value} MiB"


def convergence_warning(user: Any, vm: VirtualMachine, target: VSP, overrides: dict[str, Any]) -> str:
    """Why migrating ``vm`` to ``target`` under the VM's policy with ``overrides`` (the dialog's or the
    API's policy fields) is forecast not to converge (``estimates.will_not_converge_warning``); "" when
    it is not, and when the request will be refused anyway (no right, a failed pre-check or a bad policy
    value: the refusal says why, and no agent is asked for a forecast of a move that cannot start)."""
    if not allowed(check_can_migrate, user, vm, target):
        return ""
    vm_policy = migration_policy.effective(vm.migration_policy)
    if migration_policy.policy_errors(overrides, base=vm_policy):
        return ""
    if not any(check.ok and check.vsp.pk == target.pk for check in check_targets(vm)):
        return ""
    policy = migration_policy.check_policy(overrides, base=vm_policy)
    return estimates.will_not_converge_warning(vm, target, policy)
