"""The ``/api/v1/`` application: django-ninja with token or session auth and problem+json errors.

The interactive docs (``/api/v1/docs``) are Swagger UI served from django-ninja's own bundled static
files (``ninja`` in ``INSTALLED_APPS``): no CDN, no inline script, nothing fetched at runtime.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.urls import URLPattern, URLResolver
from ninja import NinjaAPI

from .auth import API_AUTH
from .evacuations import router as evacuations_router
from .problems import PROBLEM_CONTENT_TYPE, install_problem_handlers
from .routes import router
from .setup import router as setup_router

DESCRIPTION = """The Matrix OE console's API: the same actions, checks and words as its pages.

Authenticate with `Authorization: Bearer <token>` (create a token on your **API tokens** page, or
`python manage.py create_api_token USER`), or with the console's login session (writes then need the
`X-CSRFToken` header). Errors are RFC 9457 problem documents (`application/problem+json`).

Live progress of a migration as JSON: `GET /api/v1/migrations/{id}/events` (server-sent events; the
current state first, then every change, ending when the migration ends).
"""


class ConsoleAPI(NinjaAPI):
    def get_openapi_schema(self, *, path_prefix: str | None = None, path_params: Any = None) -> Any:
        """Error responses are documented as ``application/problem+json``, as they are sent."""
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if int(status) >= 400 and "application/json" in content:
                        content[PROBLEM_CONTENT_TYPE] = content.pop("application/json")
        return schema


api = ConsoleAPI(
    title="Matrix OE console API",
    version="1",
    description=DESCRIPTION,
    auth=API_AUTH,
    urls_namespace="api-v1",
)
install_problem_handlers(api)
api.add_router("", router)
api.add_router("", evacuations_router)
api.add_router("", setup_router)


def public_urls(patterns: list[Any]) -> list[Any]:
    """Exempt the API's views from ``LoginRequiredMiddleware``: they answer 401 themselves, never the
    login page (the docs and the schema are readable by anyone, as the schema holds no data)."""
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            public_urls(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            login_not_required(pattern.callback)
    return patterns
