"""The cluster profile (`make run-cluster`) started for real, for the fault tests across the deployment.

One cluster per module (its start-up is most of a module's time): the real `scripts/run_console.py
--cluster` in a process group of its own, with its own var/ directory and ports, its own PostgreSQL
server (``CLUSTER_POSTGRES=own``: the path a machine without one takes, and nothing shared with other
test runs), Sentinels that fail over within about two seconds, and the data plane capped so that a demo
migration lasts long enough to fail something under it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from devtools.cluster import MASTER_NAME, OwnPostgres
from devtools.processes import ManagedProcess, free_port, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent.parent
INHERITED_NOT = (
    "DJANGO_",
    "SECRET",
    "MATRIXOE_",
    "DEMO_",
    "AXES",
    "REDIS_",
    "CELERY_",
    "CHANNELS_",
    "DATABASE_",
)


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports from it."""
    for _ in range(100):
        base = free_port()
        if base + count < 65000 and all(port_free(base + index) for index in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """One run of the cluster profile and what a test needs of it."""

    def __init__(self, var_dir: Path, web: int = 2, workers: int = 2) -> None:
        self.var_dir = var_dir
        self.port = free_port_block(web + 1)
        self.database = f"matrixoe_cluster_test_{os.urandom(4).hex()}"
        self.postgres_port = free_port()
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(INHERITED_NOT)}
        self.env.update(
            MATRIXOE_VAR_DIR=str(var_dir),
            PORT=str(self.port),
            WEB_BASE_PORT=str(self.port + 1),
            AGENT_BASE_PORT=str(free_port_block(4)),
            MATRIXOE_REDIS_PORT=str(free_port_block(2)),
            SENTINEL_BASE_PORT=str(free_port_block(3)),
            CLUSTER_DATABASE_NAME=self.database,
            CLUSTER_POSTGRES="own",
            CLUSTER_POSTGRES_PORT=str(self.postgres_port),
            CLUSTER_SENTINEL_DOWN_AFTER_MS="1000",
            CLUSTER_SENTINEL_FAILOVER_TIMEOUT_MS="5000",
            METRICS_ALLOWED_IPS="127.0.0.1",  # each web process's /metrics, asked directly
            MIGRATION_BANDWIDTH_MBPS="40",  # 5 MB/s: a demo guest's Copy lasts seconds
            RECOVERY_INTERVAL_S="2",
            MIGRATION_HEARTBEAT_STALE_S="6",  # a killed worker's migration is decided within seconds
            AGENT_TIMEOUT_S="60",  # seeding the demo guests on a machine shared by several test runs
            PYTHONUNBUFFERED="1",
        )
        self.args = ["--cluster", "--web", str(web), "--workers", str(workers)]
        self.process: subprocess.Popen | None = None
        self.output = ""
        self.started_in_s: float | None = None
        self.repl: subprocess.Popen | None = None
        self.extra: list[
            ManagedProcess
        ] = []  # started by a test (a service it restarted): stopped at the end

    # --- life ------------------------------------------------------------------------------------

    def start(self, timeout: float = 300) -> None:
        started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "scripts/run_console.py", *self.args],
            cwd=BASE_DIR,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        assert wait_until(lambda: "started in" in self.output or self.process.poll() is not None, timeout)
        assert "started in" in self.output, self.output
        self.started_in_s = time.monotonic() - started

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.output += line

    def stop(self) -> None:
        if self.repl is not None:
            self.repl.stdin.close()
            self.repl.wait(timeout=30)
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for process in self.extra:
            process.stop()
        for pid in self.started():  # whatever a failure left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        own = OwnPostgres(self.var_dir / "cluster", self.postgres_port, "")
        if own.as_user:  # its data directory is outside var/ (under the postgres user's home)
            shutil.rmtree(own.data_dir, ignore_errors=True)

    def started(self) -> list[int]:
        tag = f"MATRIXOE_MAKE_RUN={self.var_dir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if tag in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    # --- what runs where -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> dict:
        return json.loads((self.var_dir / "cluster" / "cluster.json").read_text())

    def pid(self, name: str) -> int:
        return self.state["processes"][name]["pid"]

    def web_ports(self) -> dict[str, int]:
        return {
            name: item["port"] for name, item in self.state["processes"].items() if name.startswith("web-")
        }

    def watchers(self) -> dict[str, int]:
        """Live-progress sockets open on each web process (its own /metrics), by process name."""
        counts = {}
        for name, port in self.web_ports().items():
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                continue
            line = next(line for line in text.splitlines() if line.startswith("matrixoe_websocket_watchers "))
            counts[name] = int(float(line.split()[1]))
        return counts

    def restarted(self) -> list[str]:
        """Lines of the launcher saying a process exited and was started again (a crash)."""
        return [line for line in self.output.splitlines() if "starting it again" in line]

    def password(self, username: str) -> str:
        return (self.var_dir / f"{username}-password").read_text().strip()

    def sentinel(self, port: int) -> redis.Redis:
        password = (self.var_dir / "cluster" / "sentinel-password").read_text().strip()
        return redis.Redis(port=port, password=password, socket_timeout=2, decode_responses=True)

    def master_port(self) -> int:
        _host, port = self.sentinel(self.state["sentinel_ports"][0]).sentinel_get_master_addr_by_name(
            MASTER_NAME
        )
        return int(port)

    def console_env(self) -> dict[str, str]:
        lines = (self.var_dir / "cluster" / "console.env").read_text().splitlines()
        return {**self.env, **dict(line.split("=", 1) for line in lines if "=" in line)}

    def django(self, code: str) -> Any:
        """Run ``code`` in a Django process of the cluster (its database, its Redis through Sentinel:
        ``django_repl.py``); what the code assigns to ``result`` comes back (through JSON)."""
        if self.repl is None or self.repl.poll() is not None:
            self.repl = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("django_repl.py"))],
                cwd=BASE_DIR,
                env={**self.console_env(), "PYTHONPATH": str(BASE_DIR)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        self.repl.stdin.write(json.dumps(code) + "\n")
        self.repl.stdin.flush()
        answer = json.loads(self.repl.stdout.readline() or '{"error": "the Django process exited"}')
        assert "error" not in answer, answer["error"]
        return answer["result"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    run = Cluster(tmp_path_factory.mktemp("cluster") / "var")
    try:
        run.start()
        print(f"\ncluster profile started in {run.started_in_s:.1f} s")
        yield run
    finally:
        run.stop()
