"""The CLI's tests share the API's live console (server, migration worker, host agents)."""

from tests.api.conftest import (  # noqa: F401  (fixtures)
    _session_migration_worker,
    fleet,
    host_agents,
    live_console,
    wait_for,
)
