"""A redis-server of a test's own (``scripts/ensure_redis.py`` on a free port), for tests whose broker
settings or faults must not reach the Redis every other test run shares."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from devtools.processes import free_port, wait_until

BASE_DIR = Path(__file__).resolve().parent.parent


class PrivateRedis:
    """``scripts/ensure_redis.py`` on a port of its own (no password), started again on demand."""

    def __init__(self, var_dir: Path) -> None:
        self.url = f"redis://127.0.0.1:{free_port()}/0"
        self.env = {**os.environ, "MATRIXOE_VAR_DIR": str(var_dir), "REDIS_URL": self.url}
        self.env.pop("REDIS_URL_FILE", None)
        self.pid_file = var_dir / "redis.pid"

    def start(self) -> None:
        subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, env=self.env, check=True)

    def kill(self) -> None:
        pid = int(self.pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 20)
        self.pid_file.unlink()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
