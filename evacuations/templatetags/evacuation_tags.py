"""The VSP page's evacuation panel, for the slot this app fills on the inventory's VSP page."""

from __future__ import annotations

from typing import Any

from django import template

from migrations_app.forecast import duration_words
from vms.models import VSP

from ..panel import panel_context

register = template.Library()


@register.inclusion_tag("evacuations/evacuation_panel.html", takes_context=True)
def evacuation_panel(context: template.Context, vsp: VSP) -> dict[str, Any]:
    """The VSP page's evacuation panel: maintenance, Evacuate…, the latest evacuation's progress."""
    return panel_context(context["request"].user, vsp) | {"csrf_token": context.get("csrf_token")}


@register.filter
def seconds(value: float | None) -> str:
    """A forecast or time left in words ("not known yet" for None), as the migrate dialog says it."""
    return duration_words(value)
