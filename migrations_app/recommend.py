"""Which target the Migrate dialog recommends, and why (issue 21.4).

The best target fits (its pre-check passed), converges (its forecast says so, with or without
throttling) and leaves the most memory free after the move. A target whose forecast is not known yet
ranks after those known to converge and before those known not to; among equals, the most memory left
after the move wins, then the name (so the choice is stable). Plain Python on the dialog's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from migrations_app.forecast import Verdict, duration_words

from .checks import TargetCheck
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
