"""This host's storage pools and networks, and the checks every driver makes on a guest's disks and cards.

Pools and networks come from the agent's command line (``hostagent/__main__.py``)::

    --pool NAME:KIND:PATH[:IDENTITY]     KIND shared or local; PATH an existing directory
    --network NAME:KIND[:BRIDGE]         KIND bridge, user or simulated; BRIDGE [<netns>/]<bridge>

**A pool's identity** (``agentprotocol.StoragePool.identity``) tells "the same SAN/NFS export" from "a
directory of the same name". Given as ``IDENTITY``, it is taken as it is (a shared pool: the same
on every host that mounts that storage). Otherwise it comes from a marker file, ``.matrixoe-pool``, in
the pool's directory: the first agent that opens the pool writes a random id there (created
atomically: of two agents starting at once, one writes, both read the same), and every host that
mounts the same storage reads the same file, so it gets the same identity; a directory of the same name
elsewhere has a marker of its own, so another identity. (A directory's device and inode numbers were
not taken: the device number is given per mount, so one NFS export has a different one on every host.)
A ``local`` pool's identity always starts with ``local-<agent name>-``: it never equals another
host's, even if the directory was copied there.

**A volume** is a file name inside a pool (the protocol refuses slashes, ``.`` and ``..``); here
the path is also resolved, so a symbolic link inside a pool cannot lead outside it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from agentprotocol import Network, NetworkKind, PoolKind, StoragePool

MARKER = ".matrixoe-pool"
LOCAL_PREFIX = "local-"


@dataclass(frozen=True)
class PoolConfig:
    """One ``--pool``: its name on this host, kind, directory and identity."""

    name: str
    kind: PoolKind
    path: Path
    identity: str


@dataclass(frozen=True)
class NetworkConfig:
    """One ``--network``: name, kind and, for a bridge, ``[<netns>/]<bridge>``."""

    name: str
    kind: NetworkKind
    bridge: str | None = None

    @property
    def netns_and_bridge(self) -> tuple[str | None, str]:
        """The bridge's network namespace (None: the host's own) and its name."""
        netns, _, bridge = (self.bridge or "").rpartition("/")
        return netns or None, bridge


def _checked_name(name: str, what: str) -> str:
    Network.model_validate({"name": name, "kind": "simulated"})  # the protocol's name rule
    return name


def pool_marker_identity(path: Path) -> str:
    """The id in ``path/.matrixoe-pool``, written first if absent (module docstring). Raises OSError."""
    marker = path / MARKER
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        pass
    partial = path / f".{MARKER}.{secrets.token_hex(4)}"
    partial.write_text(f"pool-{secrets.token_hex(16)}\n")
    try:
        os.link(partial, marker)  # atomic: fails if another agent's marker got there first
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    return marker.read_text().strip()


def parse_pool(text: str, agent_name: str) -> PoolConfig:
    """``NAME:KIND:PATH[:IDENTITY]``; raises ValueError saying what is wrong."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--pool must be NAME:KIND:PATH[:IDENTITY], not {text!r}")
    name, kind, where = parts[:3]
    try:
        _checked_name(name, "pool")
    except ValueError:
        raise ValueError(f"--pool {text!r}: the name must be 1-64 letters, digits, '.', '_' or '-'") from None
    if kind not in get_args(PoolKind):
        raise ValueError(f"--pool {text!r}: the kind must be shared or local")
    path = Path(where).resolve()
    if not path.is_dir():
        raise ValueError(f"--pool {text!r}: {path} is not a directory")
    identity = parts[3] if len(parts) == 4 and parts[3] else pool_marker_identity(path)
    if kind == "local":
        identity = f"{LOCAL_PREFIX}{agent_name}-{identity}"
    StoragePool.model_validate(  # the protocol's bounds on the identity
        {"name": name, "kind": kind, "identity": identity, "capacity_bytes": 0, "free_bytes": 0}
    )
    return PoolConfig(name=name, kind=kind, path=path, identity=identity)  # type: ignore[arg-type]


def parse_network(text: str) -> NetworkConfig:
    """``NAME:KIND[:BRIDGE]``; raises ValueError saying what is wrong."""
    name, _, rest = text.partition(":")
    kind, _, bridge = rest.partition(":")
    try:
        _checked_name(name, "network")
    except ValueError:
        raise ValueError(
            f"--network {text!r}: the name must be 1-64 letters, digits, '.', '_' or '-'"
        ) from None
    if kind not in get_args(NetworkKind):
        raise ValueError(f"--network {text!r}: the kind must be bridge, user or simulated")
    if kind == "bridge" and not bridge.rpartition("/")[2]:
        raise ValueError(f"--network {text!r}: a bridge network needs NAME:bridge:[<netns>/]<bridge>")
    return NetworkConfig(name=name, kind=kind, bridge=bridge or None)  # type: ignore[arg-type]
