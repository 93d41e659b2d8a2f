"""`make run`: start everything the console needs on one machine, then wait.

1. A Redis on REDIS_URL (started without root when none answers).
2. Four demo host agents on loopback (simulated guests, QEMU with --hosts qemu, or libvirt with --hosts
   libvirt: four libvirt daemons on this machine first, as root, ``devtools.libvirt_demo``), while the
   database schema is written; then an admin and a read-only viewer login.
3. The demo fleet registered with those agents, its guests defined on them (with libvirt: as domains
   defined in the daemons, which the agents adopt).
4. The ASGI server (pages + websockets), a Celery worker and Celery beat.
With --cluster (`make run-cluster`), step 1 is PostgreSQL and Redis with a replica and three Sentinels,
and step 4 several web processes behind HAProxy, several workers and beat (``ClusterProfile``).
Ctrl-C (or SIGTERM) stops them all; the clean-up cannot be interrupted: a second Ctrl-C only
hurries it (what has not ended is killed). SIGTERM never hurries it: a SIGTERM to `make run`'s process
group reaches this process twice (once from the group, once passed on by make), and one SIGTERM must
mean a graceful stop. A host agent that stops only shows as unreachable in
the console; the web server stopping stops everything, a worker or beat that exits is started again
(up to 5 times a minute; a Redis restart no longer ends the worker: see WORKER_OPTIONS). Every
started process carries MATRIXOE_MAKE_RUN=<var dir> in its environment; what an earlier `make run`
left running (it was killed with SIGKILL, say) is found by that and stopped before its replacement
starts, and a port held by anything else is named with what to do.

var/ is its owner's only (0700, files 0600, the umask of every process started here 077), and
secrets are generated once into it and reused: the Django SECRET_KEY, the key that
encrypts agent secrets in the database, the password of the Redis started here, and the first
admin and viewer passwords (printed on the first run only). So is the demo's small PKI in
var/pki/ (devtools/pki.py): a CA and one certificate per host agent (keys 0600); the agents serve
HTTPS and a mutual-TLS data plane with them, and each demo VSP registers its agent's fingerprint.

Several consoles can share one Redis: each gets a Celery queue and a Channels prefix
named after its port unless CELERY_QUEUE / CHANNELS_PREFIX say otherwise.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from devtools import cluster as cluster_services  # noqa: E402
from devtools import libvirt_demo  # noqa: E402
from devtools.cluster import ClusterError  # noqa: E402
from devtools.libvirt_hosts import LibvirtHostError, LibvirtHosts  # noqa: E402
from devtools.local_secrets import secret_file, token, use_local_secrets  # noqa: E402
from devtools.processes import (  # noqa: E402
    ManagedProcess,
    start_agent,
    start_console_server,
    start_process,
    stop_all,
    write_secret_file,
)

VAR_DIR = Path(os.environ.get("MATRIXOE_VAR_DIR") or BASE_DIR / "var")
SECRETS_DIR = VAR_DIR / "agent-secrets"
PKI_DIR = VAR_DIR / "pki"  # the demo's CA and one certificate per agent (devtools.pki), reused
LOG_DIR = VAR_DIR / "logs"
REDIS_PORT = int(os.environ.get("MATRIXOE_REDIS_PORT", "6380"))
DEMO_HOSTS = ("vsp1", "vsp2", "vsp3", "vsp4")
AGENT_BASE_PORT = int(os.environ.get("AGENT_BASE_PORT", "7101"))
PYTHON = sys.executable


def manage(*args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], cwd=BASE_DIR, check=True)


def agent_secret_file(name: str) -> Path:
    SECRETS_DIR.mkdir(parents=True, exist_ok=True)
    path = SECRETS_DIR / f"{name}.secret"
    if not path.exists():
        write_secret_file(path)
    return path


# -- stopping: idempotent, uninterruptible, a second Ctrl-C only hurries -------------------------

stopping = False
hurry = threading.Event()


def on_stop_signal(signum: int, frame: object) -> None:
    """First SIGINT/SIGTERM: leave the main flow (KeyboardInterrupt) for the clean-up. A later SIGINT
    (a second Ctrl-C) only sets ``hurry``; a later SIGTERM is the same request again (GNU make passes
    its SIGTERM on to its recipe, which the process group's SIGTERM reached already) and is ignored.
    Neither raises inside the clean-up."""
    global stopping
    if stopping:
        if signum != signal.SIGINT:
            return
        if not hurry.is_set():
            print("\nstopping faster: killing what has not ended yet...", flush=True)
        hurry.set()
        return
    stopping = True
    raise KeyboardInterrupt


def stop_everything(*groups: list[ManagedProcess]) -> None:
    """Stop each group in turn (the cluster profile's services after the processes that use them)."""
    global stopping
    stopping = True  # from here on a signal only hurries
    failed: list[Exception] = []
    for group in groups:
        try:
            stop_all(group, timeout=10, hurry=hurry)
        except Exception as error:  # noqa: PERF203 - the next group must stop all the same
            failed.append(error)
    for pid in own_processes():  # a child whose start was cut short by the signal, before it was listed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if failed:
        raise failed[0]


# -- leftovers: processes a previous `make run` (with this var/) started and did not stop --------
# Every process started here inherits MATRIXOE_MAKE_RUN=<var dir>; that, not a name or a port,
# is what makes a process "ours".

MARKER = "MATRIXOE_MAKE_RUN"


def environ_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def own_processes() -> list[int]:
    """Pids (not ours, not our children's) carrying this var dir's MATRIXOE_MAKE_RUN marker."""
    tag = f"{MARKER}={VAR_DIR}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if tag in environ_of(int(entry.name)).split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_leftovers() -> None:
    """Stop what an earlier `make run` left running (SIGTERM, then SIGKILL after 10 s).

    Exits with what to do when another `make run` with this var/ is still running.
    """
    leftovers = own_processes()
    for pid in leftovers:
        if "run_console.py" in command_line(pid):
            sys.exit(
                f"another make run (pid {pid}) is running with {VAR_DIR}. Stop it first (Ctrl-C in its "
                f"terminal, or kill {pid}), or give this one its own MATRIXOE_VAR_DIR, PORT and "
                "AGENT_BASE_PORT."
            )
    if not leftovers:
        return
    print(f"stopping {len(leftovers)} process(es) left running by an earlier make run: {leftovers}")
    for signum, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in own_processes():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if wait_for(lambda: not own_processes(), wait_s):
            return


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_free_port(port: int, what: str, variable: str) -> None:
    if not wait_for(lambda: port_is_free(port), 5.0):
        sys.exit(
            f"port {port} (for {what}) is in use by a program this make run did not start. Stop it "
            f"(`ss -ltnp 'sport = :{port}'` shows which), or use other ports: {variable}=... make run"
        )


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001 - a small local helper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def qemu_image_options() -> list[str]:
    """The QEMU demo hosts boot their guests from the OS image (``make guest-image``) when it is built:
    every guest's disk in one pool directory all four agents are given (a shared pool), a network card
    on QEMU's user-mode networking. Without the image: the built-in test guest, no disk."""
    image = BASE_DIR / "guest-images" / "guest-os.qcow2"
    if not image.is_file():
        print(f"  {image} not built (make guest-image): QEMU guests run the test guest, without disks")
        return []
    pool = VAR_DIR / "pools" / "shared"
    pool.mkdir(parents=True, exist_ok=True)
    options = [f"boot_image={image}", f"pool={pool}", "network=user"]
    return [argument for option in options for argument in ("--driver-option", option)]


DEMO_POOL_DIR = VAR_DIR / "pools" / "san-a"  # the simulated demo's shared pool, mounted by every agent


def agent_takes_pools() -> bool:
    """Whether this checkout's agent takes ``--pool`` (older agents have no pools: the demo runs without)."""
    helped = subprocess.run(
        [PYTHON, "-m", "hostagent", "--help"], capture_output=True, text=True, check=False
    )
    return "--pool" in helped.stdout


def storage_options(driver: str) -> Callable[[str], list[str]]:
    """Each simulated demo agent's pool and networks (``vms.demo.agent_storage_options``), or none."""
    if driver in ("qemu", "libvirt") or not agent_takes_pools():
        if driver == "simulated":
            print("  this agent has no storage pools yet (no --pool): the demo guests get no disks")
        return lambda name: []
    from vms.demo_storage import agent_storage_options

    DEMO_POOL_DIR.mkdir(parents=True, exist_ok=True)
    return lambda name: agent_storage_options(name, DEMO_POOL_DIR)


def start_agents(driver: str, agents: list[ManagedProcess], rig: LibvirtHosts | None = None) -> None:
    """Start the demo agents, appending each to ``agents`` at once so a failure can stop them (``rig``:
    the libvirt daemons, one per demo host, for ``driver`` "libvirt")."""
    extra_args = qemu_image_options() if driver == "qemu" else []
    storage = storage_options(driver)
    if rig is not None:
        storage = lambda name: libvirt_demo.agent_options(rig, name)  # noqa: E731
    for index, name in enumerate(DEMO_HOSTS):
        port = AGENT_BASE_PORT + index
        require_free_port(port, f"host agent {name}", "AGENT_BASE_PORT")
        log_path = LOG_DIR / f"agent-{name}.log"
        try:
            agent = start_agent(
                name,
                port,
                agent_secret_file(name),
                driver,
                [*extra_args, *storage(name)],
                log_path=log_path,
                pki_dir=PKI_DIR,
            )
        except RuntimeError:
            sys.exit(f"host agent {name} did not start; see {log_path}")
        agents.append(agent.process)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", choices=("simulated", "qemu", "libvirt"), default="simulated")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="the reference deployment (make run-cluster): PostgreSQL, Redis with a replica and three "
        "Sentinels, HAProxy in front of --web uvicorn processes on --port, --workers Celery workers",
    )
    parser.add_argument("--web", type=int, default=int(os.environ.get("CLUSTER_WEB", "3")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("CLUSTER_WORKERS", "2")))
    options = parser.parse_args()
    if options.web < 1 or options.workers < 1:
        parser.error("--web and --workers must be at least 1")
    return options


PRIVATE_UMASK = 0o077  # files 0600, directories 0700: what this run and every process it starts creates


def keep_var_private() -> None:
    """var/ and everything in it readable by its owner only, now and later.

    It holds the SQLite database (live session keys, password hashes, encrypted agent secrets) with its
    -wal and -shm files, the secrets, the PKI's keys and the logs. The umask is inherited by every
    process started here (Redis, the agents, the web server, the worker, beat), so the files they
    create later are private too; what an earlier run (before this rule) left readable is narrowed.
    Except var/libvirt/ (``HOSTS=libvirt``): the daemons' own state, under libvirt's rules (QEMU runs as
    ``libvirt-qemu`` and must reach it; QEMU's TLS key is its group's only, the sockets root's only),
    and behind var/ itself, 0700.
    """
    os.umask(PRIVATE_UMASK)
    VAR_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    libvirt_state = VAR_DIR / "libvirt"
    for path in [VAR_DIR, *VAR_DIR.rglob("*")]:
        if libvirt_state in path.parents:
            continue
        with contextlib.suppress(FileNotFoundError):  # a leftover process may remove a file meanwhile
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                path.chmod(stat.S_IMODE(mode) & 0o700)


def use_local_redis() -> None:
    """Unless REDIS_URL (or REDIS_URL_FILE) is given: our own Redis on loopback, password required.

    The URL with the password is kept in var/redis-url (0600) and passed as REDIS_URL_FILE, so the
    password appears in no command line and no environment listing of other users' processes.
    """
    if os.environ.get("REDIS_URL") or os.environ.get("REDIS_URL_FILE"):
        return
    password = secret_file(VAR_DIR / "redis-password", token)
    url_file = VAR_DIR / "redis-url"
    url_file.unlink(missing_ok=True)
    secret_file(url_file, lambda: f"redis://:{password}@127.0.0.1:{REDIS_PORT}/0")
    os.environ["REDIS_URL_FILE"] = str(url_file)


# -- the cluster profile (`make run-cluster`): every process of a multi-machine deployment, on one machine --


# What a console process of the cluster needs (written to var/cluster/console.env).
CONSOLE_ENV = (
    "DJANGO_SETTINGS_MODULE",
    "MATRIXOE_VAR_DIR",
    "SECRET_KEY_FILE",
    "SECRETS_ENCRYPTION_KEY_FILE",
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_PASSWORD_FILE",
    "REDIS_SENTINEL_PASSWORD_FILE",
    "CELERY_QUEUE",
    "CHANNELS_PREFIX",
)


class ClusterProfile:
    """PostgreSQL, Redis (master, replica, three Sentinels), then ``--web`` uvicorn processes behind
    HAProxy on ``--port``, ``--workers`` Celery workers and beat (``devtools.cluster`` starts the services).

    Ports: the balancer on ``--port``, the web processes from WEB_BASE_PORT (``--port`` + 1), the Redis
    master on MATRIXOE_REDIS_PORT (6380) and its replica on the next, the Sentinels from
    SENTINEL_BASE_PORT (26380). PostgreSQL: DATABASE_URL when given; else the machine's server on
    127.0.0.1:5432 (user postgres), database CLUSTER_DATABASE_NAME (matrixoe_cluster), created if
    missing; else (or with CLUSTER_POSTGRES=own) a server of its own on CLUSTER_POSTGRES_PORT (5433).
    What runs where is written to var/cluster/cluster.json.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.directory = VAR_DIR / "cluster"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        web_base = int(os.environ.get("WEB_BASE_PORT") or options.port + 1)
        self.web_ports = [web_base + index for index in range(options.web)]
        sentinel_base = int(os.environ.get("SENTINEL_BASE_PORT") or 26380)
        self.redis = cluster_services.RedisSet(
            directory=self.directory,
            master_port=REDIS_PORT,
            replica_port=REDIS_PORT + 1,
            sentinel_ports=[sentinel_base + index for index in range(3)],
            password=secret_file(VAR_DIR / "redis-password", token),
            sentinel_password=secret_file(self.directory / "sentinel-password", token),
            timings=cluster_services.SentinelTimings.from_environ(),
        )
        self.database = ""  # what the summary says about PostgreSQL

    def start_services(self, services: list[ManagedProcess]) -> None:
        """The database and Redis; the console's settings for them go into our environment."""
        self.use_postgres(services)
        self.redis.start(LOG_DIR, services)
        os.environ.pop("REDIS_URL", None)
        os.environ.pop("REDIS_URL_FILE", None)
        os.environ.update(
            self.redis.environ(VAR_DIR / "redis-password", self.directory / "sentinel-password")
        )
        self.write_console_env()

    def write_console_env(self) -> None:
        """var/cluster/console.env: the settings every console process of this cluster gets (files for
        the secrets, never the secrets), for `set -a; . var/cluster/console.env; manage.py ...`."""
        lines = [f"{name}={os.environ[name]}" for name in CONSOLE_ENV if os.environ.get(name)]
        secret_path = self.directory / "console.env"
        secret_path.unlink(missing_ok=True)
        secret_file(secret_path, lambda: "\n".join(lines))

    def use_postgres(self, services: list[ManagedProcess]) -> None:
        if os.environ.get("DATABASE_URL") or os.environ.get("DATABASE_URL_FILE"):
            self.database = "the server of DATABASE_URL"
            return
        name = os.environ.get("CLUSTER_DATABASE_NAME") or "matrixoe_cluster"
        wanted = os.environ.get("CLUSTER_POSTGRES", "auto")
        if wanted != "own" and cluster_services.postgres_answers(cluster_services.MACHINE_POSTGRES):
            cluster_services.ensure_database(cluster_services.MACHINE_POSTGRES, name)
            os.environ["DATABASE_URL"] = cluster_services.MACHINE_POSTGRES.rsplit("/", 1)[0] + f"/{name}"
            self.database = f"the machine's server on 127.0.0.1:5432, database {name}"
            return
        port = int(os.environ.get("CLUSTER_POSTGRES_PORT") or 5433)
        own = cluster_services.OwnPostgres(
            self.directory, port, secret_file(self.directory / "postgres-password", token)
        )
        own.start(LOG_DIR, services)
        cluster_services.ensure_database(own.url("postgres"), name)
        url_file = self.directory / "database-url"
        url_file.unlink(missing_ok=True)
        secret_file(url_file, lambda: own.url(name))
        os.environ["DATABASE_URL_FILE"] = str(url_file)
        self.database = f"its own server on 127.0.0.1:{port} (data in {own.data_dir}), database {name}"

    def start_console(self, processes: list[ManagedProcess]) -> None:
        """Workers and beat, the web processes (started side by side), then the balancer."""
        for index in range(self.options.workers):
            args = [*RESTARTABLE["worker"], "--hostname", f"worker{index + 1}@%h"]
            processes.append(start_process(f"worker-{index + 1}", args, LOG_DIR / f"worker-{index + 1}.log"))
        beat = [
            *CELERY,
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(self.directory / "celerybeat-schedule"),
        ]
        processes.append(start_process("beat", beat, LOG_DIR / "beat.log"))
        for port in [*self.web_ports, self.options.port]:
            require_free_port(port, "the cluster's web processes and balancer", "PORT, WEB_BASE_PORT")
        started: dict[int, ManagedProcess | BaseException] = {}

        def start_web(index: int, port: int) -> None:
            try:
                started[index] = start_console_server(port, LOG_DIR / f"web-{index + 1}.log", timeout=90)
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                started[index] = error

        threads = [threading.Thread(target=start_web, args=item) for item in enumerate(self.web_ports)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for index in range(len(self.web_ports)):
            result = started[index]
            if isinstance(result, BaseException):
                sys.exit(f"web process {index + 1} did not start; see {LOG_DIR / f'web-{index + 1}.log'}")
            result.name = f"web-{index + 1}"
            processes.append(result)
        config = cluster_services.haproxy_config(
            self.directory / "haproxy.cfg", self.options.port, self.web_ports
        )
        processes.append(cluster_services.start_haproxy(config, LOG_DIR / "balancer.log", self.options.port))
        if not wait_for(self.redis.ready, 30):
            print(
                "warning: the Sentinels do not all see the master, its replica and each other yet", flush=True
            )

    def write_state(self, processes: list[ManagedProcess]) -> None:
        """var/cluster/cluster.json: each process's pid and port, for people and the fault tests."""
        ports = {f"web-{index + 1}": port for index, port in enumerate(self.web_ports)}
        ports |= {"balancer": self.options.port, f"redis-{self.redis.master_port}": self.redis.master_port}
        ports |= {f"redis-{self.redis.replica_port}": self.redis.replica_port}
        ports |= {f"sentinel-{port}": port for port in self.redis.sentinel_ports}
        state = {
            "url": f"http://127.0.0.1:{self.options.port}/",
            "master_name": cluster_services.MASTER_NAME,
            "sentinel_ports": list(self.redis.sentinel_ports),
            "database": self.database,
            "processes": {p.name: {"pid": p.process.pid, "port": ports.get(p.name)} for p in processes},
        }
        path = self.directory / "cluster.json"
        path.write_text(json.dumps(state, indent=2) + "\n")

    def describe(self, processes: list[ManagedProcess]) -> None:
        self.write_state(processes)
        web = ", ".join(map(str, self.web_ports))
        sentinels = ", ".join(map(str, self.redis.sentinel_ports))
        redis_ports = f"master {self.redis.master_port}, replica {self.redis.replica_port}"
        print(f"  cluster profile: HAProxy on {self.options.port}, in front of web processes on {web}")
        print(f"  Celery: {self.options.workers} workers and beat; they and the channel layer reach Redis")
        print(f"    through the Sentinels on {sentinels} ({redis_ports})")
        print(f"  PostgreSQL: {self.database}")
        print(f"  every process and port: {self.directory / 'cluster.json'}")


def main() -> None:
    started_at = time.monotonic()
    options = parse_args()
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "matrixoe.settings")
    os.environ.setdefault("CELERY_QUEUE", f"matrixoe-{options.port}")
    os.environ.setdefault("CHANNELS_PREFIX", f"matrixoe-{options.port}")
    os.environ.setdefault("MATRIXOE_VAR_DIR", str(VAR_DIR))
    keep_var_private()
    stop_leftovers()
    os.environ[MARKER] = str(VAR_DIR)
    use_local_secrets()
    if not options.cluster:
        use_local_redis()
    agents: list[ManagedProcess] = []
    processes: list[ManagedProcess] = []
    services: list[ManagedProcess] = []  # the cluster profile's PostgreSQL, Redis, Sentinels
    redis_pid_file = VAR_DIR / "redis.pid"
    redis_was_running = options.cluster or redis_pid_file.exists()
    cluster: ClusterProfile | None = None
    rig: LibvirtHosts | None = None
    if options.hosts == "libvirt" and (why := libvirt_demo.why_not(VAR_DIR)):
        sys.exit(f"make run HOSTS=libvirt: {why}")
    try:
        if options.cluster:
            cluster = ClusterProfile(options)
            cluster.start_services(services)
        else:
            subprocess.run([PYTHON, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
        # The schema is written while the agents start: neither needs the other (20 s saved on PostgreSQL).
        migrating = subprocess.Popen([PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=BASE_DIR)
        try:
            if options.hosts == "libvirt":
                print(f"  starting {len(DEMO_HOSTS)} libvirt daemons under {VAR_DIR / 'libvirt'}", flush=True)
                rig = libvirt_demo.start_rig(VAR_DIR, DEMO_HOSTS)
            start_agents(options.hosts, agents, rig)
        except BaseException:
            migrating.terminate()
            migrating.wait()
            raise
        if migrating.wait():
            raise subprocess.CalledProcessError(migrating.returncode, migrating.args)
        manage("demo_users", "--secrets-dir", str(VAR_DIR))
        manage(
            "demo_fleet",
            *("--agents-base-port", str(AGENT_BASE_PORT), "--secrets-dir", str(SECRETS_DIR)),
            *("--pki-dir", str(PKI_DIR), "--data-plane", "required"),
        )
        if rig is not None:
            seed = [PYTHON, "-m", "devtools.libvirt_demo", "seed", str(VAR_DIR), *DEMO_HOSTS]
            subprocess.run(seed, cwd=BASE_DIR, check=True)
        else:
            manage("seed_demo_agents", "--driver", options.hosts, "--pool-dir", str(DEMO_POOL_DIR))
        if cluster:
            cluster.start_console(processes)
        else:
            start_console(options.port, processes)
        print(f"\nMatrix OE console: http://127.0.0.1:{options.port}/")
        print(f"  logins: see above (first run) or {VAR_DIR}/admin-password and viewer-password")
        if cluster:
            cluster.describe(processes + services + agents)
        hosts = f"{len(DEMO_HOSTS)} ({options.hosts})"
        print(f"  demo host agents: {hosts}; logs in {LOG_DIR}. Ctrl-C stops all.")
        print(f"  started in {time.monotonic() - started_at:.0f} s\n", flush=True)
        if cluster:
            restartable = [process.name for process in processes if process.name != "balancer"]
            on_restart = lambda: cluster.write_state(processes + services + agents)  # noqa: E731
            wait_for_exit(processes, agents + services, restartable, on_restart)
        else:
            wait_for_exit(processes, agents)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
    except subprocess.CalledProcessError as error:
        print(f"\n{' '.join(map(str, error.cmd[1:3]))} failed (exit status {error.returncode})", flush=True)
    except (ClusterError, LibvirtHostError) as error:
        print(f"\n{error}", flush=True)
    finally:
        if rig is not None:  # before the last sweep of this run's processes: its daemons stop cleanly
            rig.stop()
        stop_everything(processes + agents, services)  # the console's processes first: they use the services
        if not redis_was_running:
            stop_own_redis(redis_pid_file)
        print("stopped.", flush=True)


def stop_own_redis(pid_file: Path) -> None:
    """Stop the Redis this run started (``scripts/ensure_redis.py`` wrote its pid); leave any other alone."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)


CELERY = [PYTHON, "-m", "celery", "-A", "matrixoe"]
# Without gossip and mingle: neither is used here, and gossip's stop on a broker restart used a closed
# connection and ended the worker ('NoneType' object has no attribute 'hostname', celery/kombu#582; the
# same error from restoring unacknowledged tasks is matrixoe/celery_consumer.py's).
WORKER_OPTIONS = ["--without-gossip", "--without-mingle"]
# Started again if they exit anyway, as a host's service manager would.
RESTARTABLE = {
    "worker": [
        *CELERY,
        "worker",
        *WORKER_OPTIONS,
        "--pool",
        "threads",
        "--concurrency",
        "8",
        "--loglevel",
        "INFO",
    ],
    "beat": [*CELERY, "beat", "--loglevel", "INFO", "--schedule", str(VAR_DIR / "celerybeat-schedule")],
}
RESTART_DELAY_S = 1.0
MAX_RESTARTS = 5  # per process and per RESTART_WINDOW_S: one that keeps exiting stops everything
RESTART_WINDOW_S = 60.0


def start_console(port: int, processes: list[ManagedProcess]) -> None:
    """Worker, beat and web server, each appended to ``processes`` at once so a failure can stop them."""
    for name, args in RESTARTABLE.items():
        processes.append(start_process(name, args, LOG_DIR / f"{name}.log"))
    require_free_port(port, "the web server", "PORT")
    try:
        server = start_console_server(port, LOG_DIR / "web.log")
    except RuntimeError:
        sys.exit(f"the console did not start; see {LOG_DIR / 'web.log'}")
    processes.append(server)


def wait_for_exit(
    console: list[ManagedProcess],
    watched: list[ManagedProcess],
    restartable: Collection[str] = tuple(RESTARTABLE),
    on_restart: Callable[[], None] | None = None,
) -> None:
    """Return when a process of ``console`` not in ``restartable`` stops (the web server; the balancer
    of the cluster profile), or a restartable one keeps exiting.

    A restartable process that exits is started again with the same command after ``RESTART_DELAY_S``
    (in place in ``console``, so the clean-up stops the new one; then ``on_restart()``), up to
    ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``. A stopped process of ``watched`` (an agent: its VSP goes
    unreachable; a service of the cluster profile) is only reported.
    """
    reported: set[str] = set()
    restarts: dict[str, list[float]] = {name: [] for name in restartable}
    while True:
        for other in watched:
            if not other.running and other.name not in reported:
                reported.add(other.name)
                print(f"{other.name} stopped (not started again); see {other.log_path}.", flush=True)
        for index, process in enumerate(console):
            if process.running:
                continue
            recent = [at for at in restarts.get(process.name, []) if time.monotonic() - at < RESTART_WINDOW_S]
            if process.name not in restartable or len(recent) >= MAX_RESTARTS:
                print(f"{process.name} stopped; see {process.log_path}. Stopping the others.", flush=True)
                return
            status = process.process.returncode
            print(
                f"{process.name} exited (status {status}); starting it again. See {process.log_path}.",
                flush=True,
            )
            time.sleep(RESTART_DELAY_S)
            restarts[process.name] = [*recent, time.monotonic()]
            console[index] = start_process(process.name, process.process.args, process.log_path)
            if on_restart:
                on_restart()
        time.sleep(0.5)


if __name__ == "__main__":
    main()
