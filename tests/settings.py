"""Settings for the test run and for the server/worker subprocesses the tests start.

The test database lives in a file (SQLite) or a named PostgreSQL database so that
subprocesses (ASGI server, Celery worker) see what the tests write. Subprocesses
get ``MATRIXOE_TEST_SUBPROCESS=1`` and open the test database directly.
``TEST_DATABASE=postgres`` runs everything on PostgreSQL (``TEST_POSTGRES_URL``).
"""

import os
import uuid

# Fixed keys for tests only (the server refuses to start without them); set before the import so the
# subprocesses the tests start (which inherit the environment) use the same ones.
os.environ.setdefault("SECRET_KEY", "test-secret-key-" + "x" * 50)
os.environ.setdefault("SECRETS_ENCRYPTION_KEY", "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMhISE=")

from matrixoe.settings import *  # noqa: E402, F403
from matrixoe.settings import BASE_DIR, CHANNEL_LAYERS, DATABASES, REDIS_URL  # noqa: E402

RUN_ID = os.environ.setdefault("MATRIXOE_TEST_RUN_ID", uuid.uuid4().hex[:8])
IN_SUBPROCESS = os.environ.get("MATRIXOE_TEST_SUBPROCESS") == "1"
TEST_POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/matrixoe")

if os.environ.get("TEST_DATABASE") == "postgres":
    import dj_database_url

    DATABASES = {"default": dj_database_url.parse(TEST_POSTGRES_URL)}
    _test_name = f"test_matrixoe_{RUN_ID}"
    DATABASES["default"]["TEST"] = {"NAME": _test_name}
else:
    (BASE_DIR / "var").mkdir(exist_ok=True)
    _test_name = str(BASE_DIR / "var" / f"test-{RUN_ID}.sqlite3")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _test_name,
            "TEST": {"NAME": _test_name},
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }
if IN_SUBPROCESS:
    DATABASES["default"]["NAME"] = _test_name

DEBUG = False
# Tests log in hundreds of times (some with wrong passwords on purpose); the lockout test turns it on.
AXES_ENABLED = os.environ.get("AXES_ENABLED", "false") == "true"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
# Stand-in agents and listeners of many tests speak plain http (no certificate registered); the tests of
# the refusal (tests/vms/test_agent_address.py) turn it off, as production has it.
AGENT_PLAIN_HTTP_ALLOWED = os.environ.get("AGENT_PLAIN_HTTP_ALLOWED", "true") == "true"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests only

# Private queue and channel prefix: a worker left over from another run never takes these tasks.
CELERY_TASK_DEFAULT_QUEUE = f"matrixoe-test-{RUN_ID}"
CHANNEL_LAYERS = {
    "default": {
        **CHANNEL_LAYERS["default"],
        "CONFIG": {**CHANNEL_LAYERS["default"]["CONFIG"], "prefix": f"matrixoe-test-{RUN_ID}"},
    }
}
REDIS_URL = REDIS_URL
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
