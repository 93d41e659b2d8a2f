"""Errors as RFC 9457 problem details (``application/problem+json``).

Body: ``{"type", "title", "status", "detail"}`` and, for bad input, ``errors`` (where and what). The
``detail`` of a refusal is the very message the page shows: it is taken from the ``MigrationRefused`` /
``ValidationError`` / ``PermissionDenied`` the shared action raised, never rephrased here.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse
from ninja import Schema
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError

logger = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(Schema):
    """An RFC 9457 problem: ``detail`` says in plain words what went wrong."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


def problem_response(status: int, detail: str, *, errors: list[dict[str, Any]] | None = None) -> HttpResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="matrixoe"'
    return response


class Conflict(Exception):
    """A refusal that depends on the current state (409), e.g. a migration refused by its pre-checks."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def validation_message(error: DjangoValidationError) -> str:
    return " ".join(error.messages)


def install_problem_handlers(api: Any) -> None:
    """Make every error of ``api`` a problem document (401, 403, 404, 409, 422, 500)."""

    @api.exception_handler(AuthenticationError)
    def unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
        return problem_response(
            401, "Log in first: send 'Authorization: Bearer <token>' (create one on your API tokens page)."
        )

    @api.exception_handler(HttpError)
    def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
        return problem_response(exc.status_code, str(exc))

    @api.exception_handler(PermissionDenied)
    def forbidden(request: HttpRequest, exc: PermissionDenied) -> HttpResponse:
        return problem_response(403, str(exc) or "Your account lacks the permission to do this.")

    @api.exception_handler(Http404)
    def not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
        return problem_response(404, str(exc) or "Not found.")

    @api.exception_handler(Conflict)
    def conflict(request: HttpRequest, exc: Conflict) -> HttpResponse:
        return problem_response(409, exc.detail)

    @api.exception_handler(DjangoValidationError)
    def refused(request: HttpRequest, exc: DjangoValidationError) -> HttpResponse:
        return problem_response(409, validation_message(exc))

    @api.exception_handler(NinjaValidationError)
    def bad_input(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
        errors = [_plain_error(error) for error in exc.errors]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "Bad input."
        return problem_response(422, f"Bad input: {detail}", errors=errors)

    @api.exception_handler(Exception)
    def internal(request: HttpRequest, exc: Exception) -> HttpResponse:
        logger.exception("API error on %s %s", request.method, request.path)
        return problem_response(500, "Internal error; the console's log has the details.")


def _plain_error(error: dict[str, Any]) -> dict[str, Any]:
    # A schema's own check (a ValueError with the page's words) reads as those words alone.
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    return {"loc": [str(part) for part in error.get("loc", ())], "msg": message}
