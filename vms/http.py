"""The request type of the console's views: Django's, with django-htmx's ``request.htmx``."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails


class HtmxHttpRequest(HttpRequest):
    """What ``HtmxMiddleware`` hands every view (for the type checker; never instantiated)."""

    htmx: HtmxDetails


class AuthenticatedHttpRequest(HttpRequest):
    """A request past the login (``LoginRequiredMiddleware``, or the API's auth): ``user`` is a real user.

    For the type checker only (never instantiated), as django-stubs recommends.
    """

    user: User
