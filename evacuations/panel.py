"""What the VSP page's evacuation panel shows: one context for the page (its template tag) and the
panel's own poll (``views.evacuation_progress``)."""

from __future__ import annotations

from typing import Any

from vms.models import VSP

from .actions import latest_evacuation
from .returns import returnable_count
from .rights import may_cancel_evacuation, may_evacuate, may_leave_maintenance
from .summary import summarize


def panel_context(user: Any, vsp: VSP) -> dict[str, Any]:
    """Maintenance, the latest evacuation and its progress, and which buttons ``user`` gets."""
    evacuation = latest_evacuation(vsp)
    vsp.refresh_from_db(fields=["maintenance", "maintenance_since"])
    return {
        "vsp": vsp,
        "evacuation": evacuation,
        "summary": summarize(evacuation) if evacuation is not None else None,
        "may_evacuate": may_evacuate(user, vsp),
        "may_cancel": may_cancel_evacuation(user, vsp),
        "may_leave": may_leave_maintenance(user, vsp),
        # Guests the last evacuation moved away that may come back (offered once out of maintenance).
        "returnable": returnable_count(vsp) if not vsp.maintenance and may_evacuate(user, vsp) else 0,
    }
