"""The user's own API tokens page: list, create (the token is shown once), revoke (after a confirmation
page). CSRF-protected forms."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods

from vms.http import AuthenticatedHttpRequest

from .models import ApiToken
from .tokens import do_create_token, do_revoke_token


@require_http_methods(["GET", "POST"])
def tokens(request: AuthenticatedHttpRequest) -> HttpResponse:
    """GET: the user's tokens. POST: create one named ``name``; the page shows it this once."""
    created = ""
    error = ""
    status = 200
    if request.method == "POST":
        try:
            _, created = do_create_token(request.user, request.POST.get("name", ""))
        except ValidationError as refusal:
            error, status = " ".join(refusal.messages), 400
    context = {
        "nav": "tokens",
        "tokens": ApiToken.objects.filter(user=request.user),
        "created": created,
        "error": error,
        "name": request.POST.get("name", "") if error else "",
    }
    response = render(request, "api/tokens.html", context, status=status)
    response["Cache-Control"] = "no-store"  # the page may hold a token shown once
    return response


@require_http_methods(["GET", "POST"])
def revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    """GET: ask to confirm (the token's name, what revoking does; no inline script, the page's CSP
    forbids it). POST: revoke. Another user's token, or none: 404 on GET, a message on POST."""
    if request.method == "GET":
        token = get_object_or_404(ApiToken, pk=token_id, user=request.user, revoked_at=None)
        return render(request, "api/revoke_token.html", {"nav": "tokens", "token": token})
    try:
        token = do_revoke_token(request.user, token_id)
    except ApiToken.DoesNotExist:
        messages.error(request, "No such token among yours.")
        return redirect("api:tokens")
    messages.success(request, f"Token “{token.name}” revoked: it no longer works.")
    return redirect("api:tokens")
