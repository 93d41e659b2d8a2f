"""`make run` stops what it started, always (issue 10 item 3).

Runs the real `scripts/run_console.py` (Redis of the test run, four simulated host agents, uvicorn,
Celery worker and beat) in a process group of its own, with its own var/ directory and ports,
and signals it as a terminal's second Ctrl-C, a service manager or a CI job would.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from devtools.processes import free_port, wait_until

pytestmark = pytest.mark.faults

BASE_DIR = Path(__file__).resolve().parent.parent


def free_port_block(count: int) -> int:
    """A base port with ``count`` free ports from it."""
    for _ in range(50):
        base = free_port()
        if base + count < 65000 and all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class MakeRun:
    def __init__(self, var_dir: Path, redis_url: str) -> None:
        self.var_dir = var_dir
        self.port = free_port()
        self.agent_base = free_port_block(4)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DJANGO_", "SECRET", "MATRIXOE_TEST", "DEMO_", "AXES"))
        }
        suffix = os.urandom(4).hex()
        self.env.update(
            MATRIXOE_VAR_DIR=str(var_dir),
            PORT=str(self.port),
            AGENT_BASE_PORT=str(self.agent_base),
            REDIS_URL=redis_url,
            CELERY_QUEUE=f"make-run-test-{suffix}",
            CHANNELS_PREFIX=f"make-run-test-{suffix}",
            AGENT_TIMEOUT_S="60",  # seeding the demo guests on a machine shared by several test runs
        )
        self.process: subprocess.Popen | None = None
        self.output = ""

    def start(self, timeout: float = 180) -> None:
        self.output = ""
        self.process = subprocess.Popen(
            [sys.executable, "scripts/run_console.py"],
            cwd=BASE_DIR,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        assert wait_until(
            lambda: "Matrix OE console:" in self.output or self.process.poll() is not None, timeout
        )
        assert "Matrix OE console:" in self.output, self.output

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.output += line

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

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def ports(self) -> list[int]:
        return [self.port, *(self.agent_base + i for i in range(4))]


@pytest.fixture
def make_run(tmp_path, redis_url):
    run = MakeRun(tmp_path / "var", redis_url)
    yield run
    for pid in run.started():  # whatever a failed assertion left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kept_secrets(var_dir: Path) -> dict[str, str]:
    names = ("secret-key", "secrets-encryption.key", "admin-password", "viewer-password")
    for name in names:
        assert stat.S_IMODE((var_dir / name).stat().st_mode) == 0o600, name
    return {name: (var_dir / name).read_text() for name in names}


def test_two_sigterms_in_quick_succession_stop_everything_gracefully_and_make_run_starts_again(make_run):
    """QA: a SIGTERM to `make run`'s process group reaches run_console twice (the group's, and make's
    own passed on to its recipe); it was counted as a second signal and killed everything at once."""
    make_run.start()
    assert len(make_run.started()) >= 7  # four agents, worker, beat, web server
    first_secrets = kept_secrets(make_run.var_dir)
    assert first_secrets["admin-password"].strip() in make_run.output  # printed on the first run

    make_run.signal_group(signal.SIGTERM)
    time.sleep(0.05)
    make_run.signal_group(signal.SIGTERM)

    make_run.process.wait(timeout=60)
    assert "Traceback" not in make_run.output and "KeyboardInterrupt" not in make_run.output, make_run.output
    assert "stopped." in make_run.output
    assert "stopping faster" not in make_run.output, make_run.output  # one request: a graceful stop
    assert wait_until(lambda: not make_run.started(), 10), make_run.started()
    assert all(port_free(port) for port in make_run.ports())

    make_run.start()  # the same ports, the same var/: it starts again
    assert "password unchanged" in make_run.output
    assert kept_secrets(make_run.var_dir) == first_secrets  # generated once, then reused
    make_run.signal_group(signal.SIGINT)
    make_run.process.wait(timeout=60)
    assert wait_until(lambda: not make_run.started(), 10)


def test_a_repeated_sigterm_is_the_same_request_and_a_second_ctrl_c_hurries():
    """The stop signal handler itself (the signals above may coalesce under load, so this is exact)."""
    spec = importlib.util.spec_from_file_location("run_console", BASE_DIR / "scripts" / "run_console.py")
    run_console = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_console)

    with pytest.raises(KeyboardInterrupt):
        run_console.on_stop_signal(signal.SIGTERM, None)  # the process group's copy: stop
    run_console.on_stop_signal(signal.SIGTERM, None)  # make's copy of the same SIGTERM
    assert not run_console.hurry.is_set()
    run_console.on_stop_signal(signal.SIGINT, None)  # Ctrl-C while stopping
    assert run_console.hurry.is_set()


def test_a_make_run_replaces_what_a_killed_make_run_left_running(make_run):
    make_run.start()
    os.kill(make_run.process.pid, signal.SIGKILL)  # no clean-up at all: agents, worker, web stay up
    make_run.process.wait(timeout=10)
    left = make_run.started()
    assert len(left) >= 7

    make_run.start()
    assert "left running by an earlier make run" in make_run.output
    assert not set(left) & set(make_run.started())
    make_run.signal_group(signal.SIGTERM)
    make_run.process.wait(timeout=60)
    assert wait_until(lambda: not make_run.started(), 10)


def test_a_worker_that_exits_is_started_again(make_run):
    """A worker that exits anyway (soak bug 5 was a Redis restart: ``test_worker_redis_restart.py``) is
    started again by ``make run``, as a service manager would. It is killed here (SIGKILL)."""
    make_run.start()
    before = set(make_run.started())
    worker = next(pid for pid in before if "celery" in command_of(pid) and " worker " in command_of(pid))

    os.kill(worker, signal.SIGKILL)

    def new_worker() -> bool:
        return any(" worker " in command_of(pid) for pid in set(make_run.started()) - before)

    assert wait_until(new_worker, 60), make_run.output
    assert "worker exited (status -9); starting it again" in make_run.output
    assert make_run.process.poll() is None  # the console keeps running
    make_run.signal_group(signal.SIGTERM)
    make_run.process.wait(timeout=60)
    assert wait_until(lambda: not make_run.started(), 10), make_run.started()  # the new one stopped too


def command_of(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def umask_of(pid: int) -> int | None:
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)


def readable_by_others(var_dir: Path) -> list[str]:
    """Everything under ``var_dir`` (itself included) that anyone but its owner may read or enter."""
    found = []
    for path in [var_dir, *var_dir.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
            found.append(f"{path.relative_to(var_dir.parent)} {stat.S_IMODE(mode):o}")
    return found


def test_var_and_everything_in_it_are_its_owners_only_also_what_is_written_later(make_run):
    """QA (issue 18 item 16): `make run` created var/ 0755 and the SQLite database 0644, with live
    session keys in it (a local user took over a logged-in admin's session), password hashes and
    encrypted agent secrets. An earlier run's files are narrowed too."""
    make_run.var_dir.mkdir(mode=0o755)
    make_run.var_dir.chmod(0o755)
    earlier = make_run.var_dir / "logs" / "web.log"
    earlier.parent.mkdir(mode=0o755)
    earlier.write_text("an earlier run's log\n")
    earlier.chmod(0o644)

    make_run.start()
    # Written now, by the running processes: a login (a session row in the database, its journal).
    with httpx.Client(base_url=f"http://127.0.0.1:{make_run.port}") as browser:
        page = browser.get("/login/")
        token = page.text.split('name="csrfmiddlewaretoken" value="', 1)[1].split('"', 1)[0]
        password = (make_run.var_dir / "admin-password").read_text().strip()
        form = {"username": "admin", "password": password, "csrfmiddlewaretoken": token}
        assert browser.post("/login/", data=form).status_code == 302

    names = {path.name for path in make_run.var_dir.rglob("*")}
    assert {"db.sqlite3", "secret-key", "admin-password", "ca.key", "web.log"} <= names
    assert readable_by_others(make_run.var_dir) == []
    started = make_run.started()
    assert len(started) >= 7 and {umask_of(pid) for pid in started} == {0o077}  # later files too
    make_run.signal_group(signal.SIGTERM)
    make_run.process.wait(timeout=60)
    assert wait_until(lambda: not make_run.started(), 10)
