"""How the console reaches Redis, from the environment a deployment gives: one Redis, or Redis through
Sentinel (issue 22 item 1), and the broker's visibility timeout (issue 18 item 12).

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
SENTINEL_PASSWORD = "sentinel-" + "secret"  # a test value
FERNET_KEY = "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMhISE="
SHOW = """
import json
from django.conf import settings
from matrixoe.celery import app
print(json.dumps({
    "broker_url": app.conf.broker_url,
    "broker_transport_options": app.conf.broker_transport_options,
    "channel_layer_hosts": settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"],
}))
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


def test_one_redis_by_default():
    conf = celery_conf(REDIS_URL="redis://:pw@10.0.0.9:6390/2")
    assert conf["broker_url"] == "redis://:pw@10.0.0.9:6390/2"
    assert conf["channel_layer_hosts"] == ["redis://:pw@10.0.0.9:6390/2"]
    assert "master_name" not in conf["broker_transport_options"]


def test_redis_through_sentinel_for_the_channel_layer_and_the_broker(tmp_path):
    (tmp_path / "redis-password").write_text("p@ss/word\n")
    conf = celery_conf(
        REDIS_SENTINELS="10.0.0.1:26379, 10.0.0.2:26380,[fd00::3]:26381",
        REDIS_SENTINEL_MASTER="console",
        REDIS_PASSWORD_FILE=str(tmp_path / "redis-password"),
        REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD,
        REDIS_DB="3",
        REDIS_URL="redis://not-used:6379/0",
    )
    assert conf["broker_url"] == (
        "sentinel://:p%40ss%2Fword@10.0.0.1:26379/3;sentinel://:p%40ss%2Fword@10.0.0.2:26380/3;"
        "sentinel://:p%40ss%2Fword@[fd00::3]:26381/3"
    )
    options = conf["broker_transport_options"]
    assert options["master_name"] == "console"
    assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
    assert options["visibility_timeout"] == 48 * 3600 + 30
    [host] = conf["channel_layer_hosts"]
    assert host["sentinels"] == [["10.0.0.1", 26379], ["10.0.0.2", 26380], ["fd00::3", 26381]]
    assert (host["master_name"], host["password"], host["db"]) == ("console", "p@ss/word", 3)
    assert host["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD


def test_the_broker_url_parses_back_to_the_sentinels_and_the_password():
    from kombu import Connection

    url = "sentinel://:p%40ss%2Fword@10.0.0.1:26379/3;sentinel://:p%40ss%2Fword@10.0.0.2:26380/3"
    connection = Connection(url, transport_options={"master_name": "console"})
    assert connection.alt == url.split(";")
    assert (connection.hostname, connection.port, connection.password) == ("10.0.0.1", 26379, "p@ss/word")
    assert connection.virtual_host == "3"


def test_bad_sentinel_settings_stop_the_process_with_a_clear_message():
    for environment, message in (
        ({"REDIS_SENTINELS": "10.0.0.1"}, "REDIS_SENTINELS must be a comma-separated list of host:port"),
        (
            {"REDIS_SENTINELS": "10.0.0.1:70000"},
            "REDIS_SENTINELS must be a comma-separated list of host:port",
        ),
        ({"REDIS_SENTINELS": "10.0.0.1:26379", "REDIS_DB": "x"}, "REDIS_DB must be an integer"),
        (
            {"REDIS_SENTINELS": "10.0.0.1:26379", "REDIS_SENTINEL_MASTER": ""},
            "REDIS_SENTINEL_MASTER must not",
        ),
    ):
        result = configured(**environment)
        assert result.returncode != 0, environment
        assert f"ImproperlyConfigured: {message}" in result.stderr, result.stderr
