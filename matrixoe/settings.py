"""Console settings, read from environment variables with safe development defaults.

Secrets may also come from a file named by ``<NAME>_FILE`` (Docker/Kubernetes secrets).
"""

import ipaddress
import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dj_database_url
from csp.constants import NONCE, NONE, SELF
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str) -> str:
    file_path = os.environ.get(f"{name}_FILE")
    if file_path:
        return Path(file_path).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {value!r}")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_networks(name: str) -> list[str]:
    """Comma-separated IP addresses or networks ("10.0.0.2,192.168.0.0/24"), each checked."""
    networks = env_list(name, "")
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} takes IP addresses or networks (10.0.0.2, 192.168.0.0/24), not {network!r}"
            ) from None
    return networks


DEBUG = env_bool("DEBUG", False)
# No default: a key everyone can read signs everyone's sessions. `make run` generates one into
# var/secret-key (mode 0600) and passes SECRET_KEY_FILE.
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "SECRET_KEY is not set. Set SECRET_KEY (or SECRET_KEY_FILE, a file holding it) to a long random "
        "value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(50))'. `make run` does this "
        "for you (var/secret-key)."
    )
# Fernet keys (comma-separated; the first encrypts, all decrypt, for rotation) for the agent secrets
# stored in the database (vms.fields.EncryptedSecretField). `make run` generates one into var/.
SECRETS_ENCRYPTION_KEYS = env_list("SECRETS_ENCRYPTION_KEY", "")
if not SECRETS_ENCRYPTION_KEYS:
    raise ImproperlyConfigured(
        "SECRETS_ENCRYPTION_KEY is not set. Set it (or SECRETS_ENCRYPTION_KEY_FILE) to a Fernet key, e.g. "
        "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'. "
        "`make run` does this for you (var/secrets-encryption.key)."
    )
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "channels",
    "axes",
    "csp",
    "vms",
    "migrations_app",
    "evacuations",
    "ninja",  # serves Swagger UI for /api/v1/docs from its bundled static files (no CDN)
    "api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    # A refused migration request is kept in the history even when the request's transaction rolls back.
    "migrations_app.refusals.RecordRefusalsMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "matrixoe.error_views.FriendlyMethodNotAllowedMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks
]

# Login throttling (django-axes): after AXES_FAILURE_LIMIT failed logins for one username from one
# address, that pair is locked out for AXES_COOLOFF_MINUTES (HTTP 429); an admin can lift it in the admin.
# The pair, never the username alone: failures from one address cannot lock the account out from any
# other. The address is the client's own (REMOTE_ADDR, forwarded only by TRUSTED_PROXIES, see below).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    "vms.backends.HostGroupRoleBackend",  # a host-group role carries its rights' permissions
]
AXES_ENABLED = env_bool("AXES_ENABLED", True)
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"

ROOT_URLCONF = "matrixoe.urls"
ASGI_APPLICATION = "matrixoe.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "csp.context_processors.nonce",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str(
            "DATABASE_URL",
            f"sqlite:///{Path(os.environ.get('MATRIXOE_VAR_DIR') or BASE_DIR / 'var') / 'db.sqlite3'}",
        ),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Owner only: the database holds session keys, password hashes and encrypted agent secrets.
    Path(DATABASES["default"]["NAME"]).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Several processes (web, worker) share the file: wait for locks instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # No JIT: the console's queries are short, and PostgreSQL compiled the VSP list's aggregate over
    # 110,000 copies for 3 s of its 3.9 s (0.9 s without; bench/bench_pages.py --postgres, README).
    # An ``options`` given in DATABASE_URL (``?options=...``) wins.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("options", "-c jit=off")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "vms:vm_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "var" / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start without it
WHITENOISE_USE_FINDERS = True

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CHANNEL_LAYERS: dict[str, dict[str, Any]] = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [REDIS_URL],
            "prefix": env_str("CHANNELS_PREFIX", "matrixoe"),
            "capacity": 1000,
            "expiry": 30,
        },
    }
}

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A Redis restart or outage must not end a worker (soak bug 5, QA): it reconnects for as long as it takes
# (Celery's default gives up after 100 tries, minutes of outage, and the worker exits) ...
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# ... and a migration task keeps driving its migration meanwhile: its state is in the database, not in
# Redis (True, Celery 6's default, would cancel it on the lost connection and redeliver it).
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# A lost connection with unacknowledged tasks ended the worker inside kombu ("'NoneType' object has no
# attribute 'hostname'"): matrixoe/celery_consumer.py. Workers also run --without-gossip --without-mingle
# (WORKER_OPTIONS in scripts/run_console.py, README): gossip's stop fails the same way (celery/kombu#582).
CELERY_WORKER_CONSUMER = "matrixoe.celery_consumer:BrokerRestartSafeConsumer"
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "matrixoe")

