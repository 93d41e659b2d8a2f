"""Production settings: required keys, `check --deploy`, login throttling, Content-Security-Policy.

The settings tests start real `manage.py` processes with the environment a deployment would give.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from tests.factories import PASSWORD, make_admin

BASE_DIR = Path(__file__).resolve().parent.parent
TEMPLATE_DIRS = [BASE_DIR / "templates", BASE_DIR / "vms" / "templates"]
INLINE = (r"<script(?![^>]*\bsrc=)[^>]*>", r"\son[a-z]+\s*=", r"\shx-on[:-]", r"\sstyle\s*=")
FERNET_KEY = "dGVzdC1vbmx5LWZlcm5ldC1rZXktMzItYnl0ZXMhISE="


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    dropped = ("SECRET", "DJANGO", "AXES", "MATRIXOE_TEST")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    env.update(
        DJANGO_SETTINGS_MODULE="matrixoe.settings",
        SECRET_KEY=secrets.token_urlsafe(50),
        SECRETS_ENCRYPTION_KEY=FERNET_KEY,
        ALLOWED_HOSTS="console.example.com",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        SERVED_OVER_HTTPS="true",
        STATIC_ROOT=str(tmp_path / "static"),
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "manage.py", *args]
    return subprocess.run(command, cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120)


def test_check_deploy_reports_nothing_under_production_settings(tmp_path):
    result = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize("missing", ["SECRET_KEY", "SECRETS_ENCRYPTION_KEY"])
def test_a_missing_key_stops_the_server_with_a_clear_message(tmp_path, missing):
    env = production_env(tmp_path)
    del env[missing]
    result = manage(env, "check")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and f"{missing} is not set" in result.stderr


def test_a_key_may_come_from_a_file(tmp_path):
    key_file = tmp_path / "secret-key"
    key_file.write_text(secrets.token_urlsafe(50))
    env = production_env(tmp_path, SECRET_KEY_FILE=str(key_file))
    del env["SECRET_KEY"]
    result = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr


def test_https_settings_follow_served_over_https_and_the_proxy_header_is_configurable(tmp_path):
    probe = (
        "from django.conf import settings as s;"
        "print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS,"
        " getattr(s, 'SECURE_PROXY_SSL_HEADER', None))"
    )
    plain = manage(production_env(tmp_path, SERVED_OVER_HTTPS="false"), "shell", "-v", "0", "-c", probe)
    assert plain.stdout.split() == ["False", "False", "0", "None"], plain.stderr
    behind_proxy = manage(
        production_env(tmp_path, SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO=https"),
        "shell",
        "-v",
        "0",
        "-c",
        probe,
    )
    assert behind_proxy.stdout.strip() == "True True 31536000 ('HTTP_X_FORWARDED_PROTO', 'https')"
    bad = manage(production_env(tmp_path, SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto"), "check")
    assert bad.returncode != 0 and "SECURE_PROXY_SSL_HEADER must look like" in bad.stderr


@pytest.mark.django_db
def test_repeated_wrong_passwords_lock_the_login_out(client, settings):
    settings.AXES_ENABLED = True
    admin = make_admin("locked-admin")
    for _ in range(settings.AXES_FAILURE_LIMIT):
        response = client.post("/login/", {"username": admin.username, "password": "wrong"})
        assert response.status_code in (200, 429)
    locked = client.post("/login/", {"username": admin.username, "password": PASSWORD})
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.text
    assert "_auth_user_id" not in client.session
    other = client.post("/login/", {"username": make_admin("other-admin").username, "password": PASSWORD})
    assert other.status_code == 302  # only the attacked username is locked
    assert User.objects.filter(username="locked-admin").exists()


@pytest.mark.django_db
def test_pages_carry_a_content_security_policy_without_unsafe_inline(client):
    client.force_login(make_admin())
    response = client.get("/vms/")
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    directives = dict(
        (name, rest.split())
        for name, _, rest in (d.strip().partition(" ") for d in policy.split(";"))
        if name
    )
    assert directives["script-src"][0] == "'self'"
    assert all(re.fullmatch(r"'nonce-[^']+'", source) for source in directives["script-src"][1:])
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert '"allowEval": false' in response.text and '"includeIndicatorStyles": false' in response.text


def test_no_template_has_inline_script_handler_or_style():
    found = []
    for directory in TEMPLATE_DIRS:
        for path in directory.rglob("*.html"):
            text = path.read_text()
            for pattern in INLINE:
                found += [f"{path.relative_to(BASE_DIR)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert found == []
