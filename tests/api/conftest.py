"""Fixtures for the REST API: users with and without write permissions, their tokens, a client per user."""

from __future__ import annotations

import pytest
from django.test import Client

from api.tokens import do_create_token
from tests.factories import VIEW_PERMISSIONS, make_user

MIGRATION_VIEW = ("migrations_app.view_migration", "migrations_app.view_migrationevent")
# What the demo 'viewer' has: view permissions only.
READ_ONLY = VIEW_PERMISSIONS + MIGRATION_VIEW
WRITER = READ_ONLY + (
    "vms.change_virtualmachine",
    "vms.change_registration",
    "migrations_app.add_migration",
    "migrations_app.change_migration",
)


class ApiClient:
    """Django's test client with a bearer token on every request; JSON in and out."""

    def __init__(self, token: str | None) -> None:
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, **params):
        return self.client.get(f"/api/v1{path}", params, headers=self.headers)

    def post(self, path: str, body: dict | None = None, headers: dict | None = None):
        return self.client.post(
            f"/api/v1{path}",
            body or {},
            content_type="application/json",
            headers={**self.headers, **(headers or {})},
        )

    def patch(self, path: str, body: dict):
        return self.client.patch(
            f"/api/v1{path}", body, content_type="application/json", headers=self.headers
        )

    def put(self, path: str, body: dict):
        return self.client.put(f"/api/v1{path}", body, content_type="application/json", headers=self.headers)


@pytest.fixture
def writer():
    return make_user("alice", permissions=WRITER)


@pytest.fixture
def reader():
    return make_user("olga", permissions=READ_ONLY)


@pytest.fixture
def api(writer) -> ApiClient:
    return ApiClient(do_create_token(writer, "tests")[1])


@pytest.fixture
def read_only_api(reader) -> ApiClient:
    return ApiClient(do_create_token(reader, "tests")[1])


@pytest.fixture
def anonymous_api() -> ApiClient:
    return ApiClient(None)


# --- a live console: real server, a real worker on the migrations' own queue, real host agents --------------

from tests.conftest import start_console_server  # noqa: E402
from tests.migrations_app.conftest import (  # noqa: E402, F401  (fixtures shared with the migration tests)
    _session_migration_worker,
    fleet,
    host_agents,
    migration_worker,
    wait_for,
)


@pytest.fixture(scope="module")
def live_console(django_db_setup, redis_url, _session_migration_worker):  # noqa: F811
    """Base URL of a uvicorn server whose migrations go to the bandwidth-capped migration worker."""
    queue, _worker = _session_migration_worker
    server, base_url = start_console_server(MIGRATION_QUEUE=queue)
    yield base_url
    server.stop()
