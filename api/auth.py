"""Who calls the API: a personal token (``Authorization: Bearer moe_…``) or the browser's session.

A session write must carry the CSRF token (``X-CSRFToken``), as the pages' forms do; a token request
needs none (a token is not sent by the browser on its own, so it cannot be forged cross-site).
Anonymous requests get 401, never the login page.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import HttpError
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from .tokens import user_for_token

SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


class TokenAuth(HttpBearer):
    """``Authorization: Bearer <token>``: a personal API token from the user's API tokens page."""

    def authenticate(self, request: HttpRequest, token: str) -> Any | None:
        user = user_for_token(token)
        if user is not None:
            request.user = user
        return user


class SessionAuth(APIKeyCookie):
    """The console's login session (the docs page in the browser); writes need the CSRF token."""

    param_name = settings.SESSION_COOKIE_NAME

    def __init__(self) -> None:
        # csrf=True also makes the docs page (Swagger UI) send the X-CSRFToken header on its requests.
        super().__init__(csrf=True)

    def _get_key(self, request: HttpRequest) -> str | None:
        # ninja would check CSRF here even for an anonymous request (a 403 where 401 is due); see below.
        return request.COOKIES.get(self.param_name)

    def authenticate(self, request: HttpRequest, key: str | None) -> Any | None:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if request.method not in SAFE_METHODS and check_csrf(request) is not None:
            raise HttpError(403, CSRF_FAILED)
        return user


CSRF_FAILED = (
    "CSRF check failed: a write with the browser's session must send the page's CSRF token "
    "(X-CSRFToken header); scripts should use an API token instead."
)

API_AUTH = [TokenAuth(), SessionAuth()]
