"""The files of deploy/ (the reference deployment on many machines) are valid for the tools that read
them: systemd (``systemd-analyze verify``, offline), HAProxy (``haproxy -c``) and Redis Sentinel (a real
``redis-sentinel`` started on the example).

``systemd-analyze verify`` also checks that each unit's programs exist, so it runs against a root
directory of the test's own holding the unit files and a stand-in for each program (the deployment's
paths, /opt/matrixoe/.venv/bin/python, do not exist here); every warning it prints fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from devtools import pki
from devtools.processes import free_port, start_process, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent
DEPLOY = BASE_DIR / "deploy"
UNITS = {  # unit file: the name systemd is asked about (templates with an instance)
    "matrixoe-web@.service": "matrixoe-web@8001.service",
    "matrixoe-worker@.service": "matrixoe-worker@1.service",
    "matrixoe-beat.service": "matrixoe-beat.service",
    "matrixoe-agent.service": "matrixoe-agent.service",
}


def tool(name: str, *fallbacks: str) -> str:
    for candidate in (shutil.which(name), *fallbacks):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip(f"{name} not found: scripts/install_cluster_packages.sh (and `apt-get install systemd`)")


@pytest.fixture
def unit_root(tmp_path) -> Path:
    """A root directory with deploy/systemd's units installed and a stand-in for each program they run."""
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    for unit in (DEPLOY / "systemd").glob("*.service"):
        shutil.copy(unit, units)
        for program in re.findall(r"^ExecStart=(\S+)", unit.read_text(), re.MULTILINE):
            stand_in = root / program.lstrip("/")
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
    return root


def test_every_unit_file_is_tested():
    assert sorted(path.name for path in (DEPLOY / "systemd").glob("*.service")) == sorted(UNITS)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_systemd_finds_nothing_wrong_in_the_unit(unit_root, unit):
    analyze = tool("systemd-analyze")
    options = ["--root", str(unit_root), "--recursive-errors=no", "--man=no", "--generators=no"]
    result = subprocess.run(
        [analyze, "verify", *options, UNITS[unit]], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_would_report_a_mistake(unit_root):
    """The check above can fail: a misspelt directive in a unit is reported."""
    analyze = tool("systemd-analyze")
    unit = unit_root / "etc" / "systemd" / "system" / "matrixoe-beat.service"
    unit.write_text(unit.read_text().replace("RestartSec=1", "RestartSecs=1"))
    options = ["--root", str(unit_root), "--recursive-errors=no", "--man=no", "--generators=no"]
    result = subprocess.run(
        [analyze, "verify", *options, unit.name], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'RestartSecs'" in result.stderr


def test_haproxy_accepts_the_example_configuration(tmp_path):
    haproxy = tool("haproxy", "/usr/sbin/haproxy")
    certificate = tmp_path / "console.pem"
    issued = pki.ensure_agent_cert(tmp_path / "pki", "console", ("console.example.com",))
    certificate.write_bytes(issued.cert.read_bytes() + issued.key.read_bytes())
    config = tmp_path / "haproxy.cfg"
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    config.write_text(text.replace("/etc/haproxy/console.pem", str(certificate)))
    result = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALERT" not in result.stdout + result.stderr and "WARNING" not in result.stdout + result.stderr


def test_redis_sentinel_runs_the_example_configuration(tmp_path):
    """The example, moved to loopback and a free port (Sentinel refuses nothing at parse time that it
    would accept at run time), monitors the master it names."""
    sentinel = tool("redis-sentinel")
    port = free_port()
    text = (DEPLOY / "redis" / "sentinel.conf").read_text()
    text = text.replace("port 26379", f"port {port}").replace("bind 10.0.2.1 127.0.0.1", "bind 127.0.0.1")
    text = text.replace("supervised systemd", "supervised no").replace("/var/lib/redis", str(tmp_path))
    text = text.replace("/var/log/redis/redis-sentinel.log", str(tmp_path / "sentinel.log"))
    config = tmp_path / "sentinel.conf"
    config.write_text(text)
    process = start_process("sentinel", [sentinel, str(config)], tmp_path / "stdout.log")
    try:
        password = "CHANGE-ME-sentinel-password"  # noqa: S105 - the example's placeholder
        client = redis.Redis(port=port, password=password, decode_responses=True)

        def monitors() -> bool:
            try:
                return client.sentinel_master("matrixoe")["quorum"] == 2
            except redis.RedisError:
                return False

        assert wait_until(monitors, 20), (tmp_path / "sentinel.log").read_text(errors="replace")
        master = client.sentinel_master("matrixoe")
        assert (master["ip"], master["port"], master["down-after-milliseconds"]) == ("10.0.2.1", 6379, 5000)
    finally:
        process.stop()
