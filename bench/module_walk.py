"""The modules one migration walks through, from ``tasks.run_migration`` to its end, traced for real.

Runs a private stack (a throwaway SQLite database, two real host agents, no Celery worker: the task's
body runs in this process, as a worker would run it) and drives two migrations: one that completes
and one whose Copy runs over its 1 s time limit and aborts. The driving thread is traced
(``sys.setprofile``); every call from one module of the console's apps (``migrations_app``, ``vms``)
into another is an *entry*. Each distinct call site (caller function -> callee function) counts once,
however often a loop repeats it. Printed per migration:

- the walk (``--verbose``): the entries in the order first made, ``caller module -> callee.function``,
  marked ``RETURN`` or ``again``;
- ``modules``: how many modules the walk passes through (the task's module included);
- ``returns``: entries into a module the walk left for another and has not finished with (it is still
  on the call stack below): a callback, the story sent back into a module it left (``phases`` calling
  into the ``engine`` that runs it);
- ``re-entries``: entries into a module entered before (returns included), by module: how many places
  the story goes back to it from.

Helper threads (the watchdog, the calls to agents made interruptible) are not traced: the walk is the
driving loop's.

    .venv/bin/python bench/module_walk.py [--verbose]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import BASE_DIR, isolated_console  # noqa: E402

WORK_DIR = isolated_console("bench-module-walk-", MIGRATION_BANDWIDTH_MBPS="40")

from devtools.local_secrets import use_local_secrets  # noqa: E402
from devtools.processes import AgentProcess, free_port, start_agent, stop_all, write_secret_file  # noqa: E402

use_local_secrets()

APPS = ("migrations_app.", "vms.")
# Data types, not steps: their methods (``Migration.require_source``, a field's conversion, an error's
# words) are how every module reads a row or raises, not a place the migration goes.
DATA = frozenset({"migrations_app.models", "vms.models", "vms.fields", "migrations_app.errors"})
# Ends of the walk: an entry into them counts, what they do inside does not (the agent's wire, the push
# of progress to browsers, the evacuation that follows a migration's end).
LEAVES = frozenset({"vms.agent_client", "migrations_app.progress", "migrations_app.evacuation"})


class Walk:
    """The cross-module call sites of the traced thread, in the order first made."""

    def __init__(self) -> None:
        # (caller module, callee module, callee function, whether the callee module is on the stack below)
        self.edges: list[tuple[str, str, str, bool]] = []
        self._seen: set[tuple[str, str, str, str]] = set()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith(APPS) or ".migrations." in callee or callee in DATA:
            return
        caller_frame = frame.f_back
        while caller_frame is not None and not caller_frame.f_globals.get("__name__", "").startswith(APPS):
            caller_frame = caller_frame.f_back
        if caller_frame is None:
            return
        caller = caller_frame.f_globals["__name__"]
        if caller == callee or beneath_a_leaf(caller_frame):
            return
        site = (caller, caller_frame.f_code.co_name, callee, frame.f_code.co_name)
        if site not in self._seen:
            self._seen.add(site)
            self.edges.append((caller, callee, frame.f_code.co_name, callee in modules_below(caller_frame)))

    def figures(self) -> tuple[int, Counter[str], Counter[str]]:
        """(modules passed through, returns by module, re-entries by module)."""
        entered: set[str] = set()
        returns: Counter[str] = Counter()
        again: Counter[str] = Counter()
        for _caller, callee, _function, is_return in self.edges:
            if is_return:
                returns[callee] += 1
            if callee in entered:
                again[callee] += 1
            entered.add(callee)
        modules = entered | {edge[0] for edge in self.edges}
        return len(modules), returns, again


def modules_below(frame: FrameType) -> set[str]:
    """The console modules on the stack under ``frame`` (the modules it was called from)."""
    below = set()
    caller = frame.f_back
    while caller is not None:
        name = caller.f_globals.get("__name__", "")
        if name.startswith(APPS):
            below.add(name)
        caller = caller.f_back
    return below - {frame.f_globals.get("__name__", "")}


def beneath_a_leaf(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "") in LEAVES:
            return True
        frame = frame.f_back
    return False


def start_walk_agent(name: str) -> AgentProcess:
    secret_file = WORK_DIR / f"{name}.secret"
    write_secret_file(secret_file)
    return start_agent(
        name, free_port(), secret_file, log_path=WORK_DIR / f"agent-{name}.log", pki_dir=WORK_DIR
    )


def traced_run(migration_id: int) -> Walk:
    from migrations_app.tasks import run_migration

    walk = Walk()
    sys.setprofile(walk.profile)
    try:
        run_migration(migration_id)
    finally:
        sys.setprofile(None)
    return walk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verbose", action="store_true", help="print every entry of the walk")
    parser.add_argument("--json", help="also write the walks' entries to this file")
    args = parser.parse_args()
    verbose = args.verbose
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True, env=os.environ
    )
    agents = [start_walk_agent(name) for name in ("walk-a", "walk-b")]
    try:
        walks = walk_both(agents)
        if args.json:
            Path(args.json).write_text(json.dumps({label: walk.edges for label, walk in walks}))
        for label, walk in walks:
            modules, returns, again = walk.figures()
            print(
                f"{label}: {modules} modules, {sum(returns.values())} returns {dict(returns)}, "
                f"{sum(again.values())} re-entries {dict(again)}"
            )
            if verbose:
                entered: set[str] = set()
                for caller, callee, function, is_return in walk.edges:
                    mark = "RETURN" if is_return else "again" if callee in entered else ""
                    entered.add(callee)
                    print(f"    {caller} -> {callee}.{function} {mark}")
    finally:
        stop_all([agent.process for agent in agents])
        shutil.rmtree(WORK_DIR, ignore_errors=True)


def walk_both(agents: list[AgentProcess]) -> list[tuple[str, Walk]]:
    import django

    django.setup()
    from bench_click_to_init import bench_fleet

    from migrations_app.actions import do_request_migration
    from migrations_app.models import Migration
    from vms.models import VirtualMachine

    vsps, vm, user = bench_fleet(agents)
    walks = []
    migration = do_request_migration(vm, vsps[1], user)
    walks.append(("completed", traced_run(migration.pk)))
    migration.refresh_from_db()
    assert migration.state == Migration.State.COMPLETED, migration.alert
    # Back on the first host, with a Copy limit it cannot keep: 64 MiB written at 5 MB/s.
    VirtualMachine.objects.filter(pk=vm.pk).update(copy_limit_s=1)
    vm.refresh_from_db()
    migration = do_request_migration(vm, vsps[0], user)
    walks.append(("aborted", traced_run(migration.pk)))
    migration.refresh_from_db()
    assert migration.state == Migration.State.ABORTED, migration.state
    return walks


if __name__ == "__main__":
    main()
