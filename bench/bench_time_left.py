"""Benchmark: the live panel's "About N left" (``steering.outlook``) against when migrations really end.

    .venv/bin/python bench/bench_time_left.py [--cases sparse,full,busy] [--scale 1] [--keep-logs]

Two real host agents (simulated driver) on loopback; each case migrates a fresh guest through the agent
API in the console's order of commands (prepare, start with the case's bandwidth cap, quiesce once
converged, freeze, resume). Every progress snapshot the source sends is kept with its moment. Afterwards
the migration is replayed: each snapshot is taken into an in-memory ``Migration`` the way the worker
takes it (``records.apply_snapshot``, ``samples.add_round_sample``) and ``steering.outlook`` is asked,
at that moment, how long is left: the very function the page calls. Its answer is compared with the
time that really remained until the guest ran on the target (resume). Per phase of the Copy (round 1;
the dirty rounds after it) the error of every reading: median and worst, in seconds and as a share of
the real remaining time (readings with under 1 s left are counted, not scored in %: a 0.3 s error there
is not "100 % wrong" to anyone reading it).

Cases (``--scale`` multiplies memory):
- ``sparse``: 512 MiB guest, 10 % of it written, capped at 10 MB/s (the tester's "74 MB left at 19.5 MB/s
  said 4 min": round 1 was estimated from the whole memory);
- ``full``: 96 MiB, all written, idle-ish writer (about 5 % of the link), capped at 10 MB/s;
- ``busy``: 64 MiB, all written, writing about 35 % of the link: several dirty rounds, capped at 10 MB/s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quick  # noqa: E402
from bench.isolated import isolated_console  # noqa: E402

PAGE = 4096
MB = 1_000_000


@dataclass(frozen=True)
class Case:
    name: str
    memory_mib: int
    fill_percent: int
    cap_mb_s: float
    dirty_share: float  # of the cap


CASES = {
    "sparse": Case("sparse", 512, 10, 10, 0.0),
    "full": Case("full", 96, 100, 10, 0.05),
    "busy": Case("busy", 64, 100, 10, 0.35),
}


@dataclass
class Run:
    case: Case
    readings: list[tuple[float, Any]]  # (s since start, ProgressSnapshot)
    ended_s: float  # start -> the target resumed
    outcome: str


def run_case(source: Any, target: Any, case: Case, scale: float) -> Run:
    """Migrate a fresh guest of ``case``, keeping every source snapshot with its moment."""
    from agentprotocol import GuestSpec, IncomingRequest, MigrationParams, OutgoingRequest, StopRequest
    from bench.agents import guest_id_for

    name = f"tl-{case.name}-{secrets.token_hex(2)}"
    memory_mib = max(8, round(case.memory_mib * scale))
    cap = case.cap_mb_s * MB
    spec = {"name": name, "memory_mib": memory_mib, "vcpus": 1, "os_type": "linux"}
    source.client.define_guest(
        GuestSpec.model_validate(
            {
                **spec,
                "guest_id": guest_id_for(name),
                "dirty_pages_per_s": round(case.dirty_share * cap / PAGE),
                "fill_percent": case.fill_percent,
                "running": True,
            }
        )
    )
    wanted = GuestSpec(guest_id=guest_id_for(name), **spec)
    migration_id = f"bench-{secrets.token_hex(3)}"
    params = MigrationParams(downtime_ms=300, max_rounds=30, bandwidth_mbps=case.cap_mb_s * 8)
    started = time.perf_counter()
    incoming = IncomingRequest(migration_id=migration_id, guest=wanted, encryption="off")
    endpoint = target.client.prepare_incoming(incoming).endpoint()
    source.client.start_outgoing(
        OutgoingRequest(
            migration_id=migration_id, guest=wanted.guest_id, target=endpoint, params=params, encryption="off"
        )
    )
    readings: list[tuple[float, Any]] = []
    last = None
    for snapshot in source.client.iter_progress(migration_id):
        readings.append((time.perf_counter() - started, snapshot))
        last = snapshot
        if snapshot.converged or snapshot.state not in ("init", "copy"):
            break
    outcome = "completed"
    if last is None or not last.converged:
        outcome = f"failed: {last and (last.error or last.state)}"
        with contextlib.suppress(Exception):
            target.client.cancel(migration_id)
    else:
        source.client.quiesce(migration_id)
        ready = source.client.freeze(migration_id)
        if ready.state == "ready":
            target.client.resume(migration_id)
            source.client.release(migration_id)
        else:
            outcome = f"failed: {ready.error}"
    ended = time.perf_counter() - started
    for agent in (target, source):
        with contextlib.suppress(Exception):
            agent.client.stop_guest(guest_id_for(name), StopRequest(graceful_timeout_s=0))
        with contextlib.suppress(Exception):
            agent.client.delete_guest(guest_id_for(name))
    return Run(case, readings, ended, outcome)


def replay(run: Run, scale: float) -> list[tuple[str, float, float]]:
    """(phase, predicted s left, real s left) for every Copy snapshot, as ``steering.outlook`` reads it."""
    from migrations_app.models import Migration
    from migrations_app.records import apply_snapshot
    from migrations_app.samples import add_round_sample
    from migrations_app.steering import outlook
    from vms.models import VSP, VirtualMachine

    case = run.case
    vm = VirtualMachine(name=f"tl-{case.name}", memory_mib=max(8, round(case.memory_mib * scale)))
    source = VSP(name="bench-a", agent_driver="simulated")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    migration = Migration(vm=vm, source=source, state=Migration.State.INIT, policy={})
    migration.policy = {"bandwidth_cap_mb_s": case.cap_mb_s}
    points = []
    for at, snapshot in run.readings:
        now = base + timedelta(seconds=at)
        if snapshot.state == "copy" and migration.state != Migration.State.COPY:
            migration.state = Migration.State.COPY
            migration.copy_started_at = now
        apply_snapshot(migration, snapshot)
        add_round_sample(migration, now)
        if migration.state != Migration.State.COPY or snapshot.converged:
            continue
        look = outlook(migration, now=now)
        if look is None or look.time_left_s is None:
            continue
        phase = "round 1" if snapshot.round <= 1 else "dirty rounds"
        points.append((phase, look.time_left_s, run.ended_s - at))
    return points


def summary(points: list[tuple[float, float]]) -> str:
    """Median and worst absolute error (s), and in % of the real time left (readings with >= 1 s left)."""
    errors = [abs(predicted - real) for predicted, real in points]
    shares = [abs(predicted - real) / real for predicted, real in points if real >= 1]
    signed = [predicted - real for predicted, real in points]
    words = f"{len(points):4d} readings | error median {statistics.median(errors):6.2f} s"
    words += f", worst {max(errors):6.2f} s"
    if shares:
        words += f" | {100 * statistics.median(shares):4.0f} % median, {100 * max(shares):4.0f} % worst"
    words += f" | bias {statistics.median(signed):+.2f} s"
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="sparse,full,busy", help=f"of: {', '.join(CASES)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies each case's memory")
    parser.add_argument("--keep-logs", action="store_true")
    args = quick.parse_args(parser, {"cases": "sparse,busy", "scale": 0.125})
    work_dir = isolated_console("bench-time-left-")
    from devtools.local_secrets import use_local_secrets

    use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses
    import django

    django.setup()
    from bench.agents import BenchAgent

    one, five, _ = os.getloadavg()
    print(f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores")
    scratch = Path(tempfile.mkdtemp(prefix="bench-time-left-"))
    source, target = BenchAgent("tl-src", scratch), BenchAgent("tl-dst", scratch)
    by_phase: dict[str, list[tuple[float, float]]] = {}
    try:
        for name in args.cases.split(","):
            case = CASES[name.strip()]
            run = run_case(source, target, case, args.scale)
            points = replay(run, args.scale)
            memory = max(8, round(case.memory_mib * args.scale))
            print(
                f"\n{case.name}: {memory} MiB, {case.fill_percent} % written, cap {case.cap_mb_s:g} MB/s, "
                f"writing {100 * case.dirty_share:.0f} % of it: {run.outcome} in {run.ended_s:.1f} s"
            )
            for phase in ("round 1", "dirty rounds"):
                mine = [(p, r) for kind, p, r in points if kind == phase]
                if mine:
                    print(f"  {phase:<13} {summary(mine)}")
                    by_phase.setdefault(phase, []).extend(mine)
    finally:
        source.stop()
        target.stop()
        if args.keep_logs:
            print(f"\nagent logs kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    print("\nall cases:")
    for phase, mine in by_phase.items():
        print(f"  {phase:<13} {summary(mine)}")


if __name__ == "__main__":
    main()
