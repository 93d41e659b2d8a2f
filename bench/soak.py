"""The fault soak (issue 10): seeded migrations, one fault each at a random moment of a phase; invariants.

A private stack on loopback (its own Redis on a free port, a throwaway SQLite database, the ASGI server,
a Celery worker and beat with short recovery intervals, four simulated host agents, and a TCP proxy on
the data plane). Run ``i`` uses seed ``SEED + i``; the seed alone decides everything about the run
(``soak_run.Scenario``), so ``make soak SEED=<the run's seed> RUNS=1`` replays it.

    make soak RUNS=20 SEED=1        # or: .venv/bin/python bench/soak.py --runs 20 --seed 1 [--keep-logs]

Every guest has a disk on a pool all the agents share (issue 19), and the invariants include "no image
is written by two running guests at once", sampled while each run lasts and checked after it.

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

from soak_stack import SOAK_POOL, Stack  # noqa: E402


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

        admin, web = set_up_console(stack)
        print(
            f"soak: {args.runs} runs from seed {args.seed} ({args.driver} driver, each guest with a "
            f"{DISK_BYTES >> 20} MiB disk on shared pool {SOAK_POOL}); logs in {work_dir}",
            flush=True,
        )
        stop_at = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
        signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
        seeds = run_seeds(args.seed, args.runs, args.only, args.driver)
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
    for pid, line in orphans.items():
        print(f"! orphan QEMU process {pid} left after the stack stopped (killed now): {line[:160]}")
    if violations or args.keep_logs:
        print(f"logs kept in {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{len(results)} runs, {violations} invariant violations")
    return 1 if violations else 0


def run_seeds(first: int, runs: int, only: str, driver: str) -> list[int]:
    """``runs`` seeds from ``first`` upwards; with ``only``, just those whose fault kind it names.

    Raises SystemExit naming the known kinds if ``only`` names one the driver does not have.
    """
    from soak_run import FAULT_KINDS, QEMU_FAULT_KINDS, Scenario

    if not only:
        return list(range(first, first + runs))
    kinds = {kind.strip() for kind in only.split(",") if kind.strip()}
    known = QEMU_FAULT_KINDS if driver == "qemu" else FAULT_KINDS
    if not kinds or kinds - set(known):
        raise SystemExit(f"soak: --only takes fault kinds of the {driver} driver: {', '.join(known)}")
    seeds: list[int] = []
    seed = first
    while len(seeds) < runs:
        if Scenario.from_seed(seed, driver).kind in kinds:
            seeds.append(seed)
        seed += 1
    return seeds


def set_up_console(stack: Stack):
    """A VSP per agent with its pools known (the shared one: the migrations' pre-checks need them), an
    admin, and an HTTP session of that admin on the web server.

    QEMU: every pair's data-plane encryption policy off (QEMU's own stream cannot do the console's TLS).
    Raises SystemExit if an agent does not report its pools.
    """
    import httpx
    from django.contrib.auth.models import User

    from vms.inventory import refresh_resources
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
        f"[{index + 1:3}] seed {scenario.seed:<8} {scenario.kind:<13} aimed {scenario.phase:<12} "
        f"hit {result.hit_phase:<12} -> {result.outcome}{crash} in {result.seconds:.1f} s: {verdict}",
        flush=True,
    )
    for note in result.notes:
        print(f"        note: {note}")
    for violation in result.violations:
        print(f"        ! {violation}")
    if result.violations:
        print(f"        replay: make soak SEED={scenario.seed} RUNS=1   ({scenario.describe()})")


def print_table(results) -> None:
    rows: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(int) | {"seeds": []})
    for result in results:
        row = rows[(result.scenario.kind, result.hit_phase)]
        row["runs"] += 1
        row[result.outcome if result.outcome in ("completed", "aborted", "cancelled") else "stuck"] += 1
        row["host crash"] += result.host_crash
        if result.violations:
            row["violations"] += 1
            row["seeds"].append(str(result.scenario.seed))
    header = f"{'fault':<14}{'phase hit':<14}{'runs':>5}{'done':>6}{'abort':>6}{'cancel':>7}{'stuck':>6}"
    print("\n" + header + f"{'crash':>6}{'viol.':>6}  seeds of violating runs")
    for (kind, phase), row in sorted(rows.items()):
        print(
            f"{kind:<14}{phase:<14}{row['runs']:>5}{row['completed']:>6}{row['aborted']:>6}{row['cancelled']:>7}"
            f"{row['stuck']:>6}{row['host crash']:>6}{row['violations']:>6}  {' '.join(row['seeds'])}"
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


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"(soak took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    sys.exit(status)
