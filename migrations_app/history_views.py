"""Pages of the migration history: the list, its CSV export, and one migration's report.

Login is required (middleware) and every view checks ``migrations_app.view_migration``; a user sees
the migrations whose source or target is in one of their host groups (``access``), others are
not found.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import permission_required
from django.core.paginator import EmptyPage, Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from vms.access import role_vsp_ids, vsps_with_role
from vms.models import VSP, Role
from vms.views import form_errors_text

from .access import hide_unseen, may_forget_release, requester_shown_condition, visible_migration_condition
from .actions import MigrationRefused, do_forget_release
from .history import VIEW_MIGRATION_PERMISSION, HistoryFilterForm, HistoryRow, csv_lines, filter_migrations
from .models import Migration
from .reports import chart_data, get_report_migration, report_context

PAGE_SIZE = 50


def history_form(request: HttpRequest) -> HistoryFilterForm:
    """The filters, offering only VSPs of the user's host groups and people who requested a migration the
    user can see (no other account name leaks)."""
    form = HistoryFilterForm(request.GET)
    vsps = vsps_with_role(request.user, Role.VIEWER, VSP.objects.only("id", "name").order_by("name"))
    form.fields["vsp"].queryset = vsps  # type: ignore[attr-defined]
    requesters = Migration.objects.filter(requester_shown_condition(request.user)).values("requested_by")
    form.fields["user"].queryset = (  # type: ignore[attr-defined]
        get_user_model().objects.filter(pk__in=requesters).order_by("username")
    )
    return form


def visible_history(request: HttpRequest, form: HistoryFilterForm) -> QuerySet[Migration]:
    """The filtered history the user may see; filtered by who asked, only the migrations whose requester
    he may be told (``access.requester_shown_condition``): a filter must not name who asked the others."""
    migrations = filter_migrations(form.cleaned_data).filter(visible_migration_condition(request.user))
    if form.cleaned_data.get("user"):
        migrations = migrations.filter(requester_shown_condition(request.user))
    return migrations


def visible_report_migration(request: HttpRequest, migration_id: int) -> Migration:
    """The migration for its report, if the user may see it; raises ``Http404`` otherwise."""
    migration = get_report_migration(migration_id)
    if migration is None or not (
        Migration.objects.filter(visible_migration_condition(request.user), pk=migration_id).exists()
    ):
        raise Http404("No such migration.")
    return migration


HISTORY_TEMPLATE = "migrations_app/history.html"
REPORT_TEMPLATE = "migrations_app/report.html"
HISTORY_POLL_S = 3  # how often a page of the history with a running migration redraws its table


@require_GET
@permission_required(VIEW_MIGRATION_PERMISSION, raise_exception=True)
def history(request: HttpRequest) -> HttpResponse:
    """Every migration, newest first, filtered and paginated; bad filters: 400 with the reason, no rows."""
    form = history_form(request)
    if not form.is_valid():
        context: dict[str, Any] = {
            "form": form,
            "page": None,
            "error": form_errors_text(form),
            "nav": "migrations",
        }
        return render(request, HISTORY_TEMPLATE, context, status=400)
    try:
        page = Paginator(visible_history(request, form), PAGE_SIZE).page(form.cleaned_data["page"] or 1)
    except EmptyPage:
        raise Http404("No such page of the migration history.") from None
    now = timezone.now()
    query = request.GET.copy()
    query.pop("page", None)
    seen = role_vsp_ids(request.user)
    rows = [HistoryRow.of(hide_unseen(migration, seen) or migration, now) for migration in page]
    context = {
        "form": form,
        "page": page,
        "rows": rows,
        # While a row on this page runs (or waits), the table fetches itself again every few seconds
        # (same filters and page: the same URL) until none does.
        "live": any(not row.migration.is_terminal for row in rows),
        "poll_s": HISTORY_POLL_S,
        "query": query.urlencode(),
        "nav": "migrations",
    }
    return render(request, HISTORY_TEMPLATE, context)


@require_GET
@permission_required(VIEW_MIGRATION_PERMISSION, raise_exception=True)
def history_csv(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
    """The filtered history (all pages) as CSV, streamed; formula-like cells are neutralised."""
    form = history_form(request)
    if not form.is_valid():
        return HttpResponse(form_errors_text(form), status=400, content_type="text/plain; charset=utf-8")
    migrations = visible_history(request, form).iterator(chunk_size=2000)
    lines = csv_lines(migrations, role_vsp_ids(request.user))
    response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="migrations.csv"'
    return response


@require_GET
@permission_required(VIEW_MIGRATION_PERMISSION, raise_exception=True)
def report(request: HttpRequest, migration_id: int) -> HttpResponse:
    migration = visible_report_migration(request, migration_id)
    context = {**report_context(migration, role_vsp_ids(request.user)), "nav": "migrations"}
    context["may_forget_release"] = may_forget_release(request.user, migration)
    return render(request, REPORT_TEMPLATE, context)


@require_POST
@permission_required(VIEW_MIGRATION_PERMISSION, raise_exception=True)
def forget_release(request: HttpRequest, migration_id: int) -> HttpResponse:
    """An administrator of the source forgets a completed migration's pending release (its host never
    came back); 403 without the right, 409 when none is pending; back to the report."""
    migration = visible_report_migration(request, migration_id)
    try:
        do_forget_release(migration, request.user)
    except MigrationRefused as refused:
        return HttpResponse(refused.message, status=409, content_type="text/plain; charset=utf-8")
    return redirect("migration_history:report", migration_id=migration.pk)


@require_GET
@permission_required(VIEW_MIGRATION_PERMISSION, raise_exception=True)
def report_data(request: HttpRequest, migration_id: int) -> JsonResponse:
    """The chart's samples and the live figures, re-read by the report on each progress push."""
    migration = visible_report_migration(request, migration_id)
    return JsonResponse(chart_data(migration))
