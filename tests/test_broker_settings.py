"""How the console reaches Redis, from the environment a deployment gives: the broker's visibility
timeout (issue 18 item 12).

Each case starts a real Python process with ``matrixoe.settings`` and that environment and reads what
Celery was configured with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
FERNET_KEY = "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMhISE="
SHOW = """
import json
from matrixoe.celery import app
print(json.dumps({"broker_transport_options": app.conf.broker_transport_options}))
"""


def configured(**environment: str) -> subprocess.CompletedProcess:
    dropped = ("SECRET", "DJANGO", "MATRIXOE_TEST", "BROKER_", "MIGRATION_", "REDIS_", "CELERY_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    env.update(
        DJANGO_SETTINGS_MODULE="matrixoe.settings", SECRET_KEY="k" * 50, SECRETS_ENCRYPTION_KEY=FERNET_KEY
    )
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", SHOW], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def celery_conf(**environment: str) -> dict:
    result = configured(**environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_visibility_timeout_is_above_the_longest_migration_the_site_allows():
    options = celery_conf()["broker_transport_options"]
    assert options["visibility_timeout"] == 48 * 3600 + 30  # MIGRATION_LONGEST_RUN_S + the heartbeat limit
    assert options["visibility_timeout"] > 3600  # kombu's default, which a long migration outlived

    options = celery_conf(MIGRATION_LONGEST_RUN_S="7200", MIGRATION_HEARTBEAT_STALE_S="60")[
        "broker_transport_options"
    ]
    assert options["visibility_timeout"] == 7260


def test_a_bad_visibility_timeout_stops_the_process_with_a_clear_message():
    for value in ("0", "soon"):
        result = configured(BROKER_VISIBILITY_TIMEOUT_S=value)
        assert result.returncode != 0
        assert "ImproperlyConfigured: BROKER_VISIBILITY_TIMEOUT_S must be" in result.stderr