SESSION_COOKIE_HTTPONLY = True
CSRF_FAILURE_VIEW = "matrixoe.error_views.csrf_failure"  # the friendly 403, problem+json under /api/
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

# --- HTTPS: set SERVED_OVER_HTTPS=true when browsers reach the console over https -----------------
# Cookies are then sent over https only, http redirects to https and HSTS tells browsers to stay there.
# Behind a TLS-terminating proxy, SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO=https (the header the
# proxy sets, and ONLY when the proxy strips it from clients' requests).
SERVED_OVER_HTTPS = env_bool("SERVED_OVER_HTTPS", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", SERVED_OVER_HTTPS)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", SERVED_OVER_HTTPS)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", SERVED_OVER_HTTPS)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if SERVED_OVER_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", SERVED_OVER_HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", SERVED_OVER_HTTPS)
# --- Reverse proxies: the only ones whose X-Forwarded-For / X-Forwarded-Proto are believed ------------
# Addresses or networks of the reverse proxies in front of the web processes; none by default. A request
# arriving from one of them has its client address (the login throttle's, the metrics allow-list's) and
# scheme taken from those headers (matrixoe/asgi.py); from anyone else they are ignored. The web server
# must leave the headers alone (uvicorn --no-proxy-headers: its default believes 127.0.0.1, and under
# `make run` every client is 127.0.0.1, so anyone could have named any address).
TRUSTED_PROXIES = env_networks("TRUSTED_PROXIES")
_proxy_header = env_str("SECURE_PROXY_SSL_HEADER", "")
if _proxy_header:
    _name, _, _value = _proxy_header.partition("=")
    if not _name.startswith("HTTP_") or not _value:
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER must look like HTTP_X_FORWARDED_PROTO=https, got {_proxy_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = (_name, _value)

# --- Content-Security-Policy (django-csp 4): scripts and styles from our own origin only --------------
# No inline script or style, no eval: htmx runs with allowEval and its indicator styles off (see
# templates/base.html); the progress websocket is same-origin ('self' covers ws:/wss: in CSP 3).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    # A refused or not-found request is one line, not a traceback (see matrixoe/log_filters.py).
    "filters": {"client_errors_on_one_line": {"()": "matrixoe.log_filters.ClientErrorsOnOneLine"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["client_errors_on_one_line"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # One line per agent request drowns the worker's log; failures are logged by the callers.
    "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
}

# Plain http:// agent addresses (the agent's secret in clear on the wire): refused unless this is on; on by
# default with DEBUG only. Never for a VSP with an agent certificate registered (vms.agent_address).
AGENT_PLAIN_HTTP_ALLOWED = env_bool("AGENT_PLAIN_HTTP_ALLOWED", DEBUG)
# Seconds the console waits for a host agent's answer (vms.agent_client); raise on a loaded machine.
AGENT_TIMEOUT_S = float(env_int("AGENT_TIMEOUT_S", 10))
# The migrate dialog asks every VSP's agent for its health when it opens, all at once, this long at most
# (seconds; 0: it trusts the last inventory collection).
MIGRATE_DIALOG_PROBE_TIMEOUT_S = 1.0

# --- online migrations (migrations_app; owned by the migration backend) ---------------------------------
# Sent to the source agent with every migration; the phase limits come from each VM.
MIGRATION_AGENT_PARAMS = {
    "downtime_ms": env_int("MIGRATION_DOWNTIME_MS", 300),
    "max_rounds": env_int("MIGRATION_MAX_ROUNDS", 30),
    "bandwidth_mbps": env_int("MIGRATION_BANDWIDTH_MBPS", 0) or None,
    # The default policy's no-progress limit (s): a phase with no byte moving this long is aborted; a
    # VM's policy or a migration's may set its own (migrations_app.migration_policy, ``no_progress_s``).
    "no_progress_s": env_int("MIGRATION_NO_PROGRESS_S", 150),
}
# Queue for run_migration tasks (empty: the default queue), so migrations can have workers of their own.
MIGRATION_QUEUE = env_str("MIGRATION_QUEUE", "") or None
# A migration whose worker showed no sign of life this long is decided by recover_migrations.
MIGRATION_HEARTBEAT_STALE_S = env_int("MIGRATION_HEARTBEAT_STALE_S", 30)
# "module:function" that maps the target's data-plane endpoint for the source (migrations_app/dataplane.py).
MIGRATION_DATA_ENDPOINT_HOOK = env_str("MIGRATION_DATA_ENDPOINT_HOOK", "")

# --- the broker's visibility timeout: long migrations are not handed out again (issue 18 item 12) -------
# With CELERY_TASK_ACKS_LATE a task's message stays unacknowledged in Redis while the task runs, and
# kombu's Redis transport hands a message out again once it has been unacknowledged for longer than
# ``visibility_timeout`` (1 hour by default; celery #5935): a migration running longer would be delivered
# to a second worker. The timeout is therefore set above the longest run:
#
#   visibility_timeout = MIGRATION_LONGEST_RUN_S + MIGRATION_HEARTBEAT_STALE_S
#
# where MIGRATION_LONGEST_RUN_S is the longest migration this site allows, Init to the end of the roll
# forward: the sum of the largest Init, Copy, I/O Quiesce and Frozen limits its VMs have, plus the roll
# forward (ROLL_FORWARD_ATTEMPTS agent calls, under a minute). The phase limits are per VM and Copy's is
# unlimited by default (the vendor's default), so no limit bounds that sum: a site sets it to what it
# allows. The default, 48 hours, is 30 pre-copy rounds (MIGRATION_MAX_ROUNDS) of a 512 GiB guest at
# 1 Gbit/s (30 x 4,398 s = 36.6 h) plus the default Init, I/O Quiesce and Frozen limits (85 s), rounded
# up. The heartbeat limit is the margin: a worker silent that long has lost its lease anyway.
# A delivery past the timeout still changes nothing: the task's claim of its migration is a
# compare-and-set on QUEUED (migrations_app.scheduling.do_claim_source), so a second delivery of a
# migration already claimed stands down (tests/migrations_app/test_redelivery.py). A lost task does
# not wait for the timeout either: recovery re-hands queued migrations and takes over silent ones.
MIGRATION_LONGEST_RUN_S = env_int("MIGRATION_LONGEST_RUN_S", 48 * 3600)
BROKER_VISIBILITY_TIMEOUT_S = env_int(
    "BROKER_VISIBILITY_TIMEOUT_S", MIGRATION_LONGEST_RUN_S + MIGRATION_HEARTBEAT_STALE_S
)
if BROKER_VISIBILITY_TIMEOUT_S < 1:
    raise ImproperlyConfigured(
        f"BROKER_VISIBILITY_TIMEOUT_S must be at least 1, got {BROKER_VISIBILITY_TIMEOUT_S}"
    )
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {
    "visibility_timeout": BROKER_VISIBILITY_TIMEOUT_S,
    # How often a worker looks for messages unacknowledged past the timeout (kombu: every
    # interval x throttle s, 100 s by default); a tenth of the timeout at most, so a short one (tests) works.
    "unacked_restore_interval": max(1, min(100, BROKER_VISIBILITY_TIMEOUT_S // 10)),
    "unacked_restore_throttle": 1,
}


# --- Redis through Sentinel (a deployment past one machine; README "Scaling out", deploy/) -------------
# Unset (the default): one Redis at REDIS_URL, as above. Set REDIS_SENTINELS to the Sentinels'
# addresses ("10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379") and both the channel layer
# (channels-redis: "sentinels" + "master_name" in its host entry) and the Celery broker (kombu:
# "sentinel://" URLs + "master_name" in the transport options) ask the Sentinels for the current
# master on every new connection, so a failover moves them to the promoted replica. REDIS_URL is not
# used then. No result backend is used (CELERY_RESULT_BACKEND is None), so none needs Sentinel.
#   REDIS_SENTINEL_MASTER            the name the Sentinels monitor the master by (default "matrixoe")
#   REDIS_PASSWORD[_FILE]            the password of the master and replicas (requirepass), if any
#   REDIS_SENTINEL_PASSWORD[_FILE]   the Sentinels' own password (their requirepass), if any
#   REDIS_DB                         the database number (default 0)


def env_host_ports(name: str) -> list[tuple[str, int]]:
    """``$name`` as a list of (host, port): "h1:26379,[::1]:26380"; ImproperlyConfigured on a bad entry."""
    addresses = []
    for entry in env_list(name, ""):
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(f"{name} must be a comma-separated list of host:port, got {entry!r}")
        addresses.append((host, int(port)))
    return addresses


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


REDIS_SENTINELS = env_host_ports("REDIS_SENTINELS")
if REDIS_SENTINELS:
    _master_name = env_str("REDIS_SENTINEL_MASTER", "matrixoe")
    _redis_password = env_str("REDIS_PASSWORD", "") or None
    _sentinel_password = env_str("REDIS_SENTINEL_PASSWORD", "") or None
    _redis_db = env_int("REDIS_DB", 0)
    if not _master_name:
        raise ImproperlyConfigured(
            "REDIS_SENTINEL_MASTER must not be empty (the Sentinels' name for the master)"
        )
    if _redis_db < 0:
        raise ImproperlyConfigured(f"REDIS_DB must be 0 or more, got {_redis_db}")
    _sentinel_kwargs = {"password": _sentinel_password} if _sentinel_password else {}
    CHANNEL_LAYERS["default"]["CONFIG"]["hosts"] = [
        {
            "sentinels": REDIS_SENTINELS,
            "master_name": _master_name,
            "sentinel_kwargs": {**_sentinel_kwargs, "socket_connect_timeout": 2, "socket_timeout": 2},
            "password": _redis_password,
            "db": _redis_db,
            # A master whose machine vanished (no reset): fail the call and ask the Sentinels again,
            # rather than wait on the dead connection. Above the layer's 5 s blocking read.
            "socket_connect_timeout": 5,
            "socket_timeout": 15,
            "socket_keepalive": True,
        }
    ]
    # The password, quoted, is the master's; every "sentinel://" address is a Sentinel to ask.
    _userinfo = f":{quote(_redis_password, safe='')}@" if _redis_password else ""
    CELERY_BROKER_URL = env_str(
        "CELERY_BROKER_URL",
        ";".join(
            f"sentinel://{_userinfo}{_url_host(host)}:{port}/{_redis_db}" for host, port in REDIS_SENTINELS
        ),
    )
    CELERY_BROKER_TRANSPORT_OPTIONS.update(
        master_name=_master_name,
        sentinel_kwargs={**_sentinel_kwargs, "socket_connect_timeout": 2, "socket_timeout": 2},
        # kombu: without a socket time-out a publish on a connection to a vanished master waits for ever.
        socket_connect_timeout=5,
        socket_timeout=15,
    )

# --- inventory collection (vms.inventory; vms.tasks.collect_inventory fans out one task per VSP) -----------
# Seconds between collections (beat); a VSP's task not started within one interval is dropped (expires).
INVENTORY_INTERVAL_S = float(env_int("INVENTORY_INTERVAL_S", 30))
# Seconds each step of one agent's inventory call may take (connect, TLS, answer): a dead agent costs one
# worker thread this long, never the other VSPs' collection.
INVENTORY_AGENT_TIMEOUT_S = float(env_int("INVENTORY_AGENT_TIMEOUT_S", 5))
# Collections a VSP's agent must leave unanswered in a row before the VSP is marked unreachable.
INVENTORY_UNREACHABLE_AFTER = env_int("INVENTORY_UNREACHABLE_AFTER", 3)
if INVENTORY_UNREACHABLE_AFTER < 1 or INVENTORY_AGENT_TIMEOUT_S < 1:
    raise ImproperlyConfigured("INVENTORY_UNREACHABLE_AFTER and INVENTORY_AGENT_TIMEOUT_S must be at least 1")
# Queue of the per-VSP collection tasks (empty: the default queue), so a worker with many threads can
# take them: `celery -A matrixoe worker -Q inventory --pool threads --concurrency 32`.
INVENTORY_QUEUE = env_str("INVENTORY_QUEUE", "") or None

# --- CELERY_BEAT_SCHEDULE (periodic tasks; run `celery -A matrixoe beat`) ---------------------------------
CELERY_BEAT_SCHEDULE = {
    "collect-inventory": {
        "task": "vms.tasks.collect_inventory",
        "schedule": INVENTORY_INTERVAL_S,
    },
    "recover-migrations": {
        "task": "migrations_app.tasks.recover_migrations",
        "schedule": float(env_int("RECOVERY_INTERVAL_S", 15)),
    },
    # Links of pairs with no migration yet measured before a Migrate dialog asks (link_probes).
    "probe-unmeasured-links": {
        "task": "migrations_app.tasks.probe_unmeasured_links",
        "schedule": float(env_int("LINK_SWEEP_INTERVAL_S", 60)),
    },
}

# --- REST API and metrics (api) ----------------------------------------------------------------------------
# Addresses or networks that may scrape /metrics without a token, e.g. "127.0.0.1,10.0.0.0/8": the client's
# own address (a forwarded one only from TRUSTED_PROXIES).
METRICS_ALLOWED_IPS = env_networks("METRICS_ALLOWED_IPS")
