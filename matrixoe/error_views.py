"""Friendly error pages (400, 403, 404, 405, a failed CSRF check) inside the console's layout, each with a
way back.

Django's defaults show the exception's class name ("Resolver404") or, for 405, an empty page.
A message written for people (``Http404("No such page.")``, a refusal's reason) is kept; anything
else gets a plain sentence.
"""

from __future__ import annotations

from collections.abc import Callable

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.shortcuts import render
from django.urls import Resolver404
from django.utils.html import format_html

NOT_FOUND = "There is no page at this address. The VM or VSP may have been deleted, or the link is wrong."
FORBIDDEN = "Your account may look at the console but not do this."
BAD_REQUEST = "The console could not understand this request."
CSRF_EXPIRED = (
    "Your session's form expired or came from another site; reload the page and try again. "
    "Nothing was changed."
)
API_PREFIX = "/api/"


def people_message(exception: BaseException | None, default: str) -> str:
    """The exception's own message when it was written for people, else ``default``."""
    if exception is None or isinstance(exception, Resolver404) or not exception.args:
        return default
    message = exception.args[0]
    if not isinstance(message, str) or not message or message.endswith("matches the given query."):
        return default  # get_object_or_404's "No VirtualMachine matches the given query."
    return message


def error_page(request: HttpRequest, status: int, title: str, message: str) -> HttpResponse:
    context = {"status": status, "title": title, "message": message}
    return render(request, "error_page.html", context, status=status)


def bad_request(request: HttpRequest, exception: BaseException | None = None) -> HttpResponse:
    return error_page(request, 400, "Bad request", BAD_REQUEST)


REFUSAL_SLOT = "#refusal"  # in templates/base.html: where htmx shows a short refusal


def permission_denied(request: HttpRequest, exception: BaseException | None = None) -> HttpResponse:
    """403: a short refusal, never the page the user may not change.

    An htmx request gets one line, swapped into the layout's refusal slot (not into the form's
    target, which keeps what it showed); any other request gets the short error page.
    """
    message = people_message(exception, FORBIDDEN)
    if getattr(request, "htmx", False):
        response = HttpResponse(
            format_html('<p class="message message-error" role="alert">{}</p>', message), status=403
        )
        response["HX-Retarget"] = REFUSAL_SLOT
        response["HX-Reswap"] = "innerHTML"
        return response
    return error_page(request, 403, "Not allowed", message)


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """``CSRF_FAILURE_VIEW``: a form whose CSRF token expired or came from elsewhere (403).

    Pages get the friendly 403 (an htmx request its one-line refusal); ``/api/`` gets an RFC 9457 problem
    document (``application/problem+json``), as the API's own errors. ``reason`` (Django's, e.g. "CSRF
    token missing.") is logged by Django and not shown: it means nothing to people.
    """
    if request.path.startswith(API_PREFIX):
        from api.problems import problem_response  # the API app is optional to this module

        return problem_response(403, CSRF_EXPIRED)
    return permission_denied(request, PermissionDenied(CSRF_EXPIRED))


def page_not_found(request: HttpRequest, exception: BaseException | None = None) -> HttpResponse:
    """404: the page in the console's layout; under ``/api/`` an RFC 9457 problem document, as the API's
    own 404s, naming the address and where the operations are listed (a script never parses HTML)."""
    if request.path.startswith(API_PREFIX):
        from api.problems import problem_response  # the API app is optional to this module

        detail = f"No API operation at {request.path[:200]}: the operations are listed at /api/v1/docs."
        return problem_response(404, detail)
    return error_page(request, 404, "Not found", people_message(exception, NOT_FOUND))


def method_not_allowed(request: HttpRequest, allowed: list[str]) -> HttpResponse:
    if allowed == ["POST"]:
        message = "This address only takes a form submission (its button on the page), not a visit."
    else:
        message = f"This address does not take a {request.method} request (it takes {', '.join(allowed)})."
    if request.path.startswith(API_PREFIX):
        from api.problems import problem_response  # the API app is optional to this module

        message = f"This address does not take a {request.method} request (it takes {', '.join(allowed)})."
        response = problem_response(405, message)
    else:
        response = error_page(request, 405, "Not possible this way", message)
    response["Allow"] = ", ".join(allowed)
    return response


class FriendlyMethodNotAllowedMiddleware:
    """``require_POST`` and friends answer 405 with an empty body: render the 405 page instead; under
    ``/api/`` (ninja answers a plain-text 405) a problem document."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        api_text = request.path.startswith(API_PREFIX) and "problem" not in response.get("Content-Type", "")
        if isinstance(response, HttpResponseNotAllowed) and (not response.content or api_text):
            allowed = [method.strip() for method in response["Allow"].split(",") if method.strip()]
            return method_not_allowed(request, allowed)
        return response
