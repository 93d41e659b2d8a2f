"""The cluster profile's Redis set (``devtools.cluster.RedisSet``) on its own: a master, a replica and
three Sentinels from Debian's packages, on free ports.

- Each server keeps the environment it was started with readable in /proc: that is how a second
  `make run-cluster` finds and stops what a killed one left running (Redis rewrote it with its process
  title, so a killed launcher's Redis servers survived the next start).
- The Sentinels find each other and the replica, and every file holding a password stays its owner's
  only, also once the Sentinels have rewritten their configurations.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from devtools.cluster import ClusterError, RedisSet, program
from devtools.processes import ManagedProcess, free_port, stop_all, wait_until

MARKER = "MATRIXOE_MAKE_RUN"


@pytest.fixture
def redis_set(tmp_path, monkeypatch) -> RedisSet:
    try:
        program("redis-server")
        program("redis-sentinel")
    except ClusterError as missing:
        pytest.skip(str(missing))
    monkeypatch.setenv(MARKER, str(tmp_path))  # what run_console.py gives every process it starts
    return RedisSet(
        directory=tmp_path / "cluster",
        master_port=free_port(),
        replica_port=free_port(),
        sentinel_ports=[free_port() for _ in range(3)],
        password="redis-" + os.urandom(8).hex(),
        sentinel_password="sentinel-" + os.urandom(8).hex(),
    )


def test_the_servers_stay_findable_and_their_files_private(redis_set, tmp_path):
    started: list[ManagedProcess] = []
    try:
        redis_set.start(tmp_path / "logs", started)
        assert wait_until(redis_set.ready, 30), "the Sentinels did not find each other and the replica"
        assert redis_set.master_port_now() == redis_set.master_port
        tag = f"{MARKER}={tmp_path}".encode()
        for process in started:
            environ = Path(f"/proc/{process.process.pid}/environ").read_bytes().split(b"\0")
            assert tag in environ, f"{process.name} lost its environment marker"
        for path in redis_set.directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path.name} is readable by others"
        assert any(path.name.startswith("sentinel-") for path in redis_set.directory.iterdir())
    finally:
        stop_all(started)
