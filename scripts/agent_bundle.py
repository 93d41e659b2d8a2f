"""The host agent as one archive to install on a host: the agent, the protocol package, its requirements.

    python3 scripts/agent_bundle.py [var/hostagent.tar.gz]

The archive holds ``hostagent/`` and ``agentprotocol/`` (the messages it shares with the console) and
``requirements.txt`` (``hostagent/requirements.txt``). On the host: unpack it, ``pip install -r
requirements.txt``, then ``python -m hostagent ...`` from the unpacked directory (``hostagent/README.md``).
Nothing of the console goes in: ``tests/hostagent/test_installs_alone.py`` runs the agent from it.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
PACKAGES = ("hostagent", "agentprotocol")


def shipped(path: Path) -> bool:
    """Source and data files only: no bytecode caches."""
    return "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")


def write_bundle(archive: Path) -> Path:
    """Write the agent's archive (gzip tar) to ``archive``; returns it."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as bundle:
        for package in PACKAGES:
            for path in sorted((BASE_DIR / package).rglob("*")):
                if path.is_file() and shipped(path.relative_to(BASE_DIR)):
                    bundle.add(path, arcname=str(path.relative_to(BASE_DIR)))
        bundle.add(BASE_DIR / "hostagent" / "requirements.txt", arcname="requirements.txt")
    return archive


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else BASE_DIR / "var" / "hostagent.tar.gz"
    print(write_bundle(target))
