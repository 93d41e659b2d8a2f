"""The audit trail page: every ``AuditEvent`` (who, when, what, before and after), filtered and paginated.

One query for the page's rows and one for the count, whatever the number of events: the trail keeps the
actor's and the object's names as text, so no row reaches another table. A user limited to host groups
reads only the events about objects in their groups (``vms.access.visible_audit_condition``).
"""

from __future__ import annotations

import datetime
from typing import Any

from django import forms
from django.core.exceptions import PermissionDenied
from django.core.paginator import EmptyPage, Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from vms.access import visible_audit_condition
from vms.http import HtmxHttpRequest
from vms.models import AuditEvent
from vms.views import form_errors_text

AUDIT_PAGE_SIZE = 50


def may_view_audit(user: Any) -> bool:
    """Whether ``user`` may read the audit trail (one function, so finer rights can replace it)."""
    return bool(user.has_perm("vms.view_auditevent"))


class AuditFilterForm(forms.Form):
    user = forms.CharField(label="User", max_length=150, required=False, help_text='"system" for the console')
    object = forms.CharField(label="Object", max_length=200, required=False)
    action = forms.ChoiceField(
        label="Change", choices=[("", "Any"), *AuditEvent.Action.choices], required=False
    )
    since = forms.DateField(label="From", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label="To", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    page = forms.IntegerField(min_value=1, required=False, widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            raise forms.ValidationError("The From date is after the To date.")
        return data


def filter_events(
    viewer: Any = None,
    *,
    user: str = "",
    object: str = "",  # noqa: A002 - the filter's name on the page
    action: str = "",
    since: datetime.date | None = None,
    until: datetime.date | None = None,
) -> QuerySet[AuditEvent]:
    """Events newest first, by actor name (exact; "system" for none), object name (contains), action and
    local date range (both ends included). ``viewer``: only the events that user may read
    (``vms.access.visible_audit_condition``: objects in their host groups); ``None``: every event."""
    events = AuditEvent.objects.all()
    if viewer is not None:
        events = events.filter(visible_audit_condition(viewer))
    if user:
        events = events.filter(actor_name="" if user.lower() == "system" else user)
    if object:
        events = events.filter(object_name__icontains=object)
    if action:
        events = events.filter(action=action)
    zone = timezone.get_current_timezone()
    if since:
        events = events.filter(at__gte=datetime.datetime.combine(since, datetime.time.min, zone))
    if until:
        next_day = until + datetime.timedelta(days=1)
        events = events.filter(at__lt=datetime.datetime.combine(next_day, datetime.time.min, zone))
    return events


@require_GET
def audit_list(request: HtmxHttpRequest) -> HttpResponse:
    if not may_view_audit(request.user):
        raise PermissionDenied("Your account may not read the audit trail.")
    form = AuditFilterForm(request.GET)
    if not form.is_valid():
        error = form_errors_text(form)
        context: dict[str, Any] = {"form": form, "page": None, "error": error, "nav": "audit"}
        return render(request, "vms/audit_list.html", context, status=400)
    filters = {key: value for key, value in form.cleaned_data.items() if key != "page"}
    try:
        page = Paginator(filter_events(request.user, **filters), AUDIT_PAGE_SIZE).page(
            form.cleaned_data["page"] or 1
        )
    except EmptyPage:
        raise Http404("No such page.") from None
    query = request.GET.copy()
    query.pop("page", None)
    context = {"form": form, "page": page, "query": query.urlencode(), "nav": "audit"}
    return render(request, "vms/audit_list.html", context)
