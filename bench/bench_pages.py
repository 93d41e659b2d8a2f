"""Server time and query count of the General tab and the VM list, with 100 and with 10,000 VMs.

Each size gets a throwaway SQLite database; requests go through Django's test Client (the whole
middleware and template stack, no network). Prints the median of N requests per page, and fails if
a page's query count differs between the sizes.

    .venv/bin/python bench/bench_pages.py [--requests 30] [--sizes 100 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))


def configure_django(database_path: Path) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "matrixoe.settings"
    os.environ["DATABASE_URL"] = f"sqlite:///{database_path}"
    os.environ["ALLOWED_HOSTS"] = "testserver"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    from devtools.local_secrets import use_local_secrets

    use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses
    warnings.filterwarnings("ignore", message="No directory at", module="django.core.handlers.base")
    import django

    django.setup()


def fill(vm_count: int) -> None:
    """``vm_count`` guests over 8 VSPs; every tenth has a Not Runnable copy on the next VSP.

    vsp0-vsp5 are in host group "A", vsp6 and vsp7 in "B"; "bench" is a superuser, "member" a viewer
    of group A with the view permissions (what they see is filtered by a join on the memberships).
    """
    from django.contrib.auth.models import Permission, User

    from vms.models import VSP, HostGroup, HostGroupMembership, Registration, VirtualMachine

    group_a, group_b = HostGroup.objects.create(name="A"), HostGroup.objects.create(name="B")

    vsps = VSP.objects.bulk_create(
        VSP(
            name=f"vsp{i}",
            agent_url=f"http://127.0.0.1:{7101 + i}",
            agent_secret="x",  # noqa: S106 - throwaway database
            memory_mib=2**20,
            cpus=64,
            group=group_a if i < 6 else group_b,
        )
        for i in range(8)
    )
    vms = VirtualMachine.objects.bulk_create(
        (
            VirtualMachine(
                name=f"guest-{n:05}",
                kind="vpar" if n % 50 == 0 else "vm",
                os_type="Debian 12",
                os_status=["up", "down", "initializing", "in_efi"][n % 4],
                memory_mib=128 * (1 + n % 32),
                vcpus=1 + n % 4,
            )
            for n in range(vm_count)
        ),
        batch_size=2000,
    )
    registrations = []
    for n, vm in enumerate(vms):
        registrations.append(Registration(vm=vm, vsp=vsps[n % 8], hardware_status="on" if n % 3 else "off"))
        if n % 10 == 0:
            registrations.append(
                Registration(
                    vm=vm,
                    vsp=vsps[(n + 1) % 8],
                    hardware_status="not_runnable",
                    not_runnable_set_by="migrate",
                    not_runnable_reason="guest migrated",
                )
            )
    Registration.objects.bulk_create(registrations, batch_size=2000)
    User.objects.create_superuser("bench", password="bench-password")  # noqa: S106 - throwaway database
    member = User.objects.create_user("member", password="bench-password")  # noqa: S106
    member.user_permissions.add(*Permission.objects.filter(codename__in=["view_vsp", "view_virtualmachine"]))
    HostGroupMembership.objects.create(group=group_a, user=member, role="viewer")


def measure(client, url: str, requests: int) -> tuple[float, int]:
    """Median server time in ms and the query count of one request."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.get(url)  # warm caches (templates, permissions) as a running server would have them
    timings = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url)
        timings.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (url, response.status_code)
    with CaptureQueriesContext(connection) as queries:
        client.get(url)
    return statistics.median(timings), len(queries)


def pages(suffix: str = "", group: str | None = None) -> dict[str, str]:
    """The measured pages; with ``group``, a guest of that host group for the General tab and the last
    page of what a member of it sees."""
    from vms.models import VirtualMachine
    from vms.views import PAGE_SIZE

    guests = VirtualMachine.objects.all()
    if group is not None:
        guests = guests.filter(registrations__vsp__group__name=group).distinct()
    last_page = -(-guests.count() // PAGE_SIZE)
    middle = guests.filter(registrations__hardware_status="not_runnable").order_by("pk")
    vm = middle[middle.count() // 2]
    return {
        f"General tab{suffix}": f"/vms/{vm.pk}/general/",
        f"VM list{suffix}": "/",
        f"VM list, filtered{suffix}": "/?q=guest&kind=vm&os_status=up&hardware_status=on",
        f"VM list, last page{suffix}": f"/?page={last_page}",
        f"VSP list{suffix}": "/vsps/",
    }


def run_size(vm_count: int, requests: int) -> dict[str, tuple[float, int]]:
    from django.core.management import call_command
    from django.test import Client

    call_command("migrate", verbosity=0)
    fill(vm_count)
    client, member = Client(), Client()
    client.login(username="bench", password="bench-password")  # noqa: S106
    member.login(username="member", password="bench-password")  # noqa: S106
    results = {name: measure(client, url, requests) for name, url in pages().items()}
    results |= {name: measure(member, url, requests) for name, url in pages(" (member)", "A").items()}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 10_000])
    options = parser.parse_args()
    results: dict[int, dict[str, tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        configure_django(Path(scratch) / "bench.sqlite3")
        from django.db import connection

        for size in options.sizes:
            connection.close()
            connection.settings_dict["NAME"] = str(Path(scratch) / f"bench-{size}.sqlite3")
            results[size] = run_size(size, options.requests)
            connection.close()
    print(f"Server time (median of {options.requests} requests, Django test Client, SQLite) and query count")
    print(f"{'page':<30}" + "".join(f"{f'{size} VMs':>24}" for size in options.sizes))
    for name in results[options.sizes[0]]:
        cells = "".join(
            f"{f'{results[s][name][0]:.1f} ms, {results[s][name][1]} queries':>24}" for s in options.sizes
        )
        print(f"{name:<30}{cells}")
    uneven = [
        name for name in results[options.sizes[0]] if len({results[s][name][1] for s in options.sizes}) > 1
    ]
    if uneven:
        print(f"FAIL: query count depends on the number of VMs for: {', '.join(uneven)}")
        return 1
    print("OK: every page makes the same number of queries at every size.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
