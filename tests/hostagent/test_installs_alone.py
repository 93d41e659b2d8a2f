"""The host agent installs alone: from its archive (``scripts/agent_bundle.py``), with nothing of the
console beside it, every module of it imports, it starts and answers, and every library it imports is
in ``hostagent/requirements.txt`` (or one of those needs it).

The Python that runs it here is the project's, whose site-packages also hold Django and the console's
libraries: the run refuses those imports itself (a finder raising ``ImportError`` for them), as a host
that installed only ``requirements.txt`` would.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import grimp
import httpx

from devtools.processes import ManagedProcess, free_port, wait_until, write_secret_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from agent_bundle import PACKAGES, write_bundle  # noqa: E402

# The console's own packages and the libraries only the console installs.
CONSOLE = ("matrixoe", "vms", "migrations_app", "api", "matrixoe_cli", "devtools", "tests", "bench")
CONSOLE_LIBRARIES = ("django", "celery", "channels", "channels_redis", "redis", "httpx", "ninja", "kombu")

REFUSE_THE_CONSOLE = f"""
import sys
REFUSED = {CONSOLE + CONSOLE_LIBRARIES!r}


class RefuseTheConsole:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ImportError(f"the host agent imported {{name}}, which a host does not have")
        return None


sys.meta_path.insert(0, RefuseTheConsole())
sys.path.insert(0, sys.argv.pop(1))
"""

IMPORT_EVERY_MODULE = """
import importlib, pkgutil
for package_name in ("hostagent", "agentprotocol"):
    package = importlib.import_module(package_name)
    for module in pkgutil.walk_packages(package.__path__, package_name + "."):
        importlib.import_module(module.name)
        print(module.name)
"""

RUN_THE_AGENT = "import runpy; runpy.run_module('hostagent', run_name='__main__', alter_sys=True)"


def unpacked_bundle(tmp_path: Path) -> Path:
    """The archive written and unpacked as on a host; returns the directory."""
    host = tmp_path / "host"
    with tarfile.open(write_bundle(tmp_path / "hostagent.tar.gz")) as bundle:
        bundle.extractall(host, filter="data")
    return host


def isolated_python(host: Path, code: str, *args: str) -> list[str]:
    """``python -I`` (no project directory, no environment paths) with ``host`` first on its path."""
    return [sys.executable, "-I", "-c", REFUSE_THE_CONSOLE + code, str(host), *args]


def test_it_imports_every_module_of_the_agent_from_its_archive_alone(tmp_path):
    host = unpacked_bundle(tmp_path)
    assert sorted(path.name for path in host.iterdir()) == ["agentprotocol", "hostagent", "requirements.txt"]

    done = subprocess.run(isolated_python(host, IMPORT_EVERY_MODULE), capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    imported = done.stdout.split()
    assert "hostagent.server" in imported and "hostagent.drivers.qemu.driver" in imported
    assert "agentprotocol.migration" in imported


def test_the_agent_from_its_archive_starts_and_answers(tmp_path):
    host = unpacked_bundle(tmp_path)
    secret_file = tmp_path / "agent.secret"
    secret = write_secret_file(secret_file)
    port = free_port()
    args = ["--name", "alone", "--listen", f"127.0.0.1:{port}", "--secret-file", str(secret_file)]
    log_path = tmp_path / "agent.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            isolated_python(host, RUN_THE_AGENT, *args, "--insecure-http"),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    agent = ManagedProcess("agent-alone", process, log_path)
    try:
        url = f"http://127.0.0.1:{port}/v1/health"
        headers = {"Authorization": f"Bearer {secret}"}

        def answers() -> bool:
            try:
                return httpx.get(url, headers=headers, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(lambda: answers() or not agent.running, timeout=30)
        assert agent.running and answers(), agent.log_tail()
        assert httpx.get(url, headers=headers).json()["name"] == "alone"
    finally:
        agent.stop()


def test_every_library_the_agent_imports_is_in_its_requirements():
    """``requirements.txt``, or a driver's own (``requirements-libvirt.txt``: a library not installed
    here is matched by name, e.g. ``libvirt`` by ``libvirt-python``)."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=True, cache_dir=None)
    imported = {module for module in graph.modules if "." not in module} - set(PACKAGES)
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"__future__"})
    required = set().union(*map(requirement_names, (ROOT / "hostagent").glob("requirements*.txt")))
    allowed = required | {dependency for name in required for dependency in dependencies_of(name)}
    distributions = importlib.metadata.packages_distributions()

    def listed(module: str) -> bool:
        if module not in distributions:  # not installed here: an optional driver's library
            return any(name.startswith(canonical(module)) for name in required)
        return bool({canonical(name) for name in distributions[module]} & allowed)

    missing = [module for module in third_party if not listed(module)]

    assert third_party and not missing, f"imported by the agent, not in hostagent/requirements.txt: {missing}"


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(canonical(re.split(r"[=<>!~\[; ]", line)[0]))
    return names


def dependencies_of(name: str) -> set[str]:
    """What the installed distribution ``name`` itself requires (unconditionally), canonical names."""
    try:
        requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:  # an optional driver's library, not installed here
        return set()
    return {canonical(re.split(r"[=<>!~\[; (]", line)[0]) for line in requires if "extra ==" not in line}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
