"""The fault soak (issue 10): seeded migrations, one fault each at a random moment of a phase; invariants.

A private stack on loopback (its own Redis on a free port, a throwaway SQLite database, the ASGI server,
a Celery worker and beat with short recovery intervals, four simulated host agents, and a TCP proxy on
the data plane). Run ``i`` uses seed ``SEED + i``; the seed alone decides everything about the run
(``soak_run.Scenario``), so ``make soak SEED=<the run's seed> RUNS=1`` replays it.

    make soak RUNS=20 SEED=1        # or: .venv/bin/python bench/soak.py --runs 20 --seed 1 [--keep-logs]

Every guest has a disk: on a pool all the agents share (issue 19), or, for most seeds of the kinds
``soak_run.MIRROR_KINDS``, on a local pool of its source, so that its migration mirrors it and the fault
strikes during the mirror (issue 20). The invariants include "no image is written by two running
guests at once", sampled while each run lasts and checked after it, and the disk checks of issue 20
(``soak_checks``: after an abort the source's disk as before the attempt and no volume of it left on
the target; after a completion the target's disk equal to the source's at the freeze).

Prints one line per run, a table per fault kind and phase (runs, completed, aborted, cancelled, host
crashes, invariant violations with their seeds), how often the agents' writers were sampled, then
exactly one line ``N runs, K invariant violations``. Exits 1 when K > 0.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))

from soak_stack import LOCAL_POOL, LOCAL_POOL_MIB, SOAK_POOL, Stack  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-minutes", type=float, default=0, help="start no new run after this long (0: no limit)"
    )
    parser.add_argument(
        "--driver",
        choices=("simulated", "qemu"),
        default="simulated",
        help="the agents' driver (qemu: two QEMU hosts, real guests under TCG)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated fault kinds: seeds of other kinds are skipped (a seed still replays alone)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the stack's logs even without violations"
    )
    return parser.parse_args()


stopping: list[str] = []  # SIGTERM: finish the current run, then report


def main() -> int:
    args = parse_args()
    work_dir = Path(
        tempfile.mkdtemp(prefix="soak-", dir=BASE_DIR / "var" if (BASE_DIR / "var").is_dir() else None)
    )
    stack = Stack(work_dir, driver=args.driver)
    os.environ.update(stack.environment(secrets.token_hex(4)))
    results = []
    try:
        stack.start()
        sqlite3.connect(work_dir / "soak.sqlite3").execute("PRAGMA journal_mode=WAL").close()
        import django

        django.setup()
        from soak_run import DISK_BYTES, run_once

        from vms.models import VSP

        admin, web = set_up_console(stack)
        mirrors = stack.mirrors = all(VSP.objects.values_list("agent_mirrors_local_disks", flat=True))
        kind = f"a tmpfs of {LOCAL_POOL_MIB} MiB" if stack.local_pools_limited else "a plain directory"
        local = (
            f"or on its source's local pool {LOCAL_POOL} ({kind}), mirrored"
            if mirrors
            else "(the agents do not mirror local disks: no local disks)"
        )
        print(
            f"soak: {args.runs} runs from seed {args.seed} ({args.driver} driver, each guest with a "
            f"{DISK_BYTES >> 20} MiB disk on shared pool {SOAK_POOL} {local}); logs in {work_dir}",
            flush=True,
        )
        stop_at = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
        signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
        seeds = run_seeds(args.seed, args.runs, args.only, args.driver, mirrors)
        for index, seed in enumerate(seeds):
            if stopping or (stop_at and time.monotonic() > stop_at):
                print(f"soak: stopping early ({stopping[0] if stopping else 'time budget'})", flush=True)
                break
            result = run_once(stack, seed, admin, web)
            results.append(result)
            print_run(index, result)
    finally:
        stack.stop()
    orphans = stack.kill_leftover_qemus() if args.driver == "qemu" else {}
    violations = sum(1 for result in results if result.violations) + (1 if orphans else 0)
    print_table(results)
    print_writer_samples(results)
    print_disk_checks(results)
    for pid, line in orphans.items():
        print(f"! orphan QEMU process {pid} left after the stack stopped (killed now): {line[:160]}")
    if violations or args.keep_logs:
        print(f"logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{len(results)} runs, {violations} invariant violations")
    return 1 if violations else 0


def run_seeds(first: int, runs: int, only: str, driver: str, mirrors: bool | None = None) -> list[int]:
    """``runs`` seeds from ``first`` upwards; with ``only``, just those whose fault kind it names
    (``mirrors``: whether the agents mirror local disks, as ``Scenario.from_seed`` takes it; None: the
    driver's own).

    Raises SystemExit naming the known kinds if ``only`` names one the driver does not have.
    """
    from soak_run import FAULT_KINDS, QEMU_FAULT_KINDS, QEMU_MIRROR_FAULT_KINDS, Scenario

    if not only:
        return list(range(first, first + runs))
    kinds = {kind.strip() for kind in only.split(",") if kind.strip()}
    known = (QEMU_MIRROR_FAULT_KINDS if mirrors else QEMU_FAULT_KINDS) if driver == "qemu" else FAULT_KINDS
    if not kinds or kinds - set(known):
        raise SystemExit(f"soak: --only takes fault kinds of the {driver} driver: {', '.join(known)}")
    seeds: list[int] = []
    seed = first
    while len(seeds) < runs:
        if Scenario.from_seed(seed, driver, mirrors).kind in kinds:
            seeds.append(seed)
        seed += 1
    return seeds


def set_up_console(stack: Stack):
    """A VSP per agent with its pools known (the shared one: the migrations' pre-checks need them) and
    what its agent can do (its driver, whether it mirrors local disks: a local disk's pre-checks need
    it), an admin, and an HTTP session of that admin on the web server.

    QEMU: every pair's data-plane encryption policy off (QEMU's own stream cannot do the console's TLS).
    Raises SystemExit if an agent does not report its pools.
    """
    import httpx
    from django.contrib.auth.models import User

    from vms.inventory import learn_abilities, refresh_resources
    from vms.models import VSP, PairEncryption

    for name in stack.agent_names:
        agent = stack.agents[name]
        vsp = VSP.objects.create(
            name=name,
            agent_url=agent.url,
            agent_secret=agent.secret,
            agent_certificate=agent.trust,
            memory_mib=16384,
            cpus=8,
        )
        if not refresh_resources(vsp):
            raise SystemExit(f"soak: the agent of {name} did not report its storage pools")
        if not learn_abilities(vsp):
            raise SystemExit(f"soak: the agent of {name} did not say what it can do")
    if stack.driver == "qemu":
        hosts = list(VSP.objects.order_by("pk"))
        for index, first in enumerate(hosts):
            for second in hosts[index + 1 :]:
                PairEncryption.objects.create(
                    vsp_a=first, vsp_b=second, encryption="off", reason="soak: QEMU's data plane"
                )
    password = secrets.token_urlsafe(12)
    admin = User.objects.create_superuser("soak", password=password)
    web = httpx.Client(base_url=stack.web_url, follow_redirects=True, timeout=10)
    web.get("/login/")
    answer = web.post(
        "/login/",
        data={"username": "soak", "password": password, "csrfmiddlewaretoken": web.cookies["csrftoken"]},
        headers={"Referer": f"{stack.web_url}/login/"},
    )
    if "/login/" in str(answer.url):
        raise SystemExit("soak: could not log in to the console")
    return admin, web


def print_run(index: int, result) -> None:
    scenario = result.scenario
    verdict = "OK" if not result.violations else f"{len(result.violations)} VIOLATION(S)"
    crash = " (host crash)" if result.host_crash else ""
    print(
        f"[{index + 1:3}] seed {scenario.seed:<8} {scenario.kind:<13} {scenario.disk:<6} "
        f"aimed {scenario.moment():<18} hit {result.hit_phase:<12} -> {result.outcome}{crash} "
        f"in {result.seconds:.1f} s: {verdict}",
        flush=True,
    )
    for note in result.notes:
        print(f"        note: {note}")
    for violation in result.violations:
        print(f"        ! {violation}")
    if result.violations:
        print(f"        replay: make soak SEED={scenario.seed} RUNS=1   ({scenario.describe()})")


def print_table(results) -> None:
    rows: dict[tuple[str, str, str], dict] = defaultdict(lambda: defaultdict(int) | {"seeds": []})
    for result in results:
        row = rows[(result.scenario.disk, result.scenario.kind, result.hit_phase)]
        row["runs"] += 1
        ended = result.outcome
        row[ended if ended in ("completed", "aborted", "cancelled", "skipped") else "stuck"] += 1
        row["host crash"] += result.host_crash
        if result.violations:
            row["violations"] += 1
            row["seeds"].append(str(result.scenario.seed))
    header = f"{'disk':<7}{'fault':<14}{'phase hit':<14}{'runs':>5}{'done':>6}{'abort':>6}{'cancel':>7}"
    print("\n" + header + f"{'stuck':>6}{'skip':>5}{'crash':>6}{'viol.':>6}  seeds of violating runs")
    for (disk, kind, phase), row in sorted(rows.items()):
        print(
            f"{disk:<7}{kind:<14}{phase:<14}{row['runs']:>5}{row['completed']:>6}{row['aborted']:>6}"
            f"{row['cancelled']:>7}{row['stuck']:>6}{row['skipped']:>5}{row['host crash']:>6}"
            f"{row['violations']:>6}  {' '.join(row['seeds'])}"
        )


def print_writer_samples(results) -> None:
    """What the single-writer invariant had to check: samples of every agent's writers during the runs."""
    samples = sum(result.writer_samples for result in results)
    seen = sum(result.writer_seen for result in results)
    written = sum(result.disk_written for result in results)
    print(
        f"single writer: the guest recorded writing its disk before its migration in {written} of "
        f"{len(results)} runs; every agent's writers sampled {samples} times while the runs lasted, "
        f"{seen} of them with the run's disk written by a running guest"
    )


def print_disk_checks(results) -> None:
    """What issue 20's disk checks had to check: local runs by outcome, and every run's disk checked."""
    local = [result for result in results if result.scenario.local and result.disk_checked]
    kept = sum(1 for result in local if result.outcome in ("aborted", "cancelled"))
    done = sum(1 for result in local if result.outcome == "completed")
    checked = sum(1 for result in results if result.disk_checked)
    print(
        f"disks: {checked} of {len(results)} runs' disks checked after the outcome; {len(local)} mirrored "
        f"from a local pool: {kept} aborted or cancelled (the source's disk as before the attempt, no "
        f"volume of it left on the target), {done} completed (the target's disk at the freeze equal to "
        f"the source's)"
    )


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"(soak took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(status)
