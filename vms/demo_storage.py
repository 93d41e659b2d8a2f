"""The demo fleet's storage and networks (issue 19), without Django: ``scripts/run_console.py`` starts the
demo agents with them, ``vms.demo`` defines the guests' disks and cards on them.

One shared pool every demo agent mounts (a directory they are all given, with one identity), and
networks; vsp1 lacks cache-net, so cache01 (on vsp2) cannot go there and its Migrate dialog says why.
"""

from __future__ import annotations

from pathlib import Path

DEMO_POOL = "san-a"
DEMO_POOL_IDENTITY = "demo-san-a"
DEMO_NETWORKS = {
    "vsp1": ("prod-net",),
    "vsp2": ("prod-net", "cache-net"),
    "vsp3": ("prod-net", "cache-net"),
    "vsp4": ("prod-net", "cache-net"),
}
DEMO_GUEST_NETWORK = {"cache01": "cache-net"}  # every other guest's card is on prod-net
DEMO_DISK_BYTES = 10 << 30  # each guest's system disk: a sparse volume of 10 GiB


def agent_storage_options(host: str, pool_dir: Path) -> list[str]:
    """The options that give demo agent ``host`` the shared pool (directory ``pool_dir``) and its
    networks (``hostagent``: ``--pool NAME:KIND:PATH[:IDENTITY]``, ``--network NAME:KIND[:BRIDGE]``)."""
    options = ["--pool", f"{DEMO_POOL}:shared:{pool_dir}:{DEMO_POOL_IDENTITY}"]
    for network in DEMO_NETWORKS.get(host, ()):
        options += ["--network", f"{network}:simulated"]
    return options
