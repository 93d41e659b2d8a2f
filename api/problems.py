"""Errors as RFC 9457 problem details (``application/problem+json``).

Body: ``{"type", "title", "status", "detail"}`` and, for bad input, ``errors`` (where and what). The
``detail`` of a refusal is the very message the page shows: it is taken from the ``MigrationRefused`` /
``ValidationError`` / ``PermissionDenied`` the shared action raised, never rephrased here.
"""

from __future__ import annotations

import functools
import json
import logging
import re
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
        if any(_whole_body_missing(error) for error in exc.errors):
            fields = required_body_fields(api, request.method or "", request.path)
            if fields:  # no body at all: name what it must hold, as a body without them is told
                errors = [{"loc": [name], "field": name, "msg": "required"} for name in fields]
                detail = f"the request has no JSON body: send an object with {_and(fields)}"
                return problem_response(422, f"Bad input: {detail}.", errors=errors)
        errors = [_plain_error(error) for error in exc.errors]
        detail = "; ".join(_sentence(e) for e in errors) or "Bad input."
        return problem_response(422, f"Bad input: {detail}", errors=errors)

    @api.exception_handler(Exception)
    def internal(request: HttpRequest, exc: Exception) -> HttpResponse:
        logger.exception("API error on %s %s", request.method, request.path)
        return problem_response(500, "Internal error; the console's log has the details.")


# Where ninja says a value came from; the first part of each error's location.
SOURCES = frozenset({"body", "query", "path", "header", "cookie", "form", "file"})

# Pydantic's messages for the common mistakes, in plain words ("{...}": the error's context).
PLAIN_MESSAGES = {
    "extra_forbidden": "not a field here: check its spelling and where it is nested",
    "missing": "required",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be text, in quotes",
    "dict_type": "must be an object ({...})",
    "model_type": "must be an object ({...})",
    "model_attributes_type": "must be an object ({...})",
    "list_type": "must be a list ([...])",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be more than {gt}",
    "less_than": "must be less than {lt}",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "too_long": "must have at most {max_length} items",
    "literal_error": "must be one of {expected}",
}


def field_path(loc: list[Any] | tuple[Any, ...]) -> list[str]:
    """Where an admin typed the bad value: ``("body", "body", "policy", "max_downtime_ms")`` ->
    ``["policy", "max_downtime_ms"]``, ``("query", "limit")`` -> ``["limit"]``.

    Ninja's location starts with the source (body, query, ...); a JSON body's then names the view's
    parameter that holds the whole body, which the admin never typed.
    """
    parts = [str(part) for part in loc]
    if parts and parts[0] in SOURCES:
        source, parts = parts[0], parts[1:]
        if source == "body" and parts:
            parts = parts[1:]
    return parts


def _plain_error(error: dict[str, Any]) -> dict[str, Any]:
    """``{"loc": [...], "field": "policy.max_downtime_ms", "msg": "..."}`` from one of ninja's errors."""
    path = field_path(error.get("loc", ()))
    template = PLAIN_MESSAGES.get(str(error.get("type", "")))
    if template is not None:
        try:
            message = template.format(**(error.get("ctx") or {}))
        except (KeyError, IndexError, ValueError):
            message = str(error.get("msg", ""))
    else:
        # A schema's own check (a ValueError with the page's words) reads as those words alone.
        message = str(error.get("msg", "")).removeprefix("Value error, ")
    return {"loc": path, "field": ".".join(path), "msg": message}


def _whole_body_missing(error: dict[str, Any]) -> bool:
    """Ninja's error for a request with no body at all: "missing" at the body itself (no field)."""
    loc = [str(part) for part in error.get("loc", ())]
    return error.get("type") == "missing" and bool(loc) and loc[0] == "body" and not field_path(loc)


def required_body_fields(api: Any, method: str, path: str) -> list[str]:
    """The required fields of the JSON body ``method path`` takes, from the API's own OpenAPI schema
    (``["vm", "target"]``); [] when the operation takes no body or has none required."""
    for (verb, pattern), fields in _body_patterns(api):
        if verb == method.lower() and pattern.fullmatch(path):
            return fields
    return []


@functools.cache
def _body_patterns(api: Any) -> list[tuple[tuple[str, re.Pattern[str]], list[str]]]:
    """((verb, path pattern), required body fields) of each operation with a JSON body (once)."""
    schema = api.get_openapi_schema()
    components = schema.get("components", {}).get("schemas", {})
    found = []
    for route, operations in schema.get("paths", {}).items():
        pattern = re.compile(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(route)))
        for verb, operation in operations.items():
            content = (operation.get("requestBody") or {}).get("content", {})
            body = content.get("application/json", {}).get("schema", {})
            if "$ref" in body:
                body = components.get(body["$ref"].rsplit("/", 1)[-1], {})
            if body.get("required"):
                found.append(((verb, pattern), list(body["required"])))
    return found


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _sentence(error: dict[str, Any]) -> str:
    return f"{error['field']}: {error['msg']}" if error["field"] else error["msg"]
