"""Periodic inventory collection of 500 VSPs, 10% of them not answering, through the real Celery path.

Issue 13's target: the whole collection finishes within the 30 s collection interval.

The stack (private, on loopback): a throwaway SQLite database, the shared Redis as broker, one real
Celery worker (threads pool, ``--threads``) on a private queue, and the real task that beat sends
(``vms.tasks.collect_inventory``): it records a round and fans out one
``collect_vsp_inventory`` task per VSP, each with the default per-agent time-out
(``INVENTORY_AGENT_TIMEOUT_S``, 5 s unless set).

- **Answering VSPs are real hosts of a fleet** (``python -m hostagent.fleet``, simulated driver, HTTPS
  with a certificate from a CA of the bench's own): ``--agents`` fleet processes (2) share them out,
  and each VSP is its own host there: its own port, secret and guests. Each VSP has ``--guests``
  registered guests (2, powered off, 1 MiB) defined on it. ``--design shared-agents`` runs the earlier
  stand-in instead, for comparison: ``--agents`` plain agent processes (10), each the agent of several
  VSP rows (one ``agent_url`` for many rows, so every call lists the guests of all of them).
  The agents share the machine's cores with the worker (on real hosts they would not).
- **Not answering VSPs** (every tenth) point at ports that **accept the connection and never answer**
  (``devtools.blackhole``: listening sockets never read; the TLS handshake hangs), the costly kind of
  dead host: each holds one worker thread for the whole time-out (a closed port fails at once).

Each round is timed from the fan-out (``InventoryRound.started_at``) to the last VSP's answer or
time-out (``finished_at``), as ``/metrics`` reports it (``matrixoe_inventory_collection_duration_seconds``).

    .venv/bin/python bench/bench_inventory.py [--vsps 500] [--dead-percent 10] [--threads 32] [--rounds 3]
        [--design fleet|shared-agents] [--agents N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quick  # noqa: E402
from isolated import BASE_DIR, isolated_console  # noqa: E402

WORK_DIR = isolated_console("bench-inventory-")
INTERVAL_S = 30.0

from devtools.blackhole import BlackHole  # noqa: E402
from devtools.local_secrets import use_local_secrets  # noqa: E402
from devtools.processes import (  # noqa: E402
    AgentProcess,
    ManagedProcess,
    free_port,
    start_agent,
    start_celery_worker,
    start_fleet,
    stop_all,
    wait_until,
    write_secret_file,
)

use_local_secrets()  # SECRET_KEY and the secrets key from var/, as `make run` uses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vsps", type=int, default=500)
    parser.add_argument("--dead-percent", type=int, default=10, help="VSPs whose agent never answers")
    parser.add_argument(
        "--design",
        choices=("fleet", "shared-agents"),
        default="fleet",
        help="fleet: every answering VSP its own host in --agents fleet processes; shared-agents: the "
        "earlier stand-in, --agents agents each serving several VSP rows",
    )
    parser.add_argument(
        "--agents", type=int, help="processes serving the answering VSPs (fleet 2, shared 10)"
    )
    parser.add_argument("--guests", type=int, default=2, help="registered guests per answering VSP")
    parser.add_argument("--threads", type=int, default=32, help="the worker's threads (--concurrency)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=int, help="INVENTORY_AGENT_TIMEOUT_S for the worker (default: 5)")
    args = quick.parse_args(parser, {"vsps": 10, "agents": 1, "threads": 8, "rounds": 1, "timeout": 1})
    args.agents = args.agents or (2 if args.design == "fleet" else 10)
    if args.timeout:
        os.environ["INVENTORY_AGENT_TIMEOUT_S"] = str(args.timeout)
    subprocess.run([sys.executable, "scripts/ensure_redis.py"], cwd=BASE_DIR, check=True)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=BASE_DIR, check=True)
    dead_count = args.vsps * args.dead_percent // 100
    processes: list[ManagedProcess] = []
    hole = BlackHole(dead_count)
    try:
        if args.design == "fleet":
            agents = start_bench_fleets(args.vsps - dead_count, args.agents)
        else:
            agents = [start_bench_agent(f"inv-{n}") for n in range(args.agents)]
        processes += list({id(agent.process): agent.process for agent in agents}.values())
        ca = agents[0].ca.read_text() if agents[0].ca else ""
        populate(args.vsps, agents, hole.urls("https"), ca, args.guests)
        processes.append(
            start_celery_worker(
                "inventory",
                WORK_DIR / "worker.log",
                queue=os.environ["CELERY_QUEUE"],
                concurrency=args.threads,
            )
        )
        worker = processes[-1].process.pid
        agent_pids = sorted({agent.process.process.pid for agent in agents})
        rounds = []
        for _ in range(args.rounds):
            cpu_before = cpu_seconds([worker]), cpu_seconds(agent_pids)
            collected = collect_once()
            cpu = cpu_seconds([worker]) - cpu_before[0], cpu_seconds(agent_pids) - cpu_before[1]
            rounds.append((*collected, cpu))
    finally:
        hole.release()
        stop_all(processes)
    report(args, dead_count, rounds)
    shutil.rmtree(WORK_DIR, ignore_errors=True)


def start_bench_agent(name: str) -> AgentProcess:
    secret_file = WORK_DIR / f"{name}.secret"
    write_secret_file(secret_file)
    log_path = WORK_DIR / f"agent-{name}.log"
    return start_agent(name, free_port(), secret_file, log_path=log_path, pki_dir=WORK_DIR / "pki")


def start_bench_fleets(answering: int, fleets: int) -> list[AgentProcess]:
    """``answering`` VSPs, each its own host, spread over ``fleets`` fleet processes (one list, in order)."""
    members: list[AgentProcess] = []
    per_fleet = -(-answering // fleets)
    for number in range(fleets):
        count = min(per_fleet, answering - len(members))
        if count <= 0:
            break
        prefix = f"inv{number}x"
        members += start_fleet(
            prefix, count, WORK_DIR / "secrets", log_path=WORK_DIR / f"{prefix}.log", pki_dir=WORK_DIR / "pki"
        )
    return members


def populate(count: int, agents: list[AgentProcess], dead_urls: list[str], ca: str, guests: int) -> None:
    """``count`` VSPs: every tenth (while ``dead_urls`` last) at a silent port, the others shared out over
    ``agents`` (one each for a fleet, several each for shared agents), each with ``guests`` registered
    guests that its agent knows (powered off, 1 MiB)."""
    import django

    django.setup()
    from vms.agent_client import AgentClient
    from vms.agent_messages import guest_spec
    from vms.models import VSP, Registration, VirtualMachine

    dead = iter(dead_urls)
    step = max(count // max(len(dead_urls), 1), 1)
    answering = 0
    for number in range(count):
        silent = next(dead, None) if number % step == step - 1 else None
        agent = agents[answering % len(agents)]
        answering += 0 if silent else 1
        vsp = VSP.objects.create(
            name=f"vsp{number:03d}",
            agent_url=silent or agent.url,
            agent_secret=agent.secret,
            agent_certificate=ca,
            memory_mib=65536,
            cpus=16,
        )
        if silent:
            continue
        with AgentClient.for_vsp(vsp) as client:
            for index in range(guests):
                vm = VirtualMachine.objects.create(
                    name=f"{vsp.name}-g{index}", memory_mib=1, vcpus=1, os_status="down"
                )
                Registration.objects.create(vm=vm, vsp=vsp, hardware_status=Registration.HardwareStatus.OFF)
                client.define_guest(guest_spec(vm, fill_percent=0))


Collected = tuple[float, float, tuple[int, int], list[int | None], list[int | None]]
Round = tuple[float, float, tuple[int, int], list[int | None], list[int | None], tuple[float, float]]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux ``/proc``)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def collect_once() -> Collected:
    """Send beat's task, wait for its round to finish; (round's own time s, wall time s from sending,
    (unanswered, skipped) VSPs, answered calls' ms, unanswered calls' ms)."""
    from celery import current_app

    from matrixoe.celery import app  # noqa: F401  (configures current_app from the settings)
    from vms.models import VSP, InventoryRound

    before = InventoryRound.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    sent = time.time()
    current_app.send_task("vms.tasks.collect_inventory", queue=os.environ["CELERY_QUEUE"])

    def finished() -> InventoryRound | None:
        return InventoryRound.objects.filter(pk__gt=before).exclude(finished_at=None).first()

    if not wait_until(lambda: finished() is not None, timeout=10 * INTERVAL_S, interval=0.05):
        raise SystemExit("the collection did not finish within 300 s")
    done = finished()
    assert done is not None and done.finished_at is not None
    wall = done.finished_at.timestamp() - sent
    answered = list(VSP.objects.filter(agent_failures=0).values_list("agent_collect_ms", flat=True))
    silent = list(VSP.objects.exclude(agent_failures=0).values_list("agent_collect_ms", flat=True))
    time.sleep(1)  # let the worker's threads settle before the next round
    return done.duration_s or 0.0, wall, (done.unanswered, done.skipped), answered, silent


def report(args: argparse.Namespace, dead: int, rounds: list[Round]) -> None:
    load = os.getloadavg()[0]
    print(
        f"Inventory collection: {args.vsps} VSPs, {dead} not answering (accept, never answer), "
        f"{serving(args)} ({args.guests} guests per VSP), one worker with "
        f"{args.threads} threads, agent time-out {agent_timeout_s():g} s; {os.cpu_count()} cores, "
        f"load average {load:.1f}"
    )
    for number, (own, wall, (unanswered, skipped), answered, silent, cpu) in enumerate(rounds, 1):
        worker_cpu, agents_cpu = cpu
        verdict = "within" if wall <= INTERVAL_S and not skipped else "OVER"
        print(
            f"  round {number}: {own:5.1f} s fan-out -> last VSP ({wall:5.1f} s from beat's send), "
            f"{unanswered} unanswered, {skipped} skipped; {verdict} the {INTERVAL_S:g} s target"
        )
        print(f"    answering agents' calls: {summary(answered)}")
        print(f"    silent agents' calls:    {summary(silent)}")
        print(f"    CPU used: worker {worker_cpu:.1f} s, agents {agents_cpu:.1f} s")


def serving(args: argparse.Namespace) -> str:
    if args.design == "fleet":
        return f"the rest each its own host in {args.agents} fleet process(es)"
    return f"{args.agents} real agents each serving several VSP rows"


def agent_timeout_s() -> float:
    from django.conf import settings

    return float(settings.INVENTORY_AGENT_TIMEOUT_S)


def summary(values: list[int | None]) -> str:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return "none"
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(ordered):6.0f} ms   p95 {p95:6.0f} ms   max {ordered[-1]:6.0f} ms"
        f"   (n={len(ordered)})"
    )


if __name__ == "__main__":
    main()
